"""Writes a feature-svc seed (users.csv, items.csv, interactions.csv) from a data set in the
project's Parquet format: `bench-features` loads it to measure the stores at scale.

    python feature_seed.py --data data/synthetic-1000000 --out target/bench-features/seed [--users N]

With --users, only the first N users (by id order in users.parquet) and their events.
"""

import argparse
import pathlib

import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--users", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    users = pq.read_table(args.data / "users.parquet")
    if args.users:
        users = users.slice(0, args.users)
    pacsv.write_csv(users, args.out / "users.csv")
    items = pq.read_table(args.data / "items.parquet", columns=["item_id", "genres", "release_time"])
    pacsv.write_csv(items, args.out / "items.csv")
    interactions = pq.ParquetFile(args.data / "interactions.parquet")
    keep = users.column("user_id") if args.users else None
    writer = None
    rows = 0
    for batch in interactions.iter_batches(batch_size=1 << 20, columns=["user_id", "item_id", "timestamp", "event"]):
        if keep is not None:
            batch = batch.filter(pc.is_in(batch.column("user_id"), value_set=keep))
        if writer is None:
            writer = pacsv.CSVWriter(args.out / "interactions.csv", batch.schema)
        writer.write_batch(batch)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    print(f"seed: {users.num_rows} users, {items.num_rows} items, {rows} events in {args.out}")


if __name__ == "__main__":
    main()
