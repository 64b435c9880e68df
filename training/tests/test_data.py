import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_training.data import MOVIELENS_FILES, DataError, convert_movielens, load_dataset
from conftest import write_csv


def test_small_dataset_loads_with_attributes(small_dataset):
    dataset = load_dataset(small_dataset)
    assert len(dataset.items) == 40
    assert len(dataset.interactions) == 60 * 8
    assert dataset.users["1"].gender == "M"
    assert dataset.items[25].genres == ["Comedy", "Romance"]
    assert len(dataset.sha256) == 64


def test_missing_column_names_the_file_and_column(small_dataset):
    write_csv(small_dataset / "interactions.csv", ["user_id", "item_id"], [["1", "2"]])
    with pytest.raises(DataError, match=r"interactions\.csv: missing column\(s\) timestamp"):
        load_dataset(small_dataset)


def test_bad_value_names_file_row_and_column(small_dataset):
    write_csv(small_dataset / "interactions.csv", ["user_id", "item_id", "timestamp"], [["1", "2", "100"], ["1", "3", "yesterday"]])
    with pytest.raises(DataError, match=r"interactions\.csv: row 3, column timestamp: 'yesterday' is not a valid int"):
        load_dataset(small_dataset)


def test_empty_file_is_reported(small_dataset):
    (small_dataset / "interactions.csv").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_dataset(small_dataset)


def test_unknown_item_is_reported(small_dataset):
    write_csv(small_dataset / "interactions.csv", ["user_id", "item_id", "timestamp"], [["1", "999", "100"]])
    with pytest.raises(DataError, match="item '999' is not in items.csv"):
        load_dataset(small_dataset)


def test_movielens_conversion_produces_the_project_format(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    names = {key: raw / value.split("/")[-1] for key, value in MOVIELENS_FILES.items()}
    pq.write_table(pa.table({"user_id": [1, 2], "movie_id": [10, 10], "rating": [4, 5], "timestamp": [100, 200]}), names["ratings"])
    item = {"movie_id": [10], "movie_title": ["Heat (1995)"], "release_date": ["01-Jan-1995"], "Action": [1], "Crime": [1], "Comedy": [0]}
    pq.write_table(pa.table(item), names["items"])
    pq.write_table(pa.table({"user_id": [1, 2], "age": [30, 40], "gender": ["M", "F"], "occupation": ["writer", "other"], "zip_code": ["1", "2"]}), names["users"])
    out = tmp_path / "out"
    convert_movielens(raw, out)
    dataset = load_dataset(out)
    assert [i.item_id for i in dataset.interactions] == ["10", "10"]
    assert dataset.items[0].genres == ["Action", "Crime"]
    assert dataset.items[0].year == 1995
    assert dataset.users["2"].occupation == "other"


def test_parquet_tables_load_and_bad_values_are_named(small_dataset, tmp_path):
    import csv

    data = tmp_path / "parquet"
    data.mkdir()
    for stem in ("interactions", "items", "users"):
        with open(small_dataset / f"{stem}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        if stem == "interactions":
            columns["timestamp"] = [int(v) for v in columns["timestamp"]]
        pq.write_table(pa.table(columns), data / f"{stem}.parquet")
    from_csv, from_parquet = load_dataset(small_dataset), load_dataset(data)
    assert from_parquet.interactions == from_csv.interactions
    assert from_parquet.items == from_csv.items and from_parquet.users == from_csv.users

    columns["age"] = ["old"] + columns["age"][1:]
    pq.write_table(pa.table(columns), data / "users.parquet")
    with pytest.raises(DataError, match=r"users.parquet: row 1, column age: 'old' is not a valid int"):
        load_dataset(data)
    pq.write_table(pa.table({"user_id": ["1"], "item_id": ["2"]}), data / "interactions.parquet")
    with pytest.raises(DataError, match="missing column"):
        load_dataset(data)
