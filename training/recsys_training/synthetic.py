"""Synthetic interaction data at catalogue scale, in the project's bring-your-own format.

MovieLens-100k has 1,682 items; the system is built for 10^6-10^8. This generator writes
data of any size with the structure the models and rules need, deterministically by seed:

- **items** with a power-law popularity (Zipf), a taste cluster, a category (the
  ``genres`` column), a release year and a ``release_time`` (Unix seconds; items are
  published over the whole period, so freshness and cold start have something to find);
- **users** with one to three taste clusters, an age, a gender and an occupation;
- **interactions** in time-ordered sessions: each user's events come in bursts a minute
  or so apart, sessions days apart. Most events follow the user's tastes (an item drawn
  from one of their clusters by popularity), the rest explore the global head. Every
  event is an impression, click, like or purchase, and a click (or better) is much more
  likely on a taste item than on an exploration, so CTR-like features and multi-task
  heads have a signal to learn.

Everything is vectorised with numpy and written as Parquet (``interactions.parquet``,
``items.parquet``, ``users.parquet``), so 20 million interactions take minutes, not hours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EVENTS = np.array(["impression", "click", "like", "purchase"])
CATEGORIES = 64
OCCUPATIONS = np.array(["engineer", "student", "artist", "doctor", "sales", "writer", "retired", "other"])
#: Unix seconds of the first and last possible event: 2024-01-01 .. 2025-12-31.
PERIOD = (1_704_067_200, 1_767_139_200)
DAY = 86_400


@dataclass
class SyntheticConfig:
    items: int = 100_000
    users: int = 200_000
    interactions: int = 2_000_000
    seed: int = 42
    #: Taste clusters; each item belongs to one, each user likes one to three.
    clusters: int = 200
    #: Zipf exponent of item popularity (1.0 is the classic long tail).
    popularity_exponent: float = 1.0
    #: Share of events that follow the user's tastes; the rest explore the global head.
    taste_share: float = 0.8

    def validate(self) -> None:
        for name in ("items", "users", "interactions", "clusters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.clusters > self.items:
            raise ValueError(f"clusters ({self.clusters}) cannot exceed items ({self.items})")
        if not 0.0 <= self.taste_share <= 1.0:
            raise ValueError(f"taste_share must be in [0, 1], got {self.taste_share}")


def generate(config: SyntheticConfig, out_dir: Path) -> dict[str, float]:
    """Writes the three tables to ``out_dir``; returns sizes and the seconds it took."""
    config.validate()
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    items = _items(config, rng)
    pq.write_table(items["table"], out_dir / "items.parquet")
    users = _users(config, rng)
    pq.write_table(users["table"], out_dir / "users.parquet")
    interactions = _interactions(config, rng, items, users)
    pq.write_table(interactions, out_dir / "interactions.parquet", row_group_size=1_000_000)
    return {
        "items": config.items,
        "users": config.users,
        "interactions": interactions.num_rows,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _ids(prefix: str, count: int) -> pa.Array:
    return pa.array(np.char.add(prefix, np.arange(count).astype(str)))


def _items(config: SyntheticConfig, rng: np.random.Generator) -> dict:
    n = config.items
    # Popularity rank is a random permutation, so item ids say nothing about popularity.
    rank = rng.permutation(n)
    weight = 1.0 / np.power(rank + 1.0, config.popularity_exponent)
    cluster = rng.integers(0, config.clusters, n)
    # Every cluster holds at least one item, so every user taste can be served.
    cluster[: config.clusters] = np.arange(config.clusters)
    category = (cluster * 7 + rng.integers(0, 3, n)) % CATEGORIES
    release_time = rng.integers(PERIOD[0] - 5 * 365 * DAY, PERIOD[1], n)
    year = 1970 + (release_time // (365.25 * DAY)).astype(np.int64)
    table = pa.table({
        "item_id": _ids("i", n),
        "title": _ids("Item ", n),
        "genres": pa.array(np.char.add("category-", category.astype(str))),
        "year": pa.array(year),
        "release_time": pa.array(release_time),
    })
    return {"table": table, "weight": weight, "cluster": cluster, "release_time": release_time}


def _users(config: SyntheticConfig, rng: np.random.Generator) -> dict:
    m = config.users
    tastes = rng.integers(0, config.clusters, (m, 3))
    taste_count = rng.integers(1, 4, m)
    table = pa.table({
        "user_id": _ids("u", m),
        "age": pa.array(rng.integers(16, 80, m)),
        "gender": pa.array(np.where(rng.random(m) < 0.5, "F", "M")),
        "occupation": pa.array(OCCUPATIONS[rng.integers(0, len(OCCUPATIONS), m)]),
    })
    return {"table": table, "tastes": tastes, "taste_count": taste_count}


def _sample_by_weight(rng: np.random.Generator, members: np.ndarray, weight: np.ndarray, count: int) -> np.ndarray:
    """``count`` draws from ``members`` with probability proportional to ``weight``."""
    cumulative = np.cumsum(weight[members])
    picks = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    return members[np.minimum(picks, len(members) - 1)]


def _interactions(config: SyntheticConfig, rng: np.random.Generator, items: dict, users: dict) -> pa.Table:
    total = config.interactions
    # Heavy-tailed activity: a few users have thousands of events, most a handful.
    activity = rng.pareto(1.5, config.users) + 1.0
    per_user = np.floor(activity / activity.sum() * total).astype(np.int64)
    per_user += np.bincount(rng.integers(0, config.users, total - per_user.sum()), minlength=config.users)
    user = np.repeat(np.arange(config.users), per_user)

    # Which of the user's clusters each event follows, or whether it explores.
    follows_taste = rng.random(total) < config.taste_share
    slot = (rng.random(total) * users["taste_count"][user]).astype(np.int64)
    cluster = users["tastes"][user, slot]
    item = np.empty(total, dtype=np.int64)
    weight, item_cluster = items["weight"], items["cluster"]
    order = np.argsort(item_cluster, kind="stable")
    bounds = np.searchsorted(item_cluster[order], np.arange(config.clusters + 1))
    taste_rows = np.flatnonzero(follows_taste)
    by_cluster = np.argsort(cluster[taste_rows], kind="stable")
    row_bounds = np.searchsorted(cluster[taste_rows][by_cluster], np.arange(config.clusters + 1))
    for c in range(config.clusters):
        rows = taste_rows[by_cluster[row_bounds[c]:row_bounds[c + 1]]]
        if len(rows):
            item[rows] = _sample_by_weight(rng, order[bounds[c]:bounds[c + 1]], weight, len(rows))
    explore_rows = np.flatnonzero(~follows_taste)
    item[explore_rows] = _sample_by_weight(rng, np.arange(config.items), weight, len(explore_rows))

    # Time-ordered sessions: gaps of about a minute inside a session, days between them.
    new_session = rng.random(total) < 0.15
    gap = np.where(new_session, rng.exponential(3 * DAY, total), rng.exponential(60.0, total)).astype(np.int64) + 1
    first = np.concatenate(([0], np.cumsum(per_user)[:-1]))
    starts = rng.integers(PERIOD[0], PERIOD[0] + (PERIOD[1] - PERIOD[0]) // 2, config.users)
    elapsed = np.cumsum(gap)
    elapsed -= np.repeat(elapsed[first[per_user > 0]] - gap[first[per_user > 0]], per_user[per_user > 0])
    timestamp = np.minimum(np.repeat(starts, per_user) + elapsed, PERIOD[1])
    # An item is not seen before it is published (cold start is real).
    timestamp = np.maximum(timestamp, items["release_time"][item])

    # Engagement: far likelier on a taste item than on an exploration.
    draw = rng.random(total)
    click_p = np.where(follows_taste, 0.35, 0.08)
    event = np.zeros(total, dtype=np.int32)
    event[draw < click_p] = 1
    event[draw < click_p * 0.3] = 2
    event[draw < click_p * 0.1] = 3

    # Each user's events in time order (publication times may have pushed some later).
    order = np.lexsort((timestamp, user))
    # The dictionaries are the id columns the item and user tables already hold.
    user_ids = users["table"].column("user_id").combine_chunks()
    item_ids = items["table"].column("item_id").combine_chunks()
    return pa.table({
        # Dictionary-encoded: 20 million rows of ids cost their indices, not their text.
        "user_id": pa.DictionaryArray.from_arrays(pa.array(user[order].astype(np.int32)), user_ids),
        "item_id": pa.DictionaryArray.from_arrays(pa.array(item[order].astype(np.int32)), item_ids),
        "timestamp": pa.array(timestamp[order]),
        "event": pa.DictionaryArray.from_arrays(pa.array(event[order]), pa.array(EVENTS)),
    })
