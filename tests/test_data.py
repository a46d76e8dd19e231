import gzip
import json

import pytest

from relsum_core.data import (
    DataError,
    bundled_data_dir,
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


@pytest.mark.parametrize(
    "row, message",
    [
        ({"title": "no id"}, "missing or empty 'product_id'"),
        ({"product_id": "x", "title": "  "}, "missing or empty 'title'"),
        ({"product_id": "x"}, "missing or empty 'title'"),
        ('{"product_id": "x", "title": ', "not valid JSON"),
        ({"product_id": "p1", "title": "dup"}, "duplicate product_id 'p1'"),
        ({"product_id": "x", "title": "t", "bullet_points": 7}, "bullet_points"),
        ({"product_id": "x", "title": "t", "description": 3}, "'description' must be a string"),
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
        ("1,red shoe,p1,Q,3\n", "esci_label 'Q'"),
        ("1,red shoe,p1,S,3\n", "disagrees with esci_label S"),
        ("1,red shoe,p1,,\n", "neither a grade nor an esci_label"),
        ("1,red shoe,nope,E,3\n", "product 'nope' is not in the catalog"),
        ("1,,p1,E,3\n", "empty query_id, query or product_id"),
        ("1,other text,p3,E,3\n", "query_id 1 was 'red shoe'"),
        ("1,red shoe,p2,E,3\n", "judged twice"),
        ("1,red shoe,p3,E,3,extra\n", "more fields"),
    ],
)
def test_bad_judgment_rows_name_file_and_line(data_dir, line, message):
    path = data_dir / "judgments.csv"
    path.write_text(HEADER + "1,red shoe,p2,I,0\n" + line)
    with pytest.raises(DataError, match=message) as e:
        load_judgments(path, load_catalog(data_dir))
    assert f"{path}:3:" in str(e.value)


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


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="no catalog file"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "absent")


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
