"""The loop from serving back to training: feature-svc's event log (what `LogEvents`
acknowledged) merged with the seed data into a data directory in the project's format,
from which `train` makes the next bundle.

`python -m recsys_training merge-events --data SEED --events LOG --out DIR` writes
`DIR/interactions.csv` (the seed's interactions, then the logged events in time order —
an export from Redis comes bucket by bucket — with timestamps in seconds), and copies `items.csv` and `users.csv`. Logged events for items the
catalogue does not have are counted and left out (the catalogue comes from the item
feed, not from clicks); impressions are exposure, not interactions, and are left out
unless asked for; events repeated with the same `event_id` are kept once.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .data import load_dataset, table_path


@dataclass
class Merged:
    seed_interactions: int
    logged_events: int
    unknown_items: int
    impressions: int
    duplicates: int
    unreadable_lines: int


def merge_events(data_dir: Path, events_log: Path, out: Path, include_impressions: bool = False) -> Merged:
    if not table_path(data_dir, "interactions").name.endswith(".csv"):
        raise ValueError(f"{data_dir}: merge-events reads the CSV form of the data (interactions.csv)")
    seed = load_dataset(data_dir)
    known_items = {item.item_id for item in seed.items}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("items.csv", "users.csv"):
        if (data_dir / name).is_file():
            shutil.copyfile(data_dir / name, out / name)
    counts = Merged(len(seed.interactions), 0, 0, 0, 0, 0)
    seen_ids: set[str] = set()
    with open(out / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "event", "rating"])
        for i in seed.interactions:
            writer.writerow([i.user_id, i.item_id, i.timestamp, i.event, i.rating])
        logged: list[tuple[int, list]] = []
        if events_log.is_file():
            for line in events_log.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    # A torn last line of a batch that was never acknowledged.
                    counts.unreadable_lines += 1
                    continue
                name = str(event.get("event", "")).removeprefix("EVENT_TYPE_").lower()
                event_id = event.get("event_id", "")
                if event_id and event_id in seen_ids:
                    counts.duplicates += 1
                    continue
                seen_ids.add(event_id)
                if name == "impression" and not include_impressions:
                    counts.impressions += 1
                    continue
                if event["item_id"] not in known_items:
                    counts.unknown_items += 1
                    continue
                rating = float(event.get("value", 0.0)) if name == "rating" else 0.0
                timestamp_ms = int(event["timestamp_ms"])
                logged.append((timestamp_ms, [event["user_id"], event["item_id"], timestamp_ms // 1000, name, rating]))
                counts.logged_events += 1
        logged.sort(key=lambda entry: entry[0])  # stable: log order among equal times
        writer.writerows(row for _, row in logged)
    return counts
