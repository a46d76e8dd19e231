import gzip
import json

import pytest

from relsum_core.data import (
    DataError,
    Judgment,
    Product,
    bundled_data_dir,
    catalog_digest,
    data_digest,
    fold_queries,
    group_by_query,
    load_catalog,
    load_dataset,
    load_judgments,
    split_queries,
)

HEADER = "query_id,query,product_id,esci_label,grade\n"


def write_catalog(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path):
    write_catalog(
        tmp_path / "products.jsonl",
        [
            {
                "product_id": "p1",
                "title": "Red shoe",
                "bullet_points": "Leather\n\nSize 9",
                "description": "A shoe.",
            },
            {"product_id": "p2", "title": "Blue towel", "bullet_points": ["Cotton", "  "]},
            {"product_id": "p3", "title": "Lamp", "description": None},
        ],
    )
    (tmp_path / "judgments.csv").write_text(HEADER + "1,red shoe,p1,E,3\n1,red shoe,p2,I,0\n2,towel,p2,E,3\n")
    return tmp_path


def test_bundled_dataset_loads_as_documented():
    catalog, judgments = load_dataset()
    assert bundled_data_dir().joinpath("README.md").is_file()
    assert len(catalog) == 6764
    assert len(judgments) == 4833
    assert len(group_by_query(judgments)) == 110
    assert {j.grade for j in judgments} == {0, 1, 2, 3}
    assert all({"E": 3, "S": 2, "C": 1, "I": 0}[j.label] == j.grade for j in judgments)


def test_small_dataset_fields(data_dir):
    catalog, judgments = load_dataset(data_dir)
    assert catalog["p1"].bullets == ("Leather", "Size 9")
    assert catalog["p2"].bullets == ("Cotton",)
    assert catalog["p3"].description == ""
    assert [(j.query_id, j.product_id, j.grade, j.label) for j in judgments] == [
        ("1", "p1", 3, "E"), ("1", "p2", 0, "I"), ("2", "p2", 3, "E")
    ]
    assert list(group_by_query(judgments)) == ["1", "2"]


def test_gzip_catalog(tmp_path):
    with gzip.open(tmp_path / "products.jsonl.gz", "wt") as f:
        f.write(json.dumps({"product_id": "a", "title": "T"}) + "\n")
    assert list(load_catalog(tmp_path)) == ["a"]
    # beside a plain catalog, one of the two is stale: neither is picked silently
    write_catalog(tmp_path / "products.jsonl", [{"product_id": "b", "title": "T"}])
    with pytest.raises(DataError, match="holds products.jsonl.gz and products.jsonl; keep one catalog file"):
        load_catalog(tmp_path)


def _gzip_catalog():
    return gzip.compress(b"".join(json.dumps({"product_id": f"p{i}", "title": "T" * 50}).encode() + b"\n"
                                  for i in range(200)))


def test_a_truncated_gzip_catalog_is_a_data_error(tmp_path):
    data = _gzip_catalog()
    (tmp_path / "products.jsonl.gz").write_bytes(data[: len(data) // 2])  # EOFError from gzip
    with pytest.raises(DataError, match="cannot read catalog"):
        load_catalog(tmp_path)


def test_a_corrupt_gzip_catalog_is_a_data_error(tmp_path):
    data = bytearray(_gzip_catalog())
    data[20:60] = bytes(b ^ 0xFF for b in data[20:60])  # zlib.error from the deflate stream
    (tmp_path / "products.jsonl.gz").write_bytes(data)
    with pytest.raises(DataError, match="cannot read catalog"):
        load_catalog(tmp_path)


def test_a_catalog_of_blank_lines_is_empty(tmp_path):
    (tmp_path / "products.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="catalog is empty"):
        load_catalog(tmp_path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"title": "no id"}, "missing or empty 'product_id'"),
        ({"product_id": "x", "title": "  "}, "missing or empty 'title'"),
        ({"product_id": "x"}, "missing or empty 'title'"),
        ('{"product_id": "x", "title": ', "not valid JSON"),
        ({"product_id": "p1", "title": "dup"}, "duplicate product_id 'p1'"),
        ({"product_id": "x", "title": "t", "bullet_points": 7}, "bullet_points"),
        ({"product_id": "x", "title": "t", "bullet_points": ["ok", 3]},
         "'bullet_points' must be a string or a list of strings"),
        ({"product_id": "x", "title": "t", "description": 3}, "'description' must be a string"),
        ({"product_id": 7, "title": "t"}, r"'product_id' must be a string, got int 7 \(quote ids"),
        ({"product_id": "x", "title": 8675309}, "product 'x': 'title' must be a string, got int"),
        # half an emoji cut by a scraper: json.loads makes a lone surrogate the tokenizer fails on
        ('{"product_id": "x", "title": "red shirt \\ud83d"}', "lone UTF-16 surrogate"),
    ],
)
def test_bad_catalog_rows_name_file_and_line(tmp_path, row, message):
    path = write_catalog(tmp_path / "products.jsonl", [{"product_id": "p1", "title": "ok"}, "", row])
    with pytest.raises(DataError, match=message) as e:
        load_catalog(path)
    assert f"{path}:3:" in str(e.value)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1,red shoe,p1,E,x\n", "grade 'x' is not an integer"),
        ("1,red shoe,p1,,5\n", "grade 5 is outside 0..3"),
        ("1,red shoe,p1,,-1\n", "grade -1 is outside 0..3"),
        ("1,red shoe,p1,Q,3\n", "esci_label 'Q'"),
        ("1,red shoe,p1,S,3\n", "disagrees with esci_label S"),
        ("1,red shoe,p1,,\n", "neither a grade nor an esci_label"),
        ("1,red shoe,nope,E,3\n", "product 'nope' is not in the catalog"),
        ("1,,p1,E,3\n", "empty query_id, query or product_id"),
        ("1,other text,p3,E,3\n", "query_id 1 was 'red shoe'"),
        ("1,red shoe,p2,E,3\n", "judged twice"),
        ("1,red shoe,p3,E,3,extra\n", "more fields"),
        ("1,red shoe,p3\n", "fewer fields"),
    ],
)
def test_bad_judgment_rows_name_file_and_line(data_dir, line, message):
    path = data_dir / "judgments.csv"
    path.write_text(HEADER + "1,red shoe,p2,I,0\n" + line)
    with pytest.raises(DataError, match=message) as e:
        load_judgments(path, load_catalog(data_dir))
    assert f"{path}:3:" in str(e.value)


def test_spreadsheet_byte_order_mark_and_bad_utf8_name_the_line(data_dir):
    path = data_dir / "judgments.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"1,red shoe,p1,E,3\n")
    assert load_judgments(path)[0].query_id == "1"  # the BOM is not part of the first column's name
    path.write_bytes(HEADER.encode() + b"1,red shoe,p1,E,3\n2,caf\xe9,p2,E,3\n")
    with pytest.raises(DataError, match=f"{path}:3: not valid UTF-8"):
        load_judgments(path)
    catalog = data_dir / "products.jsonl"
    catalog.write_bytes(b'{"product_id": "a", "title": "ok"}\n{"product_id": "b", "title": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"{catalog}:2: not valid UTF-8"):
        load_catalog(catalog)


def test_label_only_and_grade_only_columns(data_dir):
    path = data_dir / "judgments.csv"
    path.write_text("query_id,query,product_id,esci_label\n1,q,p1,S\n")
    assert load_judgments(path)[0].grade == 2
    path.write_text("query_id,query,product_id,grade\n1,q,p1,1\n")
    j = load_judgments(path)[0]
    assert (j.grade, j.label) == (1, None)
    path.write_text("query_id,query,product_id\n1,q,p1\n")
    with pytest.raises(DataError, match="needs a 'grade' or an 'esci_label'"):
        load_judgments(path)


def test_esci_labels_are_read_in_any_case(data_dir):
    path = data_dir / "judgments.csv"
    path.write_text(HEADER + "1,red shoe,p1,e,\n1,red shoe,p2, s ,2\n")
    assert [(j.grade, j.label) for j in load_judgments(path)] == [(3, "E"), (2, "S")]


def test_a_judgments_header_without_product_id_names_it(data_dir):
    # not every row failing as one with an empty product_id
    path = data_dir / "judgments.csv"
    path.write_text("query_id,query,grade\n1,red shoe,3\n")
    with pytest.raises(DataError, match=rf"{path}:1: header lacks column\(s\) product_id"):
        load_judgments(path)


def test_a_judgments_file_without_rows_is_an_error(data_dir):
    path = data_dir / "judgments.csv"
    path.write_text(HEADER)
    with pytest.raises(DataError, match=f"{path}: no judgments"):
        load_judgments(path)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="no catalog file"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "absent")


def test_a_data_directory_without_judgments_is_a_data_error(data_dir):
    # a DataError, not a FileNotFoundError
    (data_dir / "judgments.csv").unlink()
    with pytest.raises(DataError, match="judgments.csv: cannot read judgments"):
        load_dataset(data_dir)


def test_split_is_deterministic_disjoint_and_order_free():
    ids = [str(i) for i in range(110)]
    train, val = split_queries(ids, 0.2, seed=0)
    assert len(val) == 22 and len(train) == 88
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert split_queries(list(reversed(ids)) + ids[:5], 0.2, seed=0) == (train, val)
    assert split_queries(ids, 0.2, seed=1)[1] != val
    assert len(split_queries(["a", "b"], 0.01)[1]) == 1
    with pytest.raises(ValueError):
        split_queries(ids, 1.0)
    with pytest.raises(ValueError):
        split_queries(["a"], 0.5)


def test_a_split_always_leaves_a_training_query():
    train, val = split_queries(["a", "b"], 0.9)  # 0.9 * 2 rounds to 2 validation queries: 1 is kept
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_queries(["a", "b", "c"], 0.0)


def test_as_many_folds_as_queries():
    # leave-one-out is a valid split
    vals = [fold_queries(["a", "b", "c"], 3, f)[1] for f in range(3)]
    assert sorted(v for val in vals for v in val) == ["a", "b", "c"] and all(len(v) == 1 for v in vals)


def test_folds_cover_every_query_once():
    ids = [str(i) for i in range(110)]
    vals = [fold_queries(ids, 5, f, seed=0)[1] for f in range(5)]
    assert [len(v) for v in vals] == [22] * 5
    assert sorted(q for v in vals for q in v) == sorted(ids)
    train, val = fold_queries(ids, 5, 3, seed=0)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert fold_queries(list(reversed(ids)) + ids[:5], 5, 3, seed=0) == (train, val)
    assert fold_queries(ids, 5, 3, seed=1)[1] != val
    assert sorted(len(fold_queries(ids[:7], 3, f)[1]) for f in range(3)) == [2, 2, 3]
    for folds, fold, n in ((1, 0, 10), (5, 5, 10), (5, -1, 10), (5, 0, 4)):
        with pytest.raises(ValueError, match="fold"):
            fold_queries(ids[:n], folds, fold)


# WANDS as its repository ships it: tab-separated, csv-quoted where a field holds a quote, empty
# cells for missing values, a header with a space in it.
WANDS_PRODUCTS = (
    "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\tproduct_features"
    "\trating_count\taverage_rating\treview_count\n"
    "0\tsolid wood platform bed\tBeds\tFurniture / Bedroom Furniture\tgood , deep sleep\t"
    "overallwidth-sidetoside:64.7|producttype : bed| : gray wood|emptyvalue: |\t15.0\t4.5\t15.0\n"
    '1\t"fawkes 36"" blue vanity"\tVanities|Bath\t\t\tcolor : blue\t\t\t\n'
    "2\tall-clad 7 qt . slow cooker\tSlow Cookers\tKitchen\tcreate delicious meals\t\t100.0\t2.0\t98.0\n"
)
WANDS_QUERIES = "query_id\tquery\tquery_class\n0\tsalon chair\tMassage Chairs\n1\tblue vanity\t\n"
WANDS_LABELS = "id\tquery_id\tproduct_id\tlabel\n0\t1\t1\tExact\n1\t1\t0\tIrrelevant\n2\t0\t0\tPartial\n"


@pytest.fixture
def wands_repo(tmp_path):
    """A clone of the WANDS repository: the files sit in its dataset/ folder."""
    folder = tmp_path / "WANDS" / "dataset"
    folder.mkdir(parents=True)
    (folder / "product.csv").write_text(WANDS_PRODUCTS)
    (folder / "query.csv").write_text(WANDS_QUERIES)
    (folder / "label.csv").write_text(WANDS_LABELS)
    return tmp_path / "WANDS"


def test_wands_folder_loads_with_esci_grades(wands_repo):
    for where in (wands_repo, wands_repo / "dataset"):  # the repository or its dataset/ folder
        catalog, judgments = load_dataset(where)
        assert list(catalog) == ["0", "1", "2"]
        bed, vanity = catalog["0"], catalog["1"]
        assert (bed.title, bed.description) == ("solid wood platform bed", "good , deep sleep")
        assert bed.bullets == ("overallwidth-sidetoside: 64.7", "producttype: bed", "gray wood")
        assert vanity.title == 'fawkes 36" blue vanity'  # csv-quoted, its quote doubled
        assert (vanity.description, vanity.bullets) == ("", ("color: blue",))
        assert catalog["2"].bullets == ()
        assert [(j.query_id, j.query, j.product_id, j.grade, j.label) for j in judgments] == [
            ("1", "blue vanity", "1", 3, "Exact"),
            ("1", "blue vanity", "0", 0, "Irrelevant"),
            ("0", "salon chair", "0", 2, "Partial"),
        ]
    assert list(load_catalog(wands_repo / "dataset" / "product.csv")) == ["0", "1", "2"]
    (wands_repo / "dataset" / "query.csv").write_text("\ufeff" + WANDS_QUERIES)  # a byte-order mark
    assert len(load_dataset(wands_repo)[1]) == 3


@pytest.mark.parametrize(
    "name, line, message",
    [
        ("label.csv", "3\t1\t2\tMaybe\n", "label 'Maybe' is not one of Exact, Partial, Irrelevant"),
        ("label.csv", "3\t7\t2\tExact\n", "query_id 7 is not in query.csv"),
        ("label.csv", "3\t1\t9\tExact\n", "product '9' is not in the catalog"),
        ("label.csv", "3\t1\t1\tPartial\n", "product '1' judged twice for query_id 1"),
        ("label.csv", "3\t1\t2\tExact\textra\n", "more fields"),
        ("query.csv", "0\tother\tX\n", "duplicate query_id 0"),
        ("query.csv", "5\t\tX\n", "empty query_id or query"),
        ("product.csv", "3\t\tBeds\t\t\t\t\t\t\n", "product '3' has an empty product_name"),
        ("product.csv", "2\tagain\tBeds\t\t\t\t\t\t\n", "duplicate product_id '2'"),
        ("product.csv", "\tlamp\tLamps\t\t\t\t\t\t\n", "empty product_id"),
        ("label.csv", "3\t1\t\tExact\n", "empty query_id or product_id"),
    ],
)
def test_bad_wands_rows_name_file_and_line(wands_repo, name, line, message):
    path = wands_repo / "dataset" / name
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines) + line)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(wands_repo)
    assert f"{path}:{len(lines) + 1}:" in str(e.value)


def test_wands_folder_missing_a_file_or_comma_separated(wands_repo):
    (wands_repo / "dataset" / "query.csv").unlink()
    with pytest.raises(DataError, match="a WANDS folder without query.csv"):
        load_dataset(wands_repo)
    assert len(load_catalog(wands_repo)) == 3  # the products are all a catalog reads (summarize)
    (wands_repo / "dataset" / "query.csv").write_text("query_id,query,query_class\n0,salon chair,X\n")
    with pytest.raises(DataError, match=r"query.csv:1: header lacks column\(s\) query, query_id "
                                        r"\(is it tab-separated\?\)"):
        load_dataset(wands_repo)


def test_wands_cells_are_stripped(wands_repo):
    labels = wands_repo / "dataset" / "label.csv"
    labels.write_text(WANDS_LABELS + "3\t0\t2\t Exact \n")
    assert load_dataset(wands_repo)[1][-1].grade == 3


def test_esci_files_win_over_a_stray_wands_products_file(data_dir):
    # a product.csv beside products.jsonl and judgments.csv does not make the folder a WANDS one
    (data_dir / "product.csv").write_text(WANDS_PRODUCTS)
    catalog, judgments = load_dataset(data_dir)
    assert sorted(catalog) == ["p1", "p2", "p3"] and len(judgments) == 3


def test_validation_share_is_rounded_not_truncated():
    train, val = split_queries([f"q{i:02d}" for i in range(13)], val_fraction=0.2)
    assert len(val) == 3 and len(train) == 10  # 13 * 0.2 = 2.6 -> 3


def test_a_stray_quote_is_an_error_not_rows_joined_into_one(data_dir):
    """csv would read `"tv stand,...` as a quoted field running on to the next quote (an inch mark),
    three judgment rows silently becoming one."""
    path = data_dir / "judgments.csv"
    path.write_text(HEADER + '1,"red shoe,p1,E,3\n2,towel,p2,E,3\n3,24" lamp,p3,E,3\n')
    with pytest.raises(DataError, match=rf"{path}:2: one row runs over lines 2-4: field 'query' holds a "
                                        r"line break \(an unclosed '\"' on line 2\?\)"):
        load_judgments(path)
    path.write_text(HEADER + '1,"red shoe, 9"" wide",p1,E,3\n2,24" lamp,p3,E,3\n')  # csv quoting: fine
    assert [j.query for j in load_judgments(path)] == ['red shoe, 9" wide', '24" lamp']


def test_a_repeated_header_column_is_an_error(data_dir, wands_repo):
    path = data_dir / "judgments.csv"
    path.write_text("query_id,query,product_id,grade,grade\n1,red shoe,p1,3,0\n")
    with pytest.raises(DataError, match=rf"{path}:1: header repeats column\(s\) grade"):
        load_judgments(path)
    labels = wands_repo / "dataset" / "label.csv"
    labels.write_text("id\tquery_id\tproduct_id\tlabel\tlabel\n0\t1\t1\tExact\tIrrelevant\n")
    with pytest.raises(DataError, match=r"label.csv:1: header repeats column\(s\) label"):
        load_dataset(wands_repo)


def test_wands_product_texts_may_span_lines_but_names_may_not(wands_repo):
    path = wands_repo / "dataset" / "product.csv"
    path.write_text(WANDS_PRODUCTS + '3\tlamp\tLamps\t\t"two\nlines"\t\t\t\t\n')
    assert load_catalog(path)["3"].description == "two\nlines"
    path.write_text(WANDS_PRODUCTS + '3\t"lamp\tLamps\t\t\t\t\t\t\n4\tdesk"\tDesks\t\t\t\t\t\t\n')
    with pytest.raises(DataError, match="field 'product_name' holds a line break"):
        load_catalog(path)


def test_a_whole_surrogate_pair_escape_loads(tmp_path):
    path = write_catalog(tmp_path / "p.jsonl", ['{"product_id": "x", "title": "smile \\ud83d\\ude00"}'])
    assert load_catalog(path)["x"].title == "smile \U0001f600"


def test_catalog_ids_are_stripped_like_the_judgments_ids(data_dir):
    write_catalog(data_dir / "products.jsonl", [{"product_id": " p1 ", "title": "Red shoe"},
                                                {"product_id": "p2", "title": "Blue towel"},
                                                {"product_id": "p3", "title": "Lamp"}])
    catalog, judgments = load_dataset(data_dir)
    assert "p1" in catalog and judgments[0].product_id == "p1"


def test_one_query_text_under_two_ids_stays_on_one_side_of_every_split():
    texts = {f"q{i:02d}": f"query {i}" for i in range(20)}
    ids = list(texts)
    # without duplicates the texts change nothing
    assert split_queries(ids, 0.2, seed=3, query_texts=texts) == split_queries(ids, 0.2, seed=3)
    assert fold_queries(ids, 4, 1, seed=3, query_texts=texts) == fold_queries(ids, 4, 1, seed=3)
    texts |= {"x1": "Query 3", "x2": "query   3 ", "x3": "QUERY 7"}
    ids = list(texts)
    for seed in range(6):
        train, val = split_queries(ids, 0.2, seed=seed, query_texts=texts)
        assert sorted(train + val) == sorted(ids)
        for group in ({"q03", "x1", "x2"}, {"q07", "x3"}):
            assert group <= set(train) or group <= set(val), (seed, group)
        for fold in range(4):
            train, val = fold_queries(ids, 4, fold, seed=seed, query_texts=texts)
            assert {"q03", "x1", "x2"} <= set(train) or {"q03", "x1", "x2"} <= set(val)
    # and ids alone would have split a pair apart for some seed
    assert any(len({"q03", "x1", "x2"} & set(split_queries(ids, 0.2, seed=s)[1])) in (1, 2) for s in range(6))


def test_trailing_separators_and_a_quote_left_open_to_the_end(data_dir):
    path = data_dir / "judgments.csv"
    path.write_text("query_id,query,product_id,grade,,\n1,red shoe,p1,3,,\n2,towel,p2,3,,\n")
    assert [j.product_id for j in load_judgments(path)] == ["p1", "p2"]  # a spreadsheet's empty columns
    path.write_text(HEADER + '1,"red shoe,p1,E,3\n2,towel,p2,E,3\n')
    with pytest.raises(DataError, match=rf"{path}:2: one row runs over lines 2-3: field 'query'"):
        load_judgments(path)


def test_the_line_a_broken_row_starts_on_counts_blank_lines(data_dir):
    path = data_dir / "judgments.csv"
    # a blank line before the broken row, the quote left open to the end of the file
    path.write_text(HEADER + '1,ok,p1,E,3\n\n1,"red shoe\nstill,p2,E,3\n2,towel,p3,E,3\n')
    with pytest.raises(DataError, match=rf"{path}:4: one row runs over lines 4-6"):
        load_judgments(path)
    # a blank line before a broken row whose quote does close
    path.write_text(HEADER + '1,ok,p1,E,3\n\n1,"red\nshoe",p2,E,3\n')
    with pytest.raises(DataError, match=rf"{path}:4: one row runs over lines 4-5"):
        load_judgments(path)


def test_query_groups_are_what_the_split_counts():
    texts = {f"q{i:02d}": f"query {i}" for i in range(20)} | {"a": "Query 1", "b": "query 2", "c": "QUERY 3"}
    ids = list(texts)
    for seed in range(3):
        _, val = split_queries(ids, 0.2, seed=seed, query_texts=texts)
        groups = {" ".join(texts[i].casefold().split()) for i in val}
        assert len(groups) == round(0.2 * 20)  # 20 distinct texts, not 23 ids
    with pytest.raises(ValueError, match="at least 2 distinct queries"):
        split_queries(["x", "y"], 0.5, query_texts={"x": "lamp", "y": "Lamp"})
    with pytest.raises(ValueError, match="at least 3 distinct queries for 3 folds"):
        fold_queries(["w", "x", "y", "z"], 3, 0, query_texts={"w": "a", "x": "A", "y": "b", "z": "B"})


def test_digests_follow_brand_and_colour():
    catalog = {"a": Product("a", "shirt", brand="Acme", color="red")}
    by_query = {"q": [Judgment("q", "shirt", "a", 3)]}
    for edit in ({"brand": "Bolt"}, {"color": "blue"}):
        other = {"a": Product("a", "shirt", **({"brand": "Acme", "color": "red"} | edit))}
        assert catalog_digest(other) != catalog_digest(catalog)
        assert data_digest(by_query, other, ["q"]) != data_digest(by_query, catalog, ["q"])
