"""`relsum rerank`: a ranker checkpoint from the shell, in the line format of the C++ `relsum_rerank`.

The same lines in give the same lines out (an fp32 export's scores within 1e-4), so a service can
check its export against the checkpoint it came from by comparing the two tools' output.

Pairs: ``QUERY<TAB>DOC`` a line in, a score a line out.  Ranking: the query on the first line, a
candidate on each line after it; ``CORPUS_ID<TAB>SCORE`` out, best first.  In texts, ``\\t``, ``\\n``
and ``\\\\`` stand for a tab, a line break and a backslash (a backslash before any other character
stands for that character).
"""

from __future__ import annotations

from typing import BinaryIO, TextIO


def unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            i += 1
            c = {"t": "\t", "n": "\n"}.get(text[i], text[i])
        out.append(c)
        i += 1
    return "".join(out)


def escape(text: str) -> str:
    """The inverse of :func:`unescape`: any text as one line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def read_lines(stream: BinaryIO) -> list[str]:
    """UTF-8 lines without their line break (a carriage return stays part of the text, as in C++)."""
    lines = []
    for number, raw in enumerate(stream, 1):
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"line {number}: not valid UTF-8 at byte offset {e.start}") from None
    return lines


def parse_pairs(lines: list[str]) -> list[tuple[str, str]]:
    if not lines:
        raise ValueError("the input is empty: nothing to score (a QUERY<TAB>DOC pair a line)")
    pairs = []
    for number, line in enumerate(lines, 1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"line {number}: expected QUERY<TAB>DOC, found {len(parts) - 1} tabs")
        pairs.append((unescape(parts[0]), unescape(parts[1])))
    return pairs


def parse_ranking(lines: list[str]) -> tuple[str, list[str]]:
    """The query (first line) and its candidates (a line each)."""
    if not lines:
        raise ValueError("the input is empty: the first line must be the query")
    if len(lines) == 1:
        raise ValueError("no candidates: a candidate a line must follow the query")
    return unescape(lines[0]), [unescape(line) for line in lines[1:]]


def parse(lines: list[str], *, rank: bool) -> list[tuple[str, str]] | tuple[str, list[str]]:
    """The request the lines hold, checked before any model loads."""
    return parse_ranking(lines) if rank else parse_pairs(lines)


def run(ranker, request, out: TextIO, *, top_k: int | None = None, batch_size: int = 128,
        max_tokens: int = 16384) -> None:
    """Scores a :func:`parse` request with a :class:`~relsum_core.ranker.CrossEncoder`, writing to ``out``:
    a score a line for pairs, ``CORPUS_ID<TAB>SCORE`` best first for a ranking."""
    if isinstance(request, list):
        if top_k is not None:
            raise ValueError("top_k ranks a query's candidates: it needs a ranking request (--rank)")
        scores = ranker.predict(request, batch_size=batch_size, max_tokens=max_tokens)
        out.writelines(f"{s:.9g}\n" for s in scores)
        return
    query, docs = request
    hits = ranker.rank(query, docs, top_k=top_k, batch_size=batch_size, max_tokens=max_tokens)
    out.writelines(f"{h['corpus_id']}\t{h['score']:.9g}\n" for h in hits)
