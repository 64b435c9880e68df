"""Windowed event counts as of a point in time — the definition feature-svc serves
(`crates/feature-svc/src/counters.rs`), so training features match serving ones.

Each entity keeps minute buckets for the two hours behind its newest event and hour
buckets for the 31 days behind it. As of time t, the last hour sums the 60 minute buckets
ending with t's minute and the day windows the 24·d hour buckets ending with t's hour (the
bucket holding t counts whole). If the last hour starts before the oldest time the minute
buckets still hold, the hour bucket holding t stands in. Events are applied in log order:
an event older than what an entity keeps is not counted. Both implementations are checked
against `training/tests/data/counters.json`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
MINUTES_KEPT = 120
HOURS_KEPT = 31 * 24
PRIOR_CLICKS = 1.0
PRIOR_IMPRESSIONS = 20.0
COUNTED = ("impression", "click", "like", "purchase")
WINDOWS = {"last_hour": None, "last_day": 24, "last_7_days": 7 * 24, "last_30_days": 30 * 24}


def _add(indexes: list[int], counts: list[list[int]], index: int, kind: int, kept: int) -> None:
    position = bisect.bisect_left(indexes, index)
    if position < len(indexes) and indexes[position] == index:
        counts[position][kind] += 1
        return
    newest = max(indexes[-1], index) if indexes else index
    oldest_kept = max(newest - (kept - 1), 0)
    if index < oldest_kept:
        return
    indexes.insert(position, index)
    bucket = [0, 0, 0, 0]
    bucket[kind] = 1
    counts.insert(position, bucket)
    stale = bisect.bisect_left(indexes, oldest_kept)
    del indexes[:stale]
    del counts[:stale]


def _sum(indexes: list[int], counts: list[list[int]], last: int, width: int) -> dict:
    first = max(last - (width - 1), 0)
    totals = [0, 0, 0, 0]
    for position in range(bisect.bisect_left(indexes, first), len(indexes)):
        if indexes[position] > last:
            break
        totals = [total + count for total, count in zip(totals, counts[position])]
    impressions, clicks, likes, purchases = totals
    ctr = (clicks + PRIOR_CLICKS) / (impressions + PRIOR_IMPRESSIONS) if impressions else None
    return {"impressions": impressions, "clicks": clicks, "likes": likes, "purchases": purchases, "ctr": ctr}


@dataclass
class Counters:
    minutes: list[int] = field(default_factory=list)
    minute_counts: list[list[int]] = field(default_factory=list)
    hours: list[int] = field(default_factory=list)
    hour_counts: list[list[int]] = field(default_factory=list)

    def record(self, event: str, timestamp_ms: int) -> None:
        if event not in COUNTED:
            return
        kind = COUNTED.index(event)
        timestamp_ms = max(timestamp_ms, 0)
        _add(self.minutes, self.minute_counts, timestamp_ms // MINUTE_MS, kind, MINUTES_KEPT)
        _add(self.hours, self.hour_counts, timestamp_ms // HOUR_MS, kind, HOURS_KEPT)

    def windows(self, as_of_ms: int) -> dict:
        minute, hour = max(as_of_ms, 0) // MINUTE_MS, max(as_of_ms, 0) // HOUR_MS
        covered = bool(self.minutes) and max(minute - 59, 0) >= max(self.minutes[-1] - (MINUTES_KEPT - 1), 0)
        if covered or not self.minutes:
            last_hour = _sum(self.minutes, self.minute_counts, minute, 60)
        else:
            last_hour = _sum(self.hours, self.hour_counts, hour, 1)
        result = {"last_hour": last_hour}
        for name, width in WINDOWS.items():
            if width is not None:
                result[name] = _sum(self.hours, self.hour_counts, hour, width)
        return result
