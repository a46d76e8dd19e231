"""docs.txt and queries.txt for relsum_soak from the bundled ESCI data: every product's title, and
its title with its attributes on the lines after it (relsum_soak cuts docs by whitespace-split
words); every query.  One text a line, with tab, line break and backslash escaped."""

import sys
from pathlib import Path

from relsum_core.data import load_dataset
from relsum_core.text import attributes_text


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def main(out: Path) -> None:
    catalog, judgments = load_dataset()
    docs = []
    for p in catalog.values():
        docs += [p.title, "\n".join(filter(None, (p.title, attributes_text(p))))]
    queries = sorted({j.query for j in judgments})
    out.mkdir(parents=True, exist_ok=True)
    (out / "docs.txt").write_text("".join(escape(d) + "\n" for d in docs))
    (out / "queries.txt").write_text("".join(escape(q) + "\n" for q in queries))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
