"""docs.txt and queries.txt for relsum_soak from the bundled ESCI data: every product's title, and
its title followed by its attributes (relsum_soak cuts docs by whitespace-split words); every
query.  One text a line, its whitespace runs as single spaces."""

import sys
from pathlib import Path

from relsum_core.data import load_dataset
from relsum_core.text import attributes_text


def one_line(text: str) -> str:
    return " ".join(text.split())


def main(out: Path) -> None:
    catalog, judgments = load_dataset()
    docs = []
    for p in catalog.values():
        docs += [p.title, "\n".join(filter(None, (p.title, attributes_text(p))))]
    queries = sorted({j.query for j in judgments})
    out.mkdir(parents=True, exist_ok=True)
    (out / "docs.txt").write_text("".join(one_line(d) + "\n" for d in docs))
    (out / "queries.txt").write_text("".join(one_line(q) + "\n" for q in queries))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
