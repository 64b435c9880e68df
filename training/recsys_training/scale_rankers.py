"""The rankers of a catalogue-scale bundle, so that a million-item bundle is a full bundle
the whole cluster serves.

The models are ``train.py``'s (the coarse MLP over cross features, the fine DIN or
DeepFM, exported to ONNX with the same inputs), with the feature configuration of
``feature_config.toml``; what changes is how their rows are made:

- **Features from columns.** Item statistics are counted with ``np.bincount``, user
  activity from each user's sorted timestamps, and no per-user table exists: every user is
  "unknown" to the id embedding (index 0) and known by attributes, history and cross
  features, as a new user is at serving.
- **Cross features without the catalogue.** rank-svc standardises the item-to-item and
  embedding scores over the user's unseen catalogue. Here those means and deviations are
  exact sums: the item-to-item scores are zero outside the history's neighbour lists, and
  for the embedding ``Σ v·x = v·Σx`` and ``Σ (v·x)² = vᵀ(Σ x xᵀ)v``, so one user costs
  history × K plus dim², not the catalogue.
- **Rows.** A sample of users whose last interaction was held out from the retrieval and
  item-to-item models: their candidates are what recall hands rank — the embedding and
  item-to-item channels' best unseen items — plus random unseen items, labelled 1 for the
  held-out item. A held-out item that recall did not propose is not added, as in
  ``train.py``: the rankers must learn the true share of positives at every score.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import features as feature_module
from .data import User
from .features import RECENT_ITEMS, FeatureConfig
from .item_to_item import SparseRows
from .models import FINE_RANKERS, CoarseRanker, auc

DAY_SECONDS = 86_400
#: Latest history items pooled into the user's query (recall-svc and rank-svc: HISTORY_ITEMS).
POOLED_ITEMS = 50
#: History items a request carries at most (feature-svc's default `max_history`).
MAX_HISTORY = 1_000


def is_evaluation_user(users: np.ndarray) -> np.ndarray:
    """One user in five (by position) is kept for the served evaluation (``scale_eval``):
    the rankers never train on their held-out items."""
    return users % 5 == 0


@dataclass
class RankerScaleConfig:
    training_users: int = 30_000
    validation_users: int = 3_000
    #: Candidates per user from each of the embedding and item-to-item channels.
    recall_candidates: int = 50
    random_negatives: int = 50
    epochs: int = 1
    coarse_epochs: int = 3
    batch_size: int = 4_096
    lr: float = 2e-3
    #: Users whose attributes and activity resolve the feature scales.
    resolve_users: int = 100_000


@dataclass
class UserTable:
    """Attributes by user position (empty strings and 0 where the data has none)."""
    ids: list[str]
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray


class CrossFeatures:
    """rank-svc's cross features of one user's candidates, with the standardisation over
    the unseen catalogue computed from sums (see the module's docstring)."""

    def __init__(self, vectors: np.ndarray, rows: SparseRows, cross: list[str]) -> None:
        self.vectors = vectors
        self.rows = rows
        self.cross = cross
        wide = vectors.astype(np.float64)
        self.total = wide.sum(axis=0)
        self.gram = wide.T @ wide

    def item_cf(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores): the history's neighbour weights summed per item (zero elsewhere)."""
        starts, ends = self.rows.offsets[history], self.rows.offsets[history + 1]
        if not len(history) or (ends - starts).sum() == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        picks = np.concatenate([np.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())])
        items, inverse = np.unique(self.rows.neighbors[picks], return_inverse=True)
        return items.astype(np.int64), np.bincount(inverse, weights=self.rows.weights[picks].astype(np.float64))

    def query(self, history: np.ndarray) -> np.ndarray | None:
        pooled = history[:POOLED_ITEMS]
        return self.vectors[pooled].mean(axis=0, dtype=np.float32) if len(pooled) else None

    def features(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``history`` latest first (duplicates kept, as serving resolves them)."""
        seen = np.unique(history)
        unseen_count = max(len(self.vectors) - len(seen), 1)

        def sparse_standardised(items, scores):
            """Mean and deviation over the unseen catalogue of scores that are zero
            outside ``items``."""
            keep = ~np.isin(items, seen)
            mean = scores[keep].sum() / unseen_count
            variance = (scores[keep] ** 2).sum() / unseen_count - mean * mean
            return mean, math.sqrt(max(variance, 0.0))

        def lookup(items, scores, wanted):
            at = np.searchsorted(items, wanted)
            at = np.minimum(at, max(len(items) - 1, 0))
            found = (items[at] == wanted) if len(items) else np.zeros(len(wanted), dtype=bool)
            return np.where(found, scores[at] if len(items) else 0.0, 0.0)

        cf_items, cf_scores = self.item_cf(history)
        item_cf = lookup(cf_items, cf_scores, candidates)
        vector = self.query(history)
        if vector is None:
            embedding = np.zeros(len(candidates))
            embedding_stats = (0.0, 0.0)
        else:
            embedding = (self.vectors[candidates] @ vector).astype(np.float64)
            seen_scores = (self.vectors[seen] @ vector).astype(np.float64)
            wide = vector.astype(np.float64)
            mean = (wide @ self.total - seen_scores.sum()) / unseen_count
            variance = (wide @ self.gram @ wide - (seen_scores ** 2).sum()) / unseen_count - mean * mean
            embedding_stats = (mean, math.sqrt(max(variance, 0.0)))

        def z(values, stats):
            mean, std = stats
            return (values - mean) / std if std > 1e-9 else np.zeros(len(values))

        columns = []
        for source in self.cross:
            if source == "item_cf_score":
                columns.append(item_cf)
            elif source == "item_cf_zscore":
                columns.append(z(item_cf, sparse_standardised(cf_items, cf_scores)))
            elif source == "item_cf_recent_score":
                columns.append(lookup(*self.item_cf(history[:RECENT_ITEMS]), candidates))
            elif source == "embedding_score":
                columns.append(embedding)
            elif source == "embedding_zscore":
                columns.append(z(embedding, embedding_stats))
        return np.stack(columns, axis=1).astype(np.float32)


def item_statistics(items: np.ndarray, timestamps: np.ndarray, liked: np.ndarray, num_items: int,
                    sources: list[str]) -> dict[str, np.ndarray]:
    """``features.item_statistics`` as columns: interactions, each ``interactions_<N>d`` up
    to the end of the data, and the smoothed like rate."""
    stats = {"interactions": np.bincount(items, minlength=num_items).astype(np.float64)}
    end = int(timestamps.max()) if len(timestamps) else 0
    for source in sources:
        days = feature_module.window_days(source)
        if days is not None and source.startswith("interactions_"):
            recent = end - timestamps < days * DAY_SECONDS
            stats[source] = np.bincount(items[recent], minlength=num_items).astype(np.float64)
    likes = np.bincount(items[liked], minlength=num_items).astype(np.float64)
    stats["like_rate"] = np.round((likes + 1.0) / (stats["interactions"] + 2.0), 6)
    return stats


def item_sources(table: dict, stats: dict[str, np.ndarray], item: int) -> dict:
    genres = table["genres"][item] if table["genres"] else ""
    return {"genres": [g for g in (genres or "").split("|") if g],
            "year": int(table["year"][item]) if table["year"] is not None else 0,
            **{name: float(values[item]) for name, values in stats.items()}}


class Users:
    """Each user's training history (latest first) and attributes, from user-then-time
    ordered columns."""

    def __init__(self, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, table: UserTable) -> None:
        self.items, self.timestamps, self.table = items, timestamps, table
        boundaries = np.flatnonzero(np.diff(users)) + 1
        self.starts = np.concatenate(([0], boundaries))
        self.ends = np.concatenate((boundaries, [len(users)]))
        self.position = np.full(len(table.ids), -1, dtype=np.int64)
        self.position[users[self.starts]] = np.arange(len(self.starts))

    def history(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, timestamps) latest first, at most MAX_HISTORY."""
        at = self.position[user]
        if at < 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        start, end = self.starts[at], self.ends[at]
        start = max(start, end - MAX_HISTORY)
        return self.items[start:end][::-1], self.timestamps[start:end][::-1]

    def sources(self, user: int, names: list[str], request_time: int | None) -> dict:
        _, timestamps = self.history(user)
        profile = User(user_id=self.table.ids[user], age=int(self.table.age[user]),
                                      gender=str(self.table.gender[user]), occupation=str(self.table.occupation[user]))
        return feature_module.user_sources(profile, timestamps.tolist(), len(timestamps), names, request_time)


@dataclass
class RankerRows:
    users: np.ndarray
    items: np.ndarray
    cross: np.ndarray
    labels: np.ndarray
    user_features: np.ndarray
    histories: np.ndarray
    request_times: np.ndarray
    #: The candidates' live item columns (``FeatureConfig.live_item``), encoded.
    live: np.ndarray | None = None

    def tensors(self, item_rows: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The fine model's inputs in ONNX order; every user is unknown (index 0)."""
        return (torch.zeros(len(self.items), dtype=torch.int64), torch.as_tensor(self.items + 1),
                torch.as_tensor(self.histories), torch.as_tensor(self.user_features),
                torch.as_tensor(feature_module.with_live_columns(item_rows[self.items], self.live)),
                torch.as_tensor(self.cross))


def candidates_of(user_history: np.ndarray, cross: CrossFeatures, index, config: RankerScaleConfig,
                  rng: np.random.Generator, num_items: int) -> np.ndarray:
    """What recall would hand rank: the embedding and item-to-item channels' best unseen
    items, plus random unseen ones."""
    seen = set(user_history.tolist())
    proposals = []
    query = cross.query(user_history)
    if query is not None:
        found = index(query, config.recall_candidates + len(seen))
        proposals.extend([item for item in found if item not in seen][:config.recall_candidates])
    cf_items, cf_scores = cross.item_cf(user_history)
    order = cf_items[np.argsort(-cf_scores, kind="stable")]
    proposals.extend([item for item in order[:config.recall_candidates + len(seen)].tolist()
                      if item not in seen][:config.recall_candidates])
    random = rng.integers(0, num_items, config.random_negatives + len(seen))
    proposals.extend([item for item in random.tolist() if item not in seen][:config.random_negatives])
    return np.unique(np.asarray(proposals, dtype=np.int64))


def ranker_rows(users: Users, sample: np.ndarray, held_items: np.ndarray, held_times: np.ndarray,
                cross: CrossFeatures, index, features: FeatureConfig, config: RankerScaleConfig,
                rng: np.random.Generator, num_items: int) -> RankerRows:
    user_names = [f.source for f in features.user]
    parts: dict[str, list] = {name: [] for name in ("users", "items", "cross", "labels", "user_features", "histories",
                                                    "request_times")}
    for user, target, request_time in zip(sample.tolist(), held_items.tolist(), held_times.tolist()):
        history, _ = users.history(user)
        candidates = candidates_of(history, cross, index, config, rng, num_items)
        if len(candidates) == 0:
            continue
        user_row = features.encode_user(users.sources(user, user_names, int(request_time)))
        padded = np.zeros(features.history_length, dtype=np.int64)
        padded[:min(len(history), features.history_length)] = history[:features.history_length] + 1
        parts["users"].append(np.full(len(candidates), user, dtype=np.int64))
        parts["items"].append(candidates)
        parts["cross"].append(cross.features(history, candidates))
        parts["labels"].append((candidates == target).astype(np.float32))
        parts["user_features"].append(np.repeat(np.asarray([user_row], dtype=np.float32), len(candidates), axis=0))
        parts["histories"].append(np.repeat(padded[None, :], len(candidates), axis=0))
        parts["request_times"].append(np.full(len(candidates), request_time, dtype=np.int64))
    return RankerRows(**{name: np.concatenate(values) for name, values in parts.items()})


def resolve_features(raw: dict, users: Users, sample: np.ndarray, item_table: dict, stats: dict[str, np.ndarray],
                     num_items: int) -> FeatureConfig:
    user_names = feature_module.source_names(raw, "user")
    user_values = [users.sources(user, user_names, None) for user in sample.tolist()]
    item_values = [item_sources(item_table, stats, item) for item in range(num_items)]
    return feature_module.resolve(raw, user_values, item_values)


def item_feature_rows(features: FeatureConfig, item_table: dict, stats: dict[str, np.ndarray],
                      num_items: int) -> np.ndarray:
    """[num_items, item_dim]: each item's encoded features, encoded one item at a time by
    the same code as the MovieLens pipeline (rank-svc's encoding is tested against it)."""
    out = np.zeros((num_items, features.item_dim), dtype=np.float32)
    for item in range(num_items):
        out[item] = features.encode_item(item_sources(item_table, stats, item))
    return out


def fit(model, inputs, labels: torch.Tensor, loss_of, epochs: int, config: RankerScaleConfig, rng, log, label: str,
        evaluate) -> None:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    count = len(labels)
    for epoch in range(epochs):
        model.train()
        order = torch.as_tensor(rng.permutation(count))
        total, started = 0.0, time.monotonic()
        for start in range(0, count, config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = loss_of(model, [t[batch] for t in inputs], labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        model.eval()
        log(f"{label} epoch {epoch + 1}/{epochs}: loss {total / count:.4f}, validation AUC {evaluate():.4f} "
            f"({count / (time.monotonic() - started):,.0f} rows/s)")


def train_rankers(users: Users, held_rows: np.ndarray, columns, vectors: np.ndarray, rows: SparseRows,
                  stats: dict[str, np.ndarray], index, raw_features: dict, config: RankerScaleConfig,
                  rng: np.random.Generator, log):
    """The coarse and fine rankers, their feature configuration, item feature rows and
    validation metrics. ``held_rows``: each user's held-out last interaction (row index
    into ``columns``); ``index(query, k)``: the approximate top-k of the embedding channel."""
    from .train import predict

    num_items = len(vectors)
    held_rows = held_rows[~is_evaluation_user(columns.users[held_rows])]
    chosen = rng.permutation(held_rows)[:config.training_users + config.validation_users]
    validation_count = min(config.validation_users, len(chosen) // 5)
    validation, training = chosen[:validation_count], chosen[validation_count:]
    resolve_sample = rng.choice(len(users.table.ids), min(config.resolve_users, len(users.table.ids)), replace=False)
    features = resolve_features(raw_features, users, resolve_sample, columns.item_table, stats, num_items)
    item_rows = item_feature_rows(features, columns.item_table, stats, num_items)
    log(f"features resolved: user {features.user_dim}, item {features.item_dim}, cross {features.cross_dim} columns")
    cross = CrossFeatures(vectors, rows, features.cross)

    def rows_for(sample):
        return ranker_rows(users, columns.users[sample], columns.items[sample], columns.timestamps[sample], cross,
                           index, features, config, rng, num_items)

    started = time.monotonic()
    train_rows, validation_rows = rows_for(training), rows_for(validation)
    log(f"ranker rows: {len(train_rows.labels):,} training ({int(train_rows.labels.sum()):,} positive) from "
        f"{len(training):,} users, {len(validation_rows.labels):,} validation, in {time.monotonic() - started:.0f} s")
    # The candidates' windowed counts as of each request, from every event before it.
    live_names = feature_module.live_sources(raw_features)

    def live_values(rows: RankerRows) -> dict[str, np.ndarray]:
        return columns.events.values(rows.items, rows.request_times, live_names)

    started = time.monotonic()
    feature_module.attach_live_items(features, raw_features, live_values, train_rows, validation_rows)
    log(f"live item features {[f.source for f in features.live_item]} in {time.monotonic() - started:.0f} s")
    train_inputs, validation_inputs = train_rows.tensors(item_rows), validation_rows.tensors(item_rows)
    labels = torch.as_tensor(train_rows.labels)

    # One positive per user among a hundred or more candidates: weighted up (to at most
    # 50 negatives' worth), or the cheapest way down the loss is to push every candidate
    # that looks like a recall proposal down, positives included.
    positives = float(labels.sum())
    pos_weight = torch.tensor(min(max((len(labels) - positives) / max(positives, 1.0), 1.0), 50.0))

    def bce(model, feed, targets):
        logit = model.logit(*feed) if isinstance(model, CoarseRanker) else model.logits(*feed)[0]
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, targets, pos_weight=pos_weight)

    coarse = CoarseRanker(features.coarse_cross)
    fit(coarse, (train_inputs[-1],), labels, bce, config.coarse_epochs, config, rng, log, "coarse",
        lambda: auc(validation_rows.labels, predict(coarse, (validation_inputs[-1],))))
    # No user-id table: index 0 (unknown) is every user's.
    fine = FINE_RANKERS[features.fine_model](0, num_items, features.user_dim, features.ranker_item_dim,
                                             features.cross_dim, features.embedding_dim, base=coarse, like_weight=0.0)
    fit(fine, train_inputs, labels, bce, config.epochs, config, rng, log, features.fine_model,
        lambda: auc(validation_rows.labels, predict(fine, validation_inputs)))
    metrics = {
        "coarse_auc_recall_candidates": auc(validation_rows.labels, predict(coarse, (validation_inputs[-1],))),
        "fine_auc_recall_candidates": auc(validation_rows.labels, predict(fine, validation_inputs)),
    }
    return fine, coarse, features, validation_rows, validation_inputs, metrics
