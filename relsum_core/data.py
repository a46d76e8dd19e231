"""Catalog and relevance-judgment loading (ESCI-style and WANDS folders) and the split of queries.

An ESCI-style data directory holds ``products.jsonl`` or ``products.jsonl.gz`` (one JSON object a
line with ``product_id``, ``title`` and optionally ``description``, ``bullet_points``, ``brand``,
``color``) and ``judgments.csv`` (columns ``query_id``, ``query``, ``product_id`` and ``grade``
0..3 and/or ``esci_label`` E/S/C/I).

A WANDS folder (Wayfair ANnotation Dataset, the ``dataset/`` folder of its repository, or the
repository itself) holds the tab-separated ``product.csv``, ``query.csv`` and ``label.csv``.
``product_name`` is the title, ``product_description`` the description, and each
``attribute:value`` of the ``|``-separated ``product_features`` one bullet.  Labels map onto the
ESCI grades: Exact 3, Partial 2 (ESCI's Substitute, the nearest meaning), Irrelevant 0.

Every malformed row raises :class:`DataError` naming file and line: a silently dropped judgment
changes every metric computed downstream.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# ESCI's labels and the integer grades the judgments file carries beside them.
ESCI_GRADES = {"E": 3, "S": 2, "C": 1, "I": 0}
MAX_GRADE = 3

CATALOG_NAMES = ("products.jsonl.gz", "products.jsonl")
JUDGMENTS_NAME = "judgments.csv"

WANDS_PRODUCTS, WANDS_QUERIES, WANDS_LABELS = "product.csv", "query.csv", "label.csv"
WANDS_GRADES = {"exact": 3, "partial": 2, "irrelevant": 0}


class DataError(ValueError):
    """A catalog or judgments file that cannot be read as documented."""


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    description: str = ""
    bullets: tuple[str, ...] = ()
    brand: str = ""
    color: str = ""


@dataclass(frozen=True)
class Judgment:
    query_id: str
    query: str
    product_id: str
    grade: int  # 0..3, E=3 S=2 C=1 I=0
    label: str | None = None  # the file's own label when it has one: ESCI letter, WANDS word


def bundled_data_dir() -> Path:
    """The ESCI-150q copy shipped inside the package (works from an installed wheel too)."""
    path = resources.files("relsum_core").joinpath("bundled", "esci_150q")
    if not isinstance(path, Path):  # a zipped install: the data must be extracted to be read by path
        raise DataError(f"bundled data is not on the file system ({path}); install relsum unzipped")
    return path


def _wands_folder(data_dir: Path, catalog_only: bool = False) -> Path | None:
    """The folder holding WANDS's files when ``data_dir`` is (or contains, as ``dataset/``) one;
    ``catalog_only``: its products file is all the caller reads."""
    names = (WANDS_PRODUCTS,) if catalog_only else (WANDS_PRODUCTS, WANDS_QUERIES, WANDS_LABELS)
    for folder in (data_dir, data_dir / "dataset"):
        present = [name for name in names if (folder / name).is_file()]
        if present and not any((data_dir / name).is_file() for name in (*CATALOG_NAMES, JUDGMENTS_NAME)):
            missing = set(names) - set(present)
            if missing:
                raise DataError(f"{folder}: a WANDS folder without {', '.join(sorted(missing))}")
            return folder
    return None


def _catalog_path(data_dir: Path) -> Path:
    found = [data_dir / name for name in CATALOG_NAMES if (data_dir / name).is_file()]
    if len(found) > 1:  # one is stale, and which one is read must not be a silent guess
        raise DataError(f"{data_dir}: holds {' and '.join(f.name for f in found)}; keep one catalog file")
    if found:
        return found[0]
    raise DataError(f"{data_dir}: no catalog file (expected one of {', '.join(CATALOG_NAMES)}, "
                    f"or WANDS's {WANDS_PRODUCTS}, {WANDS_QUERIES} and {WANDS_LABELS})")


def _text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _bullets(value, where: str) -> tuple[str, ...]:
    # ESCI ships bullets as one newline-separated string; other dumps use a list.
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        lines = value.split("\n")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        lines = value
    else:
        raise DataError(f"{where}: 'bullet_points' must be a string or a list of strings")
    return tuple(line for line in lines if line.strip())


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading byte-order mark dropped, as spreadsheet tools write one); an invalid
    byte is an error naming its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class _Lines:
    """The file's lines for csv, counting them: ``first`` is the first non-blank line read since it
    was last reset, so the line a row starts on (csv's own count gives only where it ends)."""

    def __init__(self, text: str):
        self._lines = io.StringIO(text, newline="")
        self.count, self.first = 0, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.count += 1
        if self.first is None and line.strip("\r\n"):
            self.first = self.count
        return line


def _csv_table(path: Path, delimiter: str = ",", multiline: frozenset[str] = frozenset()):
    """(column names, rows): the decoded file's header, checked for a repeated name (csv.DictReader
    would keep the last column of that name), and a generator of (where, row) over its rows.

    A line break inside a field not in ``multiline`` is an error: it is how a stray quote shows
    (``7,"tv stand,...`` opens a field that swallows the rows after it, up to the next quote, such
    as an inch mark), and it would otherwise join those rows into one without a word.
    """
    lines = _Lines(_decode(path.read_bytes(), path))
    reader = csv.DictReader(lines, delimiter=delimiter)
    names = list(reader.fieldnames or ())
    # empty names are trailing separators, as spreadsheets write them: no column to mix up
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}:1: header repeats column(s) {', '.join(repeated)}")

    def rows():
        while True:
            lines.first = None
            row = next(reader, None)
            if row is None:
                return
            start, end = lines.first or lines.count, lines.count
            where = f"{path}:{end}"
            # before the width check: a quote left open to the end of the file leaves a short row
            broken = [k for k, v in row.items() if k not in multiline and isinstance(v, str)
                      and _LINE_BREAK.search(v)]
            if broken:
                raise DataError(f"{path}:{start}: one row runs over lines {start}-{end}: field "
                                f"{broken[0]!r} holds a line break (an unclosed '\"' on line {start}?); "
                                "quote such a field whole (\"...\", inner quotes doubled) or drop the quote")
            _check_width(row, where)
            yield where, row

    return names, rows()


def _check_width(row: dict, where: str) -> None:
    if None in row:  # DictReader files the extra fields under the key None
        raise DataError(f"{where}: more fields than the header names")
    if any(v is None for v in row.values()):  # and fills missing ones with None
        raise DataError(f"{where}: fewer fields than the header names")


def load_catalog(path: str | Path | None = None) -> dict[str, Product]:
    """Products by id from a JSONL(.gz) file or a data directory; default: the bundled copy."""
    path = Path(path) if path is not None else bundled_data_dir()
    if path.is_dir():
        wands = _wands_folder(path, catalog_only=True)
        if wands is not None:
            return _load_wands_catalog(wands / WANDS_PRODUCTS)
        path = _catalog_path(path)
    elif path.name == WANDS_PRODUCTS:
        return _load_wands_catalog(path)
    opener = gzip.open if path.suffix == ".gz" else open
    products: dict[str, Product] = {}
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a corrupt (not truncated) .gz
        raise DataError(f"{path}: cannot read catalog ({e})") from e
    for lineno, line in enumerate(_decode(data, path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        if "\\u" in line:  # only an escape makes a lone surrogate (half an emoji cut by a scraper),
            try:  # which no tokenizer takes and no UTF-8 file can hold
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{where}: a lone UTF-16 surrogate (a \\udXXX escape without its pair); "
                                "fix or drop that character") from None
        pid = row.get("product_id")
        if pid is not None and not isinstance(pid, str):  # pandas' to_json writes numeric ids as numbers
            raise DataError(f"{where}: 'product_id' must be a string, got {type(pid).__name__} {pid!r} "
                            "(quote ids in the file: a number loses leading zeros)")
        if pid is None or not pid.strip():
            raise DataError(f"{where}: missing or empty 'product_id'")
        pid = pid.strip()  # as the judgments' ids are
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(f"{where}: product {pid!r}: 'title' must be a string, got {type(title).__name__}")
        if title is None or not title.strip():
            raise DataError(f"{where}: product {pid!r} has a missing or empty 'title'")
        if pid in products:
            raise DataError(f"{where}: duplicate product_id {pid!r}")
        products[pid] = Product(
            product_id=pid,
            title=title,
            description=_text_field(row, "description", where),
            bullets=_bullets(row.get("bullet_points"), where),
            brand=_text_field(row, "brand", where),
            color=_text_field(row, "color", where),
        )
    if not products:
        raise DataError(f"{path}: catalog is empty")
    return products


def _grade(row: dict, where: str) -> tuple[int, str | None]:
    raw_grade = (row.get("grade") or "").strip()
    label = (row.get("esci_label") or "").strip().upper() or None
    if label is not None and label not in ESCI_GRADES:
        raise DataError(f"{where}: esci_label {label!r} is not one of E, S, C, I")
    if raw_grade:
        try:
            grade = int(raw_grade)
        except ValueError:
            raise DataError(f"{where}: grade {raw_grade!r} is not an integer") from None
        if not 0 <= grade <= MAX_GRADE:
            raise DataError(f"{where}: grade {grade} is outside 0..{MAX_GRADE}")
        if label is not None and ESCI_GRADES[label] != grade:
            raise DataError(
                f"{where}: grade {grade} disagrees with esci_label {label} ({ESCI_GRADES[label]})"
            )
        return grade, label
    if label is not None:
        return ESCI_GRADES[label], label
    raise DataError(f"{where}: row has neither a grade nor an esci_label")


def load_judgments(
    path: str | Path | None = None, catalog: dict[str, Product] | None = None
) -> list[Judgment]:
    """Judgments in file order from a CSV file or a data directory; default: the bundled copy.

    With ``catalog`` given, a judgment naming a product the catalog lacks is an error.
    """
    path = Path(path) if path is not None else bundled_data_dir()
    if path.is_dir():
        wands = _wands_folder(path)
        if wands is not None:
            return _load_wands_judgments(wands, catalog)
        path = path / JUDGMENTS_NAME
    judgments: list[Judgment] = []
    seen: set[tuple[str, str]] = set()
    query_text: dict[str, str] = {}
    try:
        names, rows = _csv_table(path)
        columns = set(names)
        missing = {"query_id", "query", "product_id"} - columns
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {', '.join(sorted(missing))}")
        if not columns & {"grade", "esci_label"}:
            raise DataError(f"{path}:1: header needs a 'grade' or an 'esci_label' column")
        for where, row in rows:
            qid = (row.get("query_id") or "").strip()
            query = (row.get("query") or "").strip()
            pid = (row.get("product_id") or "").strip()
            if not qid or not query or not pid:
                raise DataError(f"{where}: empty query_id, query or product_id")
            grade, label = _grade(row, where)
            if catalog is not None and pid not in catalog:
                raise DataError(f"{where}: product {pid!r} is not in the catalog")
            if query_text.setdefault(qid, query) != query:
                raise DataError(f"{where}: query_id {qid} was {query_text[qid]!r}, now {query!r}")
            if (qid, pid) in seen:
                raise DataError(f"{where}: product {pid!r} judged twice for query_id {qid}")
            seen.add((qid, pid))
            judgments.append(Judgment(qid, query, pid, grade, label))
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read judgments ({e})") from e
    if not judgments:
        raise DataError(f"{path}: no judgments")
    return judgments


def _wands_rows(path: Path, required: set[str]):
    """(where, row) of a WANDS tab-separated file, its header checked for ``required``; only the
    product texts may span lines."""
    names, rows = _csv_table(path, delimiter="\t",
                             multiline=frozenset({"product_description", "product_features"}))
    missing = required - set(names)
    if missing:
        raise DataError(f"{path}:1: header lacks column(s) {', '.join(sorted(missing))} "
                        f"(is it tab-separated?)")
    for where, row in rows:
        yield where, {k: v.strip() for k, v in row.items()}


def _wands_features(value: str) -> tuple[str, ...]:
    # "overallwidth-sidetoside:64.7|producttype : slow cooker| : gray wood" -> "key: value" bullets
    bullets = []
    for item in value.split("|"):
        key, sep, val = item.partition(":")
        key, val = (key.strip(), val.strip()) if sep else ("", key.strip())
        if val:
            bullets.append(f"{key}: {val}" if key else val)
    return tuple(bullets)


def _load_wands_catalog(path: Path) -> dict[str, Product]:
    products: dict[str, Product] = {}
    try:
        for where, row in _wands_rows(path, {"product_id", "product_name"}):
            pid, title = row["product_id"], row["product_name"]
            if not pid:
                raise DataError(f"{where}: empty product_id")
            if not title:
                raise DataError(f"{where}: product {pid!r} has an empty product_name")
            if pid in products:
                raise DataError(f"{where}: duplicate product_id {pid!r}")
            products[pid] = Product(
                product_id=pid,
                title=title,
                description=row.get("product_description", ""),
                bullets=_wands_features(row.get("product_features", "")),
            )
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read WANDS products ({e})") from e
    if not products:
        raise DataError(f"{path}: catalog is empty")
    return products


def _load_wands_judgments(folder: Path, catalog: dict[str, Product] | None) -> list[Judgment]:
    queries: dict[str, str] = {}
    judgments: list[Judgment] = []
    seen: set[tuple[str, str]] = set()
    path = folder / WANDS_QUERIES
    try:
        for where, row in _wands_rows(path, {"query_id", "query"}):
            qid, query = row["query_id"], row["query"]
            if not qid or not query:
                raise DataError(f"{where}: empty query_id or query")
            if qid in queries:
                raise DataError(f"{where}: duplicate query_id {qid}")
            queries[qid] = query
        path = folder / WANDS_LABELS
        for where, row in _wands_rows(path, {"query_id", "product_id", "label"}):
            qid, pid, label = row["query_id"], row["product_id"], row["label"]
            if not qid or not pid:
                raise DataError(f"{where}: empty query_id or product_id")
            if qid not in queries:
                raise DataError(f"{where}: query_id {qid} is not in {WANDS_QUERIES}")
            if label.lower() not in WANDS_GRADES:
                raise DataError(f"{where}: label {label!r} is not one of Exact, Partial, Irrelevant")
            if catalog is not None and pid not in catalog:
                raise DataError(f"{where}: product {pid!r} is not in the catalog")
            if (qid, pid) in seen:
                raise DataError(f"{where}: product {pid!r} judged twice for query_id {qid}")
            seen.add((qid, pid))
            judgments.append(Judgment(qid, queries[qid], pid, WANDS_GRADES[label.lower()], label))
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read WANDS judgments ({e})") from e
    if not judgments:
        raise DataError(f"{folder / WANDS_LABELS}: no judgments")
    return judgments


def load_dataset(data_dir: str | Path | None = None) -> tuple[dict[str, Product], list[Judgment]]:
    """Catalog and judgments of one data directory, cross-checked; default: the bundled copy."""
    data_dir = Path(data_dir) if data_dir is not None else bundled_data_dir()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    catalog = load_catalog(data_dir)
    return catalog, load_judgments(data_dir, catalog)


def group_by_query(judgments: Iterable[Judgment]) -> dict[str, list[Judgment]]:
    """Judgments per query id, queries and candidates in first-seen order."""
    groups: dict[str, list[Judgment]] = {}
    for j in judgments:
        groups.setdefault(j.query_id, []).append(j)
    return groups


def data_digest(by_query: dict[str, list[Judgment]], catalog: dict[str, Product], query_ids) -> str:
    """sha256 of what a run trains and validates on: the judgments of ``query_ids`` and the texts of
    their products, so a finished CV fold or a resumed run continues only on the same data (edited
    grades or product texts included), whatever path names it."""
    h = hashlib.sha256()
    for q in sorted(query_ids):
        for j in sorted(by_query[q], key=lambda j: j.product_id):
            h.update(json.dumps([q, j.query, j.product_id, j.grade, *_text_fields(catalog[j.product_id])])
                     .encode("utf-8"))
    return h.hexdigest()


def catalog_digest(catalog: dict[str, Product]) -> str:
    """sha256 of every product's id and texts: summaries are appended only to a file made from the
    same texts, whatever path names the catalog."""
    h = hashlib.sha256()
    for pid in sorted(catalog):
        h.update(json.dumps([pid, *_text_fields(catalog[pid])]).encode("utf-8"))
    return h.hexdigest()


def _text_fields(p: Product) -> list:
    return [p.title, p.description, list(p.bullets), p.brand, p.color]


def _query_groups(query_ids: Sequence[str], query_texts: Mapping[str, str] | None) -> list[list[str]]:
    """The distinct ids, sorted, as groups that must stay on one side of a split: ids whose query
    texts match up to case and spacing ("Query 3", "query  3") form one group, ordered by its
    first id (without texts, or without such duplicates, each id alone)."""
    ids = sorted(set(query_ids))
    if query_texts is None:
        return [[i] for i in ids]
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(" ".join(query_texts[i].casefold().split()), []).append(i)
    return sorted(groups.values())


def split_queries(
    query_ids: Sequence[str], val_fraction: float = 0.2, seed: int = 0,
    query_texts: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) split of distinct query ids.

    The ids are sorted before the seeded shuffle, so the split depends on the set of ids and the
    seed only, not on file order.  Validation gets ``round(val_fraction * n)`` queries, at least one.
    ``query_texts`` (id -> text): ids of one query text (up to case and spacing) go to the same side,
    counted as one query; data without such duplicates splits exactly as without it.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = _query_groups(query_ids, query_texts)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 distinct queries to split, got {len(groups)}")
    random.Random(seed).shuffle(groups)
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    return sorted(i for g in groups[n_val:] for i in g), sorted(i for g in groups[:n_val] for i in g)


def fold_queries(
    query_ids: Sequence[str], folds: int, fold: int, seed: int = 0,
    query_texts: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """(train, validation) of fold ``fold`` in a deterministic ``folds``-fold split of the query ids.

    Same sort and seeded shuffle as ``split_queries``, then dealt round-robin, so the folds' validation
    sets are disjoint, cover every query once and differ in size by at most one.  Cross-validation
    is how a few hundred labelled queries give a verdict: every query is validated once.
    ``query_texts``: as in ``split_queries``.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds}), got {fold}")
    groups = _query_groups(query_ids, query_texts)
    if len(groups) < folds:
        raise ValueError(f"need at least {folds} distinct queries for {folds} folds, got {len(groups)}")
    random.Random(seed).shuffle(groups)
    val = {i for g in groups[fold::folds] for i in g}
    return sorted(i for g in groups for i in g if i not in val), sorted(val)
