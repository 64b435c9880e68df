import csv
import random
from pathlib import Path

import pytest


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """60 users, 40 items in two genre clusters: users of cluster c mostly take items of c."""
    rng = random.Random(7)
    data = tmp_path / "data"
    data.mkdir()
    items = [[str(i), f"Item {i}", "Action" if i < 20 else "Comedy|Romance", 1990 + i % 10] for i in range(40)]
    users = [[str(u), 20 + u % 40, "M" if u % 2 else "F", "student" if u % 3 else "artist"] for u in range(60)]
    interactions = []
    for u in range(60):
        cluster = range(0, 20) if u % 2 else range(20, 40)
        for item in rng.sample(list(cluster), 8):
            interactions.append([str(u), str(item), 1_000_000 + rng.randrange(10_000), "rating", rng.randint(1, 5)])
    write_csv(data / "items.csv", ["item_id", "title", "genres", "year"], items)
    write_csv(data / "users.csv", ["user_id", "age", "gender", "occupation"], users)
    write_csv(data / "interactions.csv", ["user_id", "item_id", "timestamp", "event", "rating"], interactions)
    return data
