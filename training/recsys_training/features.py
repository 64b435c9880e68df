"""Ranker input features, declared in ``training/feature_config.toml`` and encoded exactly
as ``crates/bundle/src/features.rs`` encodes them.

Training resolves the declarative file against the data (vocabularies, scales) and stores
the resolved configuration in the bundle manifest, so rank-svc rebuilds the same vectors
from the same numbers. Item statistics (counts over windows, like rate) are computed here
and shipped in the catalog; user activity windows are counted from the history timestamps,
which serving has too.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .counters import COUNTED, PRIOR_CLICKS, PRIOR_IMPRESSIONS
from .data import Dataset, Interaction, Item, User

CONFIG_PATH = Path(__file__).resolve().parent.parent / "feature_config.toml"
DAY_SECONDS = 86_400
_WINDOW = re.compile(r"^(events|interactions)_(\d+)d$")
ENCODINGS = ("scale", "log1p", "min_max", "one_hot", "multi_hot", "identity")
CROSS_SOURCES = ("item_cf_score", "item_cf_zscore", "item_cf_recent_score", "embedding_score", "embedding_zscore")
# item_cf_recent_score looks at this many of the latest history items (rank-svc: RECENT_ITEMS).
RECENT_ITEMS = 10
FINE_MODELS = ("din", "deepfm", "wide_deep")
# Live item sources, ``<measure>_<window>``: the feature store's counters of the candidate
# as of the request (crates/bundle/src/features.rs, LiveItemSource).
LIVE_MEASURES = ("impressions", "clicks", "likes", "purchases", "ctr")
# Each window's first bucket relative to the bucket holding the request time, as the
# store sums them (counters.py): (bucket width in seconds, buckets).
LIVE_WINDOWS = {"last_hour": (60, 60), "last_day": (3_600, 24), "last_7_days": (3_600, 7 * 24),
                "last_30_days": (3_600, 30 * 24)}
LIVE_ENCODINGS = ("scale", "log1p", "min_max", "identity")


def live_source(name: str) -> tuple[str, str] | None:
    """``clicks_last_7_days`` -> ("clicks", "last_7_days"); None for anything else."""
    for window in LIVE_WINDOWS:
        measure = name.removesuffix("_" + window)
        if measure != name and measure in LIVE_MEASURES:
            return measure, window
    return None


def window_days(source: str) -> int | None:
    match = _WINDOW.match(source)
    return int(match.group(2)) if match else None


@dataclass
class Feature:
    source: str
    encoding: str
    scale: float = 1.0
    min: float = 0.0
    max: float = 0.0
    vocabulary: list[str] = field(default_factory=list)
    clip: bool = False

    @property
    def width(self) -> int:
        return len(self.vocabulary) if self.encoding in ("one_hot", "multi_hot") else 1

    def encode(self, value, out: list[float]) -> None:
        if self.encoding == "one_hot":
            out.extend(float(v == value) for v in self.vocabulary)
        elif self.encoding == "multi_hot":
            out.extend(float(v in value) for v in self.vocabulary)
        elif self.encoding == "scale":
            out.append(self._clip(float(value) / self.scale))
        elif self.encoding == "log1p":
            out.append(self._clip(math.log1p(float(value)) / self.scale))
        elif self.encoding == "min_max":
            if value == 0 or self.max <= self.min:
                out.append(0.0)
            else:
                out.append((min(max(float(value), self.min), self.max) - self.min) / (self.max - self.min))
        else:
            out.append(float(value))

    def _clip(self, value: float) -> float:
        return min(value, 1.0) if self.clip else value


@dataclass
class FeatureConfig:
    fine_model: str
    coarse_model: str
    embedding_dim: int
    history_length: int
    user: list[Feature]
    item: list[Feature]
    cross: list[str]
    # Columns of ``cross`` the coarse ranker reads (the fine ranker reads all).
    coarse_cross: list[int] = field(default_factory=list)
    # Multi-task fine ranker: weight of the like head in the served score, and of its loss.
    like_weight: float = 0.0
    like_loss_weight: float = 0.5
    # The candidate's windowed counts as of the request, read from the feature store by
    # rank-svc for the fine stage; they follow the item columns in the fine model's item
    # input (``ranker_item_dim``). See ``resolve_live``.
    live_item: list[Feature] = field(default_factory=list)
    # The automated crosses kept for this bundle (crosses.AttributeCross as JSON), in the
    # order their names follow the configured ones in ``cross``.
    attribute_crosses: list[dict] = field(default_factory=list)

    @property
    def user_dim(self) -> int:
        return sum(f.width for f in self.user)

    @property
    def item_dim(self) -> int:
        return sum(f.width for f in self.item)

    @property
    def cross_dim(self) -> int:
        return len(self.cross)

    @property
    def live_item_dim(self) -> int:
        return len(self.live_item)

    @property
    def ranker_item_dim(self) -> int:
        """Width of the fine model's item input: the item columns, then the live ones."""
        return self.item_dim + self.live_item_dim

    def offset(self, group: str, source: str) -> int:
        """Column of a (single-width) feature within its group's vector."""
        column = 0
        for feature in getattr(self, group):
            if feature.source == source:
                return column
            column += feature.width
        raise KeyError(f"no {group} feature with source {source!r}")

    def to_json(self) -> dict:
        return asdict(self)

    def encode_user(self, sources: dict) -> list[float]:
        out: list[float] = []
        for feature in self.user:
            feature.encode(sources[feature.source], out)
        return out

    def encode_item(self, sources: dict) -> list[float]:
        out: list[float] = []
        for feature in self.item:
            feature.encode(sources[feature.source], out)
        return out


class FeatureConfigError(ValueError):
    pass


class ItemEventLog:
    """Every counted event (impression, click, like, purchase) by item and time, so that an
    item's windowed counts can be read as of any moment, as feature-svc serves them
    (``counters.py``: a window is whole buckets up to the one holding the request time).
    Point in time: only events strictly before the request count — training must not see
    the event it predicts."""

    def __init__(self, items: np.ndarray, timestamps: np.ndarray, kinds: np.ndarray) -> None:
        """``kinds``: index into ``counters.COUNTED`` per event, -1 for what is not counted
        (ratings)."""
        self.keys = []
        for kind in range(len(COUNTED)):
            chosen = kinds == kind
            self.keys.append(np.sort(_item_time_key(items[chosen], timestamps[chosen])))

    @classmethod
    def from_interactions(cls, interactions: list[Interaction], item_position: dict[str, int]) -> "ItemEventLog":
        return cls(np.array([item_position[i.item_id] for i in interactions], dtype=np.int64),
                   np.array([i.timestamp for i in interactions], dtype=np.int64),
                   np.array([COUNTED.index(i.event) if i.event in COUNTED else -1 for i in interactions],
                            dtype=np.int64))

    def _count(self, kind: int, items: np.ndarray, starts: np.ndarray, times: np.ndarray) -> np.ndarray:
        keys = self.keys[kind]
        return (np.searchsorted(keys, _item_time_key(items, times), side="left")
                - np.searchsorted(keys, _item_time_key(items, starts), side="left")).astype(np.float64)

    def values(self, items: np.ndarray, times: np.ndarray, sources: list[str]) -> dict[str, np.ndarray]:
        """Raw values of each live source for candidate ``items[n]`` asked at ``times[n]``
        (Unix seconds)."""
        items, times = np.asarray(items, dtype=np.int64), np.asarray(times, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        counted: dict[tuple[str, str], np.ndarray] = {}

        def count(measure: str, window: str) -> np.ndarray:
            if (measure, window) not in counted:
                width, buckets = LIVE_WINDOWS[window]
                starts = (times // width - (buckets - 1)) * width
                counted[(measure, window)] = self._count(COUNTED.index(measure[:-1]), items, starts, times)
            return counted[(measure, window)]

        for source in sources:
            parsed = live_source(source)
            if parsed is None:
                raise FeatureConfigError(f"feature_config [[live_item]]: unknown source {source!r}")
            measure, window = parsed
            if measure == "ctr":
                impressions, clicks = count("impressions", window), count("clicks", window)
                # The store sends CTR as a 32-bit float; absent (0) without impressions.
                ctr = ((clicks + PRIOR_CLICKS) / (impressions + PRIOR_IMPRESSIONS)).astype(np.float32)
                out[source] = np.where(impressions > 0, ctr.astype(np.float64), 0.0)
            else:
                out[source] = count(measure, window)
        return out

    def windowed_counts(self, item: int, time: int) -> dict[str, dict[str, float]]:
        """One item's counts as feature-svc's ``WindowedCounts`` names them (the parity
        fixture's input)."""
        sources = [f"{m}_{w}" for w in LIVE_WINDOWS for m in LIVE_MEASURES]
        values = self.values(np.array([item]), np.array([time]), sources)
        return {w: {m: float(values[f"{m}_{w}"][0]) for m in LIVE_MEASURES} for w in LIVE_WINDOWS}


def _item_time_key(items: np.ndarray, times: np.ndarray) -> np.ndarray:
    # Items below 2^28 and times below 2^34 s (the year 2514) share one sortable int64.
    return (items.astype(np.int64) << 34) | np.clip(times.astype(np.int64), 0, (1 << 34) - 1)


def live_sources(raw: dict) -> list[str]:
    return source_names(raw, "live_item")


def resolve_live(raw: dict, values: dict[str, np.ndarray]) -> list[Feature]:
    """The ``[[live_item]]`` features resolved against the training rows' raw values. A
    source that is constant over them is dropped: the model could learn nothing from it
    (MovieLens has ratings only, so no counted event: its bundles read no live features)."""
    resolved = []
    for spec in _parse(raw, "live_item"):
        source, encoding = spec["source"], spec.get("encoding", "identity")
        if live_source(source) is None:
            raise FeatureConfigError(f"feature_config [[live_item]]: unknown source {source!r} "
                                     f"(expected <{'|'.join(LIVE_MEASURES)}>_<{'|'.join(LIVE_WINDOWS)}>)")
        if encoding not in LIVE_ENCODINGS:
            raise FeatureConfigError(f"feature_config [[live_item]] ({source}): encoding {encoding!r} is not numeric")
        column = values[source]
        if len(column) == 0 or float(column.min()) == float(column.max()):
            continue
        feature = Feature(source=source, encoding=encoding)
        if encoding in ("scale", "log1p"):
            scale = spec.get("scale", 1.0)
            if scale == "max":
                largest = float(column.max())
                scale = max(math.log1p(largest), 1.0) if encoding == "log1p" else (largest if largest > 0 else 1.0)
            feature.scale = float(scale)
            feature.clip = bool(spec.get("clip", False))
        elif encoding == "min_max":
            known = column[column != 0]
            feature.min = float(known.min()) if spec.get("min") == "from_data" and len(known) else float(spec.get("min", 0))
            feature.max = float(known.max()) if spec.get("max") == "from_data" and len(known) else float(spec.get("max", 0))
        resolved.append(feature)
    return resolved


def attach_live_items(features: FeatureConfig, raw: dict, values_of, train_rows, *other_rows) -> None:
    """Resolves ``features.live_item`` on the training rows' raw values and sets every
    rows' encoded ``live`` columns; ``values_of(rows)`` gives a rows' raw values (computed
    once per rows)."""
    values = values_of(train_rows)
    features.live_item = resolve_live(raw, values)
    train_rows.live = encode_live(features.live_item, values, len(train_rows.items))
    for rows in other_rows:
        rows.live = encode_live(features.live_item, values_of(rows), len(rows.items))


def with_live_columns(item_rows: np.ndarray, live: np.ndarray | None) -> np.ndarray:
    """The fine model's item input: the candidates' item rows, then their live columns."""
    return np.concatenate([item_rows, live], axis=1) if live is not None and live.shape[1] else item_rows


def encode_live(features: list[Feature], values: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """[rows, live dim]: ``Feature.encode`` for numeric values, on whole columns (rank-svc
    encodes in f64 and rounds to f32, as here)."""
    columns = []
    for feature in features:
        value = values[feature.source].astype(np.float64)
        clip = (lambda v: np.minimum(v, 1.0)) if feature.clip else (lambda v: v)
        if feature.encoding == "scale":
            columns.append(clip(value / feature.scale))
        elif feature.encoding == "log1p":
            columns.append(clip(np.log1p(value) / feature.scale))
        elif feature.encoding == "min_max":
            if feature.max <= feature.min:
                columns.append(np.zeros(len(value)))
            else:
                scaled = (np.clip(value, feature.min, feature.max) - feature.min) / (feature.max - feature.min)
                columns.append(np.where(value == 0, 0.0, scaled))
        else:
            columns.append(value)
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((rows, 0), dtype=np.float32)


def time_context(request_time: int, latest_event: int | None) -> dict:
    """The request-time sources: UTC hour and weekday on the unit circle (so 23:00 is
    next to 00:00) and the hours since the user's latest event (0 without one)."""
    hour = (request_time % DAY_SECONDS) // 3600
    weekday = (request_time // DAY_SECONDS + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    return {
        "hour_sin": math.sin(2 * math.pi * hour / 24), "hour_cos": math.cos(2 * math.pi * hour / 24),
        "weekday_sin": math.sin(2 * math.pi * weekday / 7), "weekday_cos": math.cos(2 * math.pi * weekday / 7),
        "hours_since_last_event": max(0, request_time - latest_event) / 3600 if latest_event is not None else 0.0,
    }


def user_sources(user: User | None, timestamps: list[int], event_count: int, sources: list[str],
                 request_time: int | None = None) -> dict:
    """The raw values of a user's sources; windows count events within N days of the
    latest; the request time defaults to the latest event (a request right after it)."""
    values = {
        "age": user.age if user else 0,
        "gender": user.gender if user else "",
        "occupation": user.occupation if user else "",
        "event_count": event_count,
    }
    latest = max(timestamps, default=0)
    values.update(time_context(latest if request_time is None else request_time, latest if timestamps else None))
    for source in sources:
        days = window_days(source)
        if days is not None and source.startswith("events_"):
            values[source] = sum(1 for t in timestamps if latest - t < days * DAY_SECONDS)
    return values


def item_statistics(items: list[Item], interactions: list[Interaction], sources: list[str]) -> dict[str, dict[str, float]]:
    """Per item id: ``interactions``, each ``interactions_<N>d`` up to the end of the data,
    and ``like_rate`` (smoothed share of ratings >= 4 or like/purchase events)."""
    end = max((i.timestamp for i in interactions), default=0)
    windows = sorted({d for s in sources if s.startswith("interactions_") and (d := window_days(s)) is not None})
    counts: dict[str, dict[str, float]] = {
        item.item_id: {"interactions": 0.0, "likes": 0.0, **{f"interactions_{d}d": 0.0 for d in windows}} for item in items
    }
    for interaction in interactions:
        stats = counts[interaction.item_id]
        stats["interactions"] += 1
        stats["likes"] += float(interaction.rating >= 4 or interaction.event in ("like", "purchase"))
        for d in windows:
            if end - interaction.timestamp < d * DAY_SECONDS:
                stats[f"interactions_{d}d"] += 1
    for stats in counts.values():
        stats["like_rate"] = round((stats.pop("likes") + 1.0) / (stats["interactions"] + 2.0), 6)
    return counts


def item_sources(item: Item, stats: dict[str, float]) -> dict:
    return {"genres": item.genres, "year": item.year, **stats}


def _parse(raw: dict, group: str) -> list[dict]:
    features = raw.get(group, [])
    for n, feature in enumerate(features):
        where = f"feature_config [[{group}]] #{n + 1}"
        if "source" not in feature:
            raise FeatureConfigError(f"{where}: missing 'source'")
        encoding = feature.get("encoding", "identity")
        if encoding not in ENCODINGS:
            raise FeatureConfigError(f"{where} ({feature['source']}): unknown encoding {encoding!r}")
    return features


def resolve(raw: dict, user_values: list[dict], item_values: list[dict]) -> FeatureConfig:
    """Turns the declarative file into concrete encodings using the training data."""
    def resolve_group(group: str, rows: list[dict]) -> list[Feature]:
        resolved = []
        for spec in _parse(raw, group):
            source, encoding = spec["source"], spec.get("encoding", "identity")
            if rows and source not in rows[0]:
                raise FeatureConfigError(f"feature_config [[{group}]]: unknown source {source!r}")
            values = [row[source] for row in rows]
            feature = Feature(source=source, encoding=encoding)
            if encoding in ("one_hot", "multi_hot"):
                vocabulary = spec.get("vocabulary", "from_data")
                if vocabulary == "from_data":
                    flat = (v for value in values for v in (value if encoding == "multi_hot" else [value]))
                    vocabulary = sorted({v for v in flat if v})
                feature.vocabulary = list(vocabulary)
            elif encoding in ("scale", "log1p"):
                scale = spec.get("scale", 1.0)
                if scale == "max":
                    largest = max((float(v) for v in values), default=1.0)
                    scale = max(math.log1p(largest), 1.0) if encoding == "log1p" else max(largest, 1.0)
                feature.scale = float(scale)
                feature.clip = bool(spec.get("clip", False))
            elif encoding == "min_max":
                known = [float(v) for v in values if v]
                feature.min = float(min(known, default=0.0)) if spec.get("min") == "from_data" else float(spec.get("min", 0))
                feature.max = float(max(known, default=0.0)) if spec.get("max") == "from_data" else float(spec.get("max", 0))
            resolved.append(feature)
        return resolved

    cross_specs = _parse(raw, "cross")
    cross = [spec["source"] for spec in cross_specs]
    coarse_cross = [n for n, spec in enumerate(cross_specs) if spec.get("coarse", True)]
    if cross and not coarse_cross:
        raise FeatureConfigError("feature_config [[cross]]: the coarse ranker needs at least one feature (coarse = true)")
    for source in cross:
        if source not in CROSS_SOURCES:
            raise FeatureConfigError(f"feature_config [[cross]]: unknown source {source!r} (known: {CROSS_SOURCES})")
    model = raw.get("model", {})
    fine = model.get("fine", "din")
    if fine not in FINE_MODELS:
        raise FeatureConfigError(f"feature_config [model] fine = {fine!r}: expected one of {FINE_MODELS}")
    return FeatureConfig(
        fine_model=fine,
        coarse_model=model.get("coarse", "mlp"),
        embedding_dim=int(raw.get("ids", {}).get("embedding_dim", 16)),
        history_length=int(raw.get("sequence", {}).get("history_length", 50)),
        user=resolve_group("user", user_values),
        item=resolve_group("item", item_values),
        cross=cross,
        coarse_cross=coarse_cross,
        like_weight=float(model.get("like_weight", 0.0)),
        like_loss_weight=float(model.get("like_loss_weight", 0.5)),
    )


def load_raw_config(path: Path | None = None) -> dict:
    with open(path or CONFIG_PATH, "rb") as f:
        return tomllib.load(f)


def source_names(raw: dict, group: str) -> list[str]:
    return [spec["source"] for spec in raw.get(group, [])]


@dataclass
class UserHistory:
    """One user's interactions as serving sees them: item positions most recent first."""
    items: list[int]
    timestamps: list[int]


def user_histories(interactions: list[Interaction], user_position: dict[str, int],
                   item_position: dict[str, int], num_users: int) -> list[UserHistory]:
    by_user: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for order, interaction in enumerate(interactions):
        by_user[user_position[interaction.user_id]].append((interaction.timestamp, order, item_position[interaction.item_id]))
    histories = []
    for user in range(num_users):
        # Most recent first; among equal timestamps the later row first (the feature
        # store moves each new event to the front, so it serves the same order).
        rows = sorted(by_user.get(user, []), reverse=True)
        histories.append(UserHistory(items=[item for _, _, item in rows], timestamps=[ts for ts, _, _ in rows]))
    return histories


def history_tensor(histories: list[UserHistory], length: int) -> np.ndarray:
    """Row ``u`` holds user u's latest ``length`` item indices (1-based, 0-padded)."""
    out = np.zeros((len(histories), length), dtype=np.int64)
    for user, history in enumerate(histories):
        latest = history.items[:length]
        out[user, :len(latest)] = np.asarray(latest, dtype=np.int64) + 1
    return out


class CrossScorer:
    """The user-item cross features of one model state (item-to-item weights and
    retrieval embeddings), computed the way rank-svc computes them."""

    def __init__(self, neighbor_weights: np.ndarray, user_vectors: np.ndarray, item_vectors: np.ndarray,
                 cross: list[str]) -> None:
        self.weights = neighbor_weights.astype(np.float32)
        self.user_vectors = user_vectors.astype(np.float32)
        self.item_vectors = item_vectors.astype(np.float32)
        self.cross = cross

    def item_cf_scores(self, history_items: list[int]) -> np.ndarray:
        return self.weights[history_items].sum(axis=0, dtype=np.float64) if history_items else np.zeros(self.weights.shape[0])

    def features(self, user: int, history_items: list[int], items: np.ndarray) -> np.ndarray:
        """``history_items`` latest first; z-scores standardise over the unseen catalog."""
        unseen = np.ones(self.weights.shape[0], dtype=bool)
        unseen[history_items] = False

        def standardised(scores: np.ndarray) -> np.ndarray:
            mean = float(scores[unseen].mean()) if unseen.any() else 0.0
            std = float(scores[unseen].std()) if unseen.any() else 0.0
            return (scores[items] - mean) / std if std > 1e-9 else np.zeros(len(items))

        item_cf = self.item_cf_scores(history_items)
        vector = self.user_vectors[user] if user >= 0 else np.zeros(self.item_vectors.shape[1], np.float32)
        embedding = (self.item_vectors @ vector).astype(np.float64)
        columns = []
        for source in self.cross:
            if source == "item_cf_score":
                columns.append(item_cf[items])
            elif source == "item_cf_zscore":
                columns.append(standardised(item_cf))
            elif source == "item_cf_recent_score":
                columns.append(self.item_cf_scores(history_items[:RECENT_ITEMS])[items])
            elif source == "embedding_score":
                columns.append(embedding[items])
            elif source == "embedding_zscore":
                columns.append(standardised(embedding))
        return np.stack(columns, axis=1).astype(np.float32)


def user_feature_rows(config: FeatureConfig, dataset: Dataset, user_ids: list[str], histories: list[UserHistory],
                      request_times: list[int | None] | None = None) -> np.ndarray:
    sources = [f.source for f in config.user]
    request_times = request_times or [None] * len(user_ids)
    return np.asarray([
        config.encode_user(user_sources(dataset.users.get(uid), h.timestamps, len(h.items), sources, t))
        for uid, h, t in zip(user_ids, histories, request_times)
    ], dtype=np.float32).reshape(len(user_ids), config.user_dim)


def item_feature_rows(config: FeatureConfig, items: list[Item], statistics: dict[str, dict[str, float]]) -> np.ndarray:
    return np.asarray([config.encode_item(item_sources(item, statistics[item.item_id])) for item in items],
                      dtype=np.float32).reshape(len(items), config.item_dim)


def build_config(raw: dict, dataset: Dataset, user_ids: list[str], histories: list[UserHistory],
                 statistics: dict[str, dict[str, float]]) -> FeatureConfig:
    user_names = source_names(raw, "user")
    user_values = [user_sources(dataset.users.get(uid), h.timestamps, len(h.items), user_names)
                   for uid, h in zip(user_ids, histories)]
    item_values = [item_sources(item, statistics[item.item_id]) for item in dataset.items]
    return resolve(raw, user_values, item_values)
