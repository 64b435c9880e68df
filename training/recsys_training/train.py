"""Trains every model of a bundle from one data directory and publishes the bundle."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import bundle, compress, content, crosses, item_to_item, sequence
from .data import Dataset, Interaction, load_dataset
from .features import (
    CrossScorer, FeatureConfig, ItemEventLog, UserHistory, attach_live_items, build_config, encode_live,
    history_tensor, item_feature_rows, item_statistics, live_sources, load_raw_config, source_names,
    user_feature_rows, user_histories, user_sources, with_live_columns,
)
from .models import FINE_RANKERS, BprMatrixFactorization, CoarseRanker, LightGcn, auc, normalised_graph


@dataclass
class TrainConfig:
    seed: int = 42
    # Retrieval vectors (the embedding and real-time channels, the embedding cross features):
    # "lightgcn" (propagation over the user–item graph, models.LightGcn) or "bpr" (matrix
    # factorisation). On the published MovieLens split, their dot-product top-10 alone
    # scores nDCG@10 0.435 (LightGCN, 60 epochs) against 0.293 (BPR, 40 epochs).
    vector_model: str = "lightgcn"
    embedding_dim: int = 64
    bpr_epochs: int = 40
    bpr_lr: float = 0.01
    bpr_l2: float = 1e-4
    # LightGCN: layers of propagation, epochs (each a pass over the interactions in
    # batches of `graph_batch`, the graph propagated once per batch), learning rate and L2.
    graph_layers: int = 3
    graph_epochs: int = 60
    graph_batch: int = 4096
    graph_lr: float = 0.01
    graph_l2: float = 1e-4
    # The graph's edge weights by event type — the article's view 1 / click 2 / share 3 /
    # purchase 5, a like standing for a share — and a rating's by its stars (stars / 5);
    # a user and item with several events keep the heaviest.
    graph_event_weights: dict[str, float] = field(
        default_factory=lambda: {"impression": 1.0, "click": 2.0, "like": 3.0, "purchase": 5.0})
    # Item-to-item model: DLAE (EASE trained with input dropout) for the head items,
    # windowed co-occurrence for the tail (item_to_item.py); ridge strength, dropout, head
    # size, window and weights kept per item. The weights are dense and serving reads the
    # strongest `neighbors` per item: on the published MovieLens split EASE (λ 400) scores
    # nDCG@10 0.4856 with every weight, 0.4844 with 400 per item and 0.4810 with 200 (the
    # item-CF channel served 0.4810 → 0.4844 and the ranked list rose as much: recall and
    # rank-svc add one weight per history item and neighbour, so serving work grows with it).
    # With 400 per item, DLAE (dropout 0.5, λ 300) scores 0.4916 against EASE's best 0.4860
    # (λ 300-500); on two other random 75/25 splits 0.4910 vs 0.4860 and 0.4915 vs 0.4859.
    item_cf_l2: float = 300.0
    item_cf_dropout: float = 0.5
    item_cf_head_items: int = 8_000
    item_cf_window: int = 5
    neighbors: int = 400
    # Rankers learn from a part of the training data held out from the models that make
    # their features (like serving, where features come from past behaviour only).
    ranker_holdout: float = 0.2
    # Disjoint held-out parts the rankers learn from, each `ranker_holdout` of the data with
    # its features fitted on the rest (cross-fitting): with all five, every training
    # interaction is a label once. The first part also gives the validation rows; the others
    # add training rows only, at the cost of fitting the feature models once more each. On
    # the published MovieLens split (make eval's protocol, one training run each): 1 part
    # served nDCG@10 0.4776 (+fine step 0.4841), 2 parts 0.4819 (0.4868), 5 parts 0.4861
    # (0.4914); training takes about 3x as long as with one part.
    ranker_folds: int = 5
    ranker_candidates: int = 100
    ranker_random_negatives: int = 100
    ranker_validation_users: float = 0.1
    ranker_epochs: int = 4
    # The coarse model learns from the click loss plus, at this weight, a per-user softmax
    # term (coarse_loss) in batches that keep a user's rows together, for 8 epochs. With the
    # click loss alone (3 epochs) one training seed of two on make eval's published split
    # ended in a poor optimum (+ coarse nDCG@10 0.4624 where the other reached 0.4952); the
    # softmax term ranks each user's candidates against each other, which is what serving
    # asks of the coarse model (measured over seeds in the README).
    coarse_listwise_weight: float = 0.1
    coarse_epochs: int = 8
    ranker_lr: float = 2e-3
    ranker_weight_decay: float = 0.0
    user_dropout: float = 0.1
    # Share of fine-model training rows shown as a user with no behaviour (no id, no
    # history, no cross features, profile only), as serving sees a user who has just
    # arrived; without them the model never sees such a user and orders popular items
    # worse than their popularity does (measured by `make eval`'s temporal protocol).
    behaviour_dropout: float = 0.1
    batch_size: int = 512
    auc_negatives: int = 4
    threads: int = 2
    feature_config: str = ""
    # The distilled student (compress.py): epochs, and the fraction of its weights pruned.
    student_epochs: int = 4
    student_prune: float = 0.0
    # Items without interactions take the vector their attributes map to (content.py):
    # the ridge strength of that map, and the share of users whose best such item scores
    # high enough to be shown in rerank's new-item slot (the bundle's threshold): a third,
    # where `make eval`'s cold-start protocol keeps both of its targets with a margin
    # (new items' recall against the warm items' loss; measured along it in the README).
    content_l2: float = 30.0
    cold_start_share: float = 0.33
    # Draws of stand-in items the threshold is the median of (cold_start_policy; odd, so the
    # median is a draw's; 0 ships no cold-start section).
    cold_start_draws: int = 25
    # The sequence channel's encoder (sequence.py): the latest items it reads, the span of
    # later items each position learns to predict, epochs (0: the bundle ships none).
    sequence_length: int = 50
    sequence_future_window: int = 10
    sequence_epochs: int = 20
    # The bundle's popularity (the popular channel, the orchestrator's fallback, the order a
    # user without behaviour is served in): each interaction counts 0.5^(age / half-life),
    # its age taken from the latest training interaction (0: every interaction counts 1).
    # On make eval's temporal split, 14 days served users who arrived after the cut
    # nDCG@10 0.514 where all-time popularity served 0.451 (7 days 0.508, 30 days 0.506).
    popularity_half_life_days: float = 14.0
    # Automated feature crosses (crosses.py, the feature configuration's `[crosses]`):
    # False trains without them (make eval's ablation of what they add).
    feature_crosses: bool = True


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[train {time.monotonic() - _STARTED:6.1f}s] {message}", flush=True)


def _numeric_first(ids):
    return sorted(ids, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def fit_bpr_loss(model, num_items: int, user_idx, item_idx, epochs: int, batch_size: int, lr: float, l2: float,
                 rng, label: str) -> None:
    """Adam on ``model.bpr_loss`` over the interactions in shuffled batches, one uniformly
    sampled negative item per interaction and epoch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    users_t = torch.as_tensor(user_idx)
    items_t = torch.as_tensor(item_idx)
    n = len(user_idx)
    for epoch in range(epochs):
        permutation = torch.as_tensor(rng.permutation(n))
        negatives = torch.as_tensor(rng.integers(0, num_items, n))
        total = 0.0
        for start in range(0, n, batch_size):
            batch = permutation[start:start + batch_size]
            loss = model.bpr_loss(users_t[batch], items_t[batch], negatives[batch], l2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"{label} epoch {epoch + 1}/{epochs} loss {total / max(n, 1):.4f}")


def train_bpr(num_users, num_items, user_idx, item_idx, config: TrainConfig, rng, label: str) -> tuple[np.ndarray, np.ndarray]:
    model = BprMatrixFactorization(num_users, num_items, config.embedding_dim)
    fit_bpr_loss(model, num_items, user_idx, item_idx, config.bpr_epochs, 4096, config.bpr_lr, config.bpr_l2, rng,
                 f"bpr ({label})")
    return model.users.weight.detach().numpy().copy(), model.items.weight.detach().numpy().copy()


def edge_weight(interaction: Interaction, config: TrainConfig) -> float:
    """The graph's weight of one interaction (``graph_event_weights``; a rating: stars / 5)."""
    if interaction.event == "rating" and interaction.rating > 0:
        return interaction.rating / 5.0
    return config.graph_event_weights.get(interaction.event, 1.0)


def train_lightgcn(num_users, num_items, user_idx, item_idx, weights, config: TrainConfig, rng,
                   label: str) -> tuple[np.ndarray, np.ndarray]:
    graph = normalised_graph(num_users, num_items, user_idx, item_idx, weights)
    model = LightGcn(num_users, num_items, config.embedding_dim, graph, config.graph_layers)
    fit_bpr_loss(model, num_items, user_idx, item_idx, config.graph_epochs, config.graph_batch, config.graph_lr,
                 config.graph_l2, rng, f"lightgcn ({label})")
    with torch.no_grad():
        vectors = model.propagate().numpy().copy()
    return vectors[:num_users], vectors[num_users:]


@dataclass
class ModelState:
    """Everything features are computed from, fitted on one set of interactions."""
    histories: list[UserHistory]
    statistics: dict[str, dict[str, float]]
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    neighbor_rows: item_to_item.SparseRows
    neighbor_weights: np.ndarray
    cross: CrossScorer
    # Content features → item vector (content.py), fitted on the items with interactions.
    content_map: np.ndarray | None = None
    user_rows: np.ndarray | None = None
    item_rows: np.ndarray | None = None
    history_rows: np.ndarray | None = None


@dataclass
class Universe:
    dataset: Dataset
    user_ids: list[str]
    user_position: dict[str, int]
    item_position: dict[str, int]
    raw_features: dict
    # The items' attributes as the content map reads them (content.py).
    content_encoding: content.ContentEncoding
    content_features: np.ndarray


def fit_state(universe: Universe, interactions: list[Interaction], config: TrainConfig, rng, label: str) -> ModelState:
    num_users, num_items = len(universe.user_ids), len(universe.dataset.items)
    heaviest: dict[tuple[int, int], float] = {}
    for interaction in interactions:
        pair = (universe.user_position[interaction.user_id], universe.item_position[interaction.item_id])
        heaviest[pair] = max(heaviest.get(pair, 0.0), edge_weight(interaction, config))
    pairs = sorted(heaviest)
    user_idx = np.array([p[0] for p in pairs], dtype=np.int64)
    item_idx = np.array([p[1] for p in pairs], dtype=np.int64)
    if config.vector_model == "lightgcn":
        weights = np.array([heaviest[pair] for pair in pairs], dtype=np.float64)
        user_vectors, item_vectors = train_lightgcn(num_users, num_items, user_idx, item_idx, weights, config, rng,
                                                    label)
    elif config.vector_model == "bpr":
        user_vectors, item_vectors = train_bpr(num_users, num_items, user_idx, item_idx, config, rng, label)
    else:
        raise ValueError(f"vector_model must be 'lightgcn' or 'bpr', not {config.vector_model!r}")
    has_interactions = np.zeros(num_items, dtype=bool)
    has_interactions[item_idx] = True
    content_map = content.fit_content_map(item_vectors, has_interactions, universe.content_features,
                                          config.content_l2)
    if content_map is not None and not has_interactions.all():
        log(f"content vectors ({label}) for {int((~has_interactions).sum())} items without interactions")
        item_vectors = content.map_cold_vectors(item_vectors, has_interactions, universe.content_features,
                                                content_map)
    head_method = "DLAE" if config.item_cf_dropout > 0 else "EASE"
    log(f"item-to-item weights ({label}): {head_method} for up to {config.item_cf_head_items} head items (l2 "
        f"{config.item_cf_l2}, dropout {config.item_cf_dropout}), co-occurrence for the rest, "
        f"{config.neighbors} per item")
    rows = item_to_item.fit(
        np.array([universe.user_position[i.user_id] for i in interactions], dtype=np.int64),
        np.array([universe.item_position[i.item_id] for i in interactions], dtype=np.int64),
        np.array([i.timestamp for i in interactions], dtype=np.int64), num_users, num_items,
        item_to_item.ItemToItemConfig(head_items=config.item_cf_head_items, l2=config.item_cf_l2,
                                      dropout=config.item_cf_dropout, window=config.item_cf_window,
                                      keep=config.neighbors))
    weights = rows.dense(num_items)
    histories = user_histories(interactions, universe.user_position, universe.item_position, num_users)
    statistics = item_statistics(universe.dataset.items, interactions, source_names(universe.raw_features, "item"))
    return ModelState(histories, statistics, user_vectors, item_vectors, rows, weights,
                      CrossScorer(weights, user_vectors, item_vectors, source_names(universe.raw_features, "cross")),
                      content_map)


def encode_state(state: ModelState, universe: Universe, features: FeatureConfig,
                 request_times: list[int | None] | None = None) -> None:
    state.user_rows = user_feature_rows(features, universe.dataset, universe.user_ids, state.histories, request_times)
    state.item_rows = item_feature_rows(features, universe.dataset.items, state.statistics)
    state.history_rows = history_tensor(state.histories, features.history_length)


@dataclass
class RankerRows:
    users: np.ndarray
    items: np.ndarray
    cross: np.ndarray
    labels: np.ndarray
    # 1 where the held-out interaction was a like (rating >= 4, like or purchase).
    likes: np.ndarray
    # The candidates' live item columns (``FeatureConfig.live_item``), encoded.
    live: np.ndarray | None = None

    def tensors(self, state: ModelState) -> tuple[torch.Tensor, ...]:
        """The fine model's inputs, in ONNX input order (ids are 1-based, 0 = unknown)."""
        return (torch.as_tensor(self.users + 1), torch.as_tensor(self.items + 1),
                torch.as_tensor(state.history_rows[self.users]), torch.as_tensor(state.user_rows[self.users]),
                torch.as_tensor(with_live_columns(state.item_rows[self.items], self.live)),
                torch.as_tensor(self.cross))

    def take(self, index: np.ndarray) -> "RankerRows":
        return RankerRows(self.users[index], self.items[index], self.cross[index], self.labels[index], self.likes[index],
                          None if self.live is None else self.live[index])


def ranker_rows(state: ModelState, users: np.ndarray, held_out: dict[int, set[int]], liked: set[tuple[int, int]],
                config: TrainConfig, rng, hard: bool) -> RankerRows:
    """Training/validation rows for the rankers, per user with held-out items.

    ``hard``: the item-to-item model's best unseen items plus as many random unseen ones
    (what recall hands the rankers), labelled 1 when held out. Positives outside that set
    are not added: every region of the score range must keep its true share of positives,
    or the models learn that weak candidates are often right.

    Otherwise: the held-out items against ``auc_negatives`` random unseen items each (the
    classic sampled-negative AUC set)."""
    num_items = state.item_vectors.shape[0]
    all_users, all_items, all_cross, all_labels, all_likes = [], [], [], [], []
    for user in users:
        positives = held_out.get(int(user), set())
        if not positives:
            continue
        history = state.histories[user].items
        unseen = np.ones(num_items, dtype=bool)
        unseen[history] = False
        candidates = np.flatnonzero(unseen)
        if hard:
            scores = state.cross.item_cf_scores(history)[candidates]
            top = candidates[np.argsort(-scores, kind="stable")[:config.ranker_candidates]]
            # The embedding channel's best too: recall fuses both, so the rankers must
            # learn to order either's proposals.
            nearest = state.item_vectors[candidates] @ state.user_vectors[user]
            top = np.union1d(top, candidates[np.argsort(-nearest, kind="stable")[:config.ranker_candidates]])
            random = rng.choice(candidates, min(config.ranker_random_negatives, len(candidates)), replace=False)
            items = np.union1d(top, random).astype(np.int64)
        else:
            negatives = np.setdiff1d(candidates, list(positives))
            negatives = rng.choice(negatives, min(config.auc_negatives * len(positives), len(negatives)), replace=False)
            items = np.concatenate([np.array(sorted(positives), dtype=np.int64), negatives.astype(np.int64)])
        all_users.append(np.full(len(items), user, dtype=np.int64))
        all_items.append(items)
        all_cross.append(state.cross.features(int(user), history, items))
        all_labels.append(np.isin(items, list(positives)).astype(np.float32))
        all_likes.append(np.array([(int(user), int(item)) in liked for item in items], dtype=np.float32))
    return RankerRows(np.concatenate(all_users), np.concatenate(all_items), np.concatenate(all_cross),
                      np.concatenate(all_labels), np.concatenate(all_likes))


def automated_crosses(universe: Universe, past: ModelState, past_interactions: list[Interaction],
                      features: FeatureConfig, config: TrainConfig, asked_at: np.ndarray, rng,
                      other_folds: list[OtherFold], train_rows: RankerRows, validation_rows: RankerRows,
                      *other_rows: RankerRows) -> dict | None:
    """The feature configuration's `[crosses]` (crosses.py): every candidate fitted on the
    past interactions, those the probe keeps (trained on `train_rows`, judged on
    `validation_rows`) appended to every row set's cross columns (``other_folds``' from
    their own histories), and their tables —
    refitted on all the data, as every shipped model is — to `features`. Returns the
    selection report (None without a `[crosses]` section)."""
    spec = universe.raw_features.get("crosses")
    if not spec or not config.feature_crosses:
        return None
    dataset = universe.dataset
    items_by_id = {item.item_id: item for item in dataset.items}
    smoothing = float(spec.get("smoothing", 50.0))
    if not smoothing > 0:
        raise ValueError(f"feature_config [crosses] smoothing = {smoothing}: it must be above 0 (a lift of a value "
                         "nobody chose would be -inf)")
    pairs = [(user_field, item_field) for user_field in spec.get("user", []) for item_field in spec.get("item", [])]
    candidates = [crosses.fit_cross(u, i, past_interactions, dataset.users, items_by_id, smoothing) for u, i in pairs]
    # A field with no value in the data (no item has a year) makes no candidate.
    candidates = [c for c in candidates if c.item_values and (c.user_values or c.user_field == "history")]

    profiles = [dataset.users.get(user_id) for user_id in universe.user_ids]

    def candidate_columns(rows: RankerRows, chosen: list[crosses.AttributeCross],
                          state: ModelState = past) -> np.ndarray:
        return crosses.columns(chosen, dataset.items, profiles, [history.items for history in state.histories],
                               rows.users, rows.items, asked_at[rows.users])

    def probe_inputs(rows: RankerRows) -> np.ndarray:
        return np.hstack([past.user_rows[rows.users], past.item_rows[rows.items], rows.cross])

    train_columns, validation_columns = candidate_columns(train_rows, candidates), candidate_columns(validation_rows,
                                                                                                       candidates)
    selection = crosses.select(probe_inputs(train_rows), train_columns, train_rows.labels,
                               probe_inputs(validation_rows), validation_columns, validation_rows.labels,
                               [c.name for c in candidates], float(spec.get("min_gain", 0.0)),
                               float(spec.get("min_z", 2.0)), int(spec.get("max_kept", len(candidates))), rng)
    log(f"feature crosses: kept {selection.report['kept'] or 'none'} of {len(candidates)} candidates "
        f"(held-out log-loss gains: " + ", ".join(f"{row['name']} {row['held_out_log_loss_gain']:+.5f}"
                                                 for row in selection.report["candidates"]) + ")")
    kept = [candidates[n] for n in selection.kept]
    train_rows.cross = np.hstack([train_rows.cross, train_columns[:, selection.kept]])
    validation_rows.cross = np.hstack([validation_rows.cross, validation_columns[:, selection.kept]])
    for rows in other_rows:
        rows.cross = np.hstack([rows.cross, candidate_columns(rows, kept)])
    for fold in other_folds:
        fold.rows.cross = np.hstack([fold.rows.cross, candidate_columns(fold.rows, kept, fold.state)])
    shipped = [crosses.fit_cross(c.user_field, c.item_field, dataset.interactions, dataset.users, items_by_id,
                                 smoothing) for c in kept]
    features.attribute_crosses = [table.to_json() for table in shipped]
    features.cross = features.cross + [table.name for table in shipped]
    return selection.report


def _fit(model, inputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...], loss_of, epochs: int,
         config: TrainConfig, rng, evaluate, label: str, drop_user_ids: bool,
         cold_user_rows: torch.Tensor | None = None, profile_cross: torch.Tensor | None = None,
         groups: np.ndarray | None = None) -> None:
    """Mini-batch Adam on ``loss_of(model, feed, targets)``, keeping the epoch with the
    best ``evaluate()`` (validation AUC). With ``cold_user_rows`` (each user's encoded
    features with no history), a ``behaviour_dropout`` share of the fine model's rows is
    shown as that user with no behaviour at all (``as_new_users``). With ``groups`` (a label
    per row), each epoch's order keeps a group's rows together (``grouped_permutation``)."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.ranker_lr,
                                  weight_decay=config.ranker_weight_decay)
    n = len(targets[0])
    best_auc, best_state = evaluate(), copy.deepcopy(model.state_dict())
    for epoch in range(epochs):
        model.train()
        permutation = torch.as_tensor(rng.permutation(n) if groups is None else grouped_permutation(groups, rng))
        total = 0.0
        for start in range(0, n, config.batch_size):
            batch = permutation[start:start + config.batch_size]
            feed = [t[batch] for t in inputs]
            if cold_user_rows is not None:
                cold = torch.as_tensor(rng.random(len(batch)) < config.behaviour_dropout)
                feed = as_new_users(feed, cold, cold_user_rows, profile_cross)
            if drop_user_ids:
                # Drop user ids now and then so index 0 (unknown user) learns a sensible default.
                dropped = torch.as_tensor(rng.random(len(batch)) < config.user_dropout)
                feed[0] = torch.where(dropped, torch.zeros_like(feed[0]), feed[0])
            loss = loss_of(model, feed, [t[batch] for t in targets])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        model.eval()
        val_auc = evaluate()
        log(f"{label} epoch {epoch + 1}/{epochs} loss {total / n:.4f} val_auc {val_auc:.4f}")
        if val_auc > best_auc:
            best_auc, best_state = val_auc, copy.deepcopy(model.state_dict())
    # Early stopping: the epoch with the best validation AUC is kept.
    model.load_state_dict(best_state)
    model.eval()


def as_new_users(feed: list[torch.Tensor], cold: torch.Tensor, cold_user_rows: torch.Tensor,
                 profile_cross: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The fine model's inputs (FINE_INPUTS order) with the rows marked ``cold`` turned
    into what serving builds for a user with no behaviour: unknown user id, an empty
    history, the user's profile features with no events, and cross features of zero (no
    history: no item-to-item scores, no embedding query) — but for the columns
    ``profile_cross`` marks (attribute crosses of the profile or the request's time, which
    serving computes without a history)."""
    users, items, history, user_features, item_features, cross = feed
    column = cold[:, None]
    zeroed = column if profile_cross is None else column & ~profile_cross[None, :cross.shape[1]]
    return [
        torch.where(cold, torch.zeros_like(users), users),
        items,
        torch.where(column, torch.zeros_like(history), history),
        torch.where(column, cold_user_rows[users - 1], user_features),
        item_features,
        torch.where(zeroed, torch.zeros_like(cross), cross),
    ]


def grouped_permutation(groups: np.ndarray, rng) -> np.ndarray:
    """A random order of the rows in which each group's rows stay together: the groups
    are shuffled, the rows within one keep their order."""
    _, group = np.unique(groups, return_inverse=True)
    rank = rng.permutation(int(group.max()) + 1 if len(group) else 0)
    return np.argsort(rank[group], kind="stable")


def row_groups(parts: list[RankerRows], num_users: int) -> np.ndarray:
    """A label per row, one per (held-out part, user): the rows one request of that user
    would rank together."""
    return np.concatenate([index * num_users + rows.users for index, rows in enumerate(parts)]).astype(np.int64)


def coarse_loss(listwise_weight: float):
    """Click loss (binary cross-entropy) on every row, minus ``listwise_weight`` times the
    mean log-softmax of each positive row's logit over the rows of its group (targets:
    clicks, group labels) in the batch — a sampled softmax per user, whose negatives are the
    user's other candidates."""
    def loss(model, feed, targets):
        clicks, groups = targets
        logit = model.logit(*feed)
        total = torch.nn.functional.binary_cross_entropy_with_logits(logit, clicks)
        positive = clicks > 0
        if listwise_weight > 0 and positive.any():
            _, group = torch.unique(groups, return_inverse=True)
            count = int(group.max()) + 1
            # log-sum-exp per group, shifted by the group's largest logit for stability.
            peak = torch.full((count,), -torch.inf, dtype=logit.dtype).scatter_reduce(
                0, group, logit.detach(), "amax")
            sums = torch.zeros(count, dtype=logit.dtype).index_add(0, group, torch.exp(logit - peak[group]))
            log_softmax = logit - (peak + torch.log(sums))[group]
            total = total - listwise_weight * log_softmax[positive].mean()
        return total
    return loss


def multi_task_loss(like_loss_weight: float):
    """Click loss on every row plus the like loss on the engaged (click = 1) rows."""
    def loss(model, feed, targets):
        clicks, likes = targets
        click_logit, like_logit = model.logits(*feed)
        total = torch.nn.functional.binary_cross_entropy_with_logits(click_logit, clicks)
        engaged = clicks > 0
        if like_loss_weight > 0 and engaged.any():
            total = total + like_loss_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                like_logit[engaged], likes[engaged])
        return total
    return loss


def predict(model, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(*(t[s:s + 8192] for t in inputs)).numpy()
                               for s in range(0, len(inputs[0]), 8192)]) if len(inputs[0]) else np.zeros(0)


def like_auc(model, rows: RankerRows, inputs: tuple[torch.Tensor, ...]) -> float:
    """AUC of the like head among held-out (engaged) rows: liked vs not liked."""
    engaged = rows.labels > 0
    if engaged.sum() == 0:
        return float("nan")
    with torch.no_grad():
        _, like_logit = model.logits(*(t[torch.as_tensor(engaged)] for t in inputs))
    return auc(rows.likes[engaged], like_logit.numpy())


def export_onnx(model, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path) -> float:
    """Exports with a dynamic batch axis and returns the max abs difference between
    PyTorch and ONNX Runtime on ``inputs`` (a held-out batch)."""
    import onnxruntime

    sample = tuple(t[:8] for t in inputs)
    torch.onnx.export(
        model, sample, str(path), input_names=names, output_names=["score"],
        dynamic_axes={**{n: {0: "batch"} for n in names}, "score": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_scores = session.run(["score"], {n: t.numpy() for n, t in zip(names, inputs)})[0]
    return float(np.max(np.abs(onnx_scores - predict(model, inputs))))


def smaller_fine_models(teacher, coarse, features: FeatureConfig, num_users: int, num_items: int,
                        train_inputs, clicks, validation_rows: RankerRows, validation_inputs, auc_rows: RankerRows,
                        auc_inputs, staging: Path, config: TrainConfig, rng,
                        cold_user_rows: torch.Tensor | None = None,
                        profile_cross: torch.Tensor | None = None) -> dict[str, float]:
    """Writes the INT8 copy of the exported teacher and the distilled student next to it,
    and returns their held-out AUCs against the teacher's, all scored by onnxruntime."""
    shape = compress.StudentShape(prune=config.student_prune)

    def onnx_auc(path: Path) -> float:
        return auc(auc_rows.labels, compress.onnx_predict(path, FINE_INPUTS, auc_inputs))

    teacher_auc = onnx_auc(staging / "ranker.onnx")
    compress.quantize_int8(staging / "ranker.onnx", staging / compress.INT8_FILE)
    int8_auc = onnx_auc(staging / compress.INT8_FILE)

    student = FINE_RANKERS[features.fine_model](
        num_users, num_items, features.user_dim, features.ranker_item_dim, features.cross_dim,
        max(4, features.embedding_dim // shape.dim_divisor), base=coarse, like_weight=features.like_weight,
        trunk=shape.trunk, attention=shape.attention)
    soft_clicks, soft_likes = compress.teacher_targets(teacher, train_inputs)
    _fit(student, train_inputs, (clicks, soft_clicks, soft_likes),
         compress.distillation_loss(shape.soft_weight, features.like_loss_weight), config.student_epochs, config, rng,
         lambda: auc(validation_rows.labels, predict(student, validation_inputs)), "student", drop_user_ids=True,
         cold_user_rows=cold_user_rows, profile_cross=profile_cross)
    compress.prune_magnitude(student, shape.prune)
    student_diff = export_onnx(student, validation_inputs, FINE_INPUTS, staging / compress.STUDENT_FILE)
    if student_diff > 1e-4:
        raise RuntimeError(f"the student's ONNX export differs from PyTorch by {student_diff}")
    student_auc = onnx_auc(staging / compress.STUDENT_FILE)
    result = {
        "teacher_onnx_auc": teacher_auc,
        "int8_auc": int8_auc,
        "int8_auc_delta": int8_auc - teacher_auc,
        "student_auc": student_auc,
        "student_auc_delta": student_auc - teacher_auc,
        "teacher_parameters": compress.parameter_count(teacher),
        "student_parameters": compress.parameter_count(student),
        "student_pruned_fraction": shape.prune,
    }
    log("smaller fine models (held-out AUC through onnxruntime): teacher {teacher_onnx_auc:.4f}, "
        "int8 {int8_auc:.4f} ({int8_auc_delta:+.4f}), student {student_auc:.4f} ({student_auc_delta:+.4f}) "
        "with {student_parameters} of the teacher's {teacher_parameters} parameters".format(**result))
    return result


FINE_INPUTS = ["user_index", "item_index", "history", "user_features", "item_features", "cross_features"]
COARSE_INPUTS = ["cross_features"]


def ranker_fixture(universe: Universe, state: ModelState, features: FeatureConfig, users: np.ndarray, fine, coarse, rng,
                   count: int = 8) -> list[dict]:
    """Examples with the exact tensors and PyTorch scores of the published state, so
    rank-svc's tests can prove that serving builds the same inputs from the same user
    (profile, history, timestamps) and item counts, and the ONNX models give the same
    scores."""
    events = ItemEventLog.from_interactions(universe.dataset.interactions, universe.item_position)
    examples = []
    for user in users[:count]:
        history = state.histories[user]
        scores = state.cross.item_cf_scores(history.items)
        scores[history.items] = -np.inf
        items = np.array([int(np.argmax(scores)), int(rng.integers(0, len(universe.dataset.items)))], dtype=np.int64)
        rows = RankerRows(np.full(2, user, dtype=np.int64), items, state.cross.features(int(user), history.items, items),
                          np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32))
        uid = universe.user_ids[user]
        profile = universe.dataset.users.get(uid)
        # A request some hours after the latest event, so the time features are exercised.
        request_time = max(history.timestamps, default=1_700_000_000) + 3_600 * int(rng.integers(1, 5_000)) + 1_234
        user_row = features.encode_user(user_sources(profile, history.timestamps, len(history.items),
                                                     [f.source for f in features.user], request_time))
        live = events.values(items, np.full(2, request_time), [f.source for f in features.live_item])
        rows.live = encode_live(features.live_item, live, 2)
        rows.cross = np.hstack([rows.cross, crosses.columns(
            [crosses.AttributeCross(**table) for table in features.attribute_crosses], universe.dataset.items,
            [profile], [history.items], np.zeros(2, dtype=np.int64), items, np.full(2, request_time))])
        tensors = list(rows.tensors(state))
        tensors[3] = torch.as_tensor(np.asarray([user_row, user_row], dtype=np.float32))
        fine_scores, coarse_scores = predict(fine, tensors), predict(coarse, (tensors[-1],))
        for n in range(2):
            examples.append({
                "user_id": uid,
                "age": profile.age if profile else 0,
                "gender": profile.gender if profile else "",
                "occupation": profile.occupation if profile else "",
                "event_count": len(history.items),
                "request_time": request_time,
                "history_item_ids": [universe.dataset.items[i].item_id for i in history.items],
                "history_timestamps": history.timestamps,
                "item_id": universe.dataset.items[int(items[n])].item_id,
                "item_counts": events.windowed_counts(int(items[n]), request_time),
                **{name: tensor[n].tolist() for name, tensor in zip(FINE_INPUTS, tensors)},
                "fine_score": float(fine_scores[n]),
                "coarse_score": float(coarse_scores[n]),
            })
    return examples


def cold_start_policy(universe: Universe, state: ModelState, new_items: np.ndarray, config: TrainConfig,
                      rng) -> dict | None:
    """The manifest's `cold_start` section: the content map (run-time catalogue items are
    mapped with it) and the cold-start channel's score at or above which rank-svc marks
    one of the bundle's items without interactions for the new-item slot.

    The threshold is set on stand-ins, not on the new items themselves: as many known
    items as there are new ones (at most half of the known), drawn at
    random, their vectors mapped from their attributes as a new item's are. It shows one
    to `cold_start_share` of the users when the new items are like the catalogue's
    typical item, fewer when they are weaker (a catalogue's never-chosen items are mostly
    the unpopular ones), more when they are stronger. One draw of stand-ins moves the
    share shown by a third or more either way (a few strong stand-ins decide the best
    score of many users), so the threshold is the median of `cold_start_draws` draws'.
    It is set on the trained users' vectors; a user new since training is scored with the
    mean of their latest items (a vector of another length: the score, u·v, is not divided
    by it), and serving scans at most the newest 10,000 new items
    (recall's NEW_ITEM_POOL), so beyond that size the share shown drifts from the one set
    here."""
    known = np.flatnonzero(~new_items)
    if state.content_map is None or len(known) < 2 or config.cold_start_draws < 1:
        return None
    # The best of a larger pool scores higher: the stand-ins are as many as the new items
    # (100 when there are none: the threshold then waits for items added after training).
    count = min(int(new_items.sum()) or 100, len(known) // 2)
    thresholds = []
    for _ in range(config.cold_start_draws):
        stand_ins = rng.choice(known, size=count, replace=False)
        without_stand_ins = ~new_items
        without_stand_ins[stand_ins] = False
        mapped = content.impute_vectors(state.item_vectors, without_stand_ins, universe.content_features,
                                        config.content_l2)
        drawn = content.cold_start_threshold(state.user_vectors, mapped[stand_ins], config.cold_start_share)
        if drawn is not None:
            thresholds.append(drawn)
    if not thresholds:
        return None
    threshold = float(np.median(thresholds))
    policy = {"items": int(new_items.sum()), "share": config.cold_start_share, "score": content.COLD_START_SCORE,
              "threshold": round(threshold, 6),
              "threshold_draws": [round(t, 6) for t in sorted(thresholds)],
              "content_l2": config.content_l2, "content": universe.content_encoding.to_json(state.content_map)}
    if new_items.any():
        shown = content.cold_start_scores(state.user_vectors, state.item_vectors[new_items])
        policy["training_users_shown"] = round(float(np.mean(shown[np.isfinite(shown)] >= threshold)), 6)
        log(f"cold start: {int(new_items.sum())} items without interactions; score {threshold:.4f} (the median "
            f"of {len(thresholds)} draws of {count} known items' mapped vectors for {config.cold_start_share:.0%} "
            f"of the users, {min(thresholds):.4f}..{max(thresholds):.4f}) shows one to "
            f"{policy['training_users_shown']:.1%} of the training users")
    return policy


def recent_popularity(interactions: list[Interaction], item_position: dict[str, int], num_items: int,
                      half_life_days: float) -> np.ndarray:
    """Each item's popularity in [0, 1]: its interactions weighted by recency (half-life in
    days before the latest interaction; 0: unweighted), the most popular item 1. Items
    whose weight has decayed to nothing still rank among themselves by their counts, and
    an item with any interaction stays above 0."""
    items = np.array([item_position[i.item_id] for i in interactions], dtype=np.int64)
    counts = np.bincount(items, minlength=num_items).astype(np.float64)
    if half_life_days <= 0 or not interactions:
        return counts / max(counts.max(), 1.0)
    times = np.array([i.timestamp for i in interactions], dtype=np.float64)
    weights = np.power(0.5, (times.max() - times) / (half_life_days * 86_400.0))
    recent = np.bincount(items, weights=weights, minlength=num_items)
    recent /= max(recent.max(), 1e-300)
    return (1.0 - 1e-6) * recent + 1e-6 * counts / max(counts.max(), 1.0)


def sequence_encoder(state: ModelState, item_ids: list[str], sample_users: np.ndarray, config: TrainConfig,
                     staging: Path, rng: np.random.Generator) -> dict | None:
    """Trains the sequence channel's encoder on every user's chronological items over the
    final item vectors, exports it (checked against onnxruntime on `sample_users`), writes
    the parity fixture recall-svc's test serves (histories as serving sends them, most
    recent first, and their query vectors) and returns the manifest's `sequence` section;
    `None` when configured off."""
    if config.sequence_epochs <= 0:
        return None
    settings = sequence.SequenceConfig(length=config.sequence_length, epochs=config.sequence_epochs,
                                       future_window=config.sequence_future_window)
    chronological = [list(reversed(history.items)) for history in state.histories]
    model = sequence.train_sequence_encoder(chronological, state.item_vectors, settings, rng, log)
    sample = [chronological[user] for user in sample_users[:64]]
    difference = sequence.export_encoder(model, state.item_vectors, sample, staging / sequence.FILE)
    log(f"sequence encoder exported; max |pytorch - onnxruntime| = {difference:.2e}")
    if difference > 1e-4:
        raise RuntimeError(f"sequence encoder's ONNX export differs from PyTorch by {difference}")
    fixture_histories = [history for history in sample[:8] if history]
    fixture = [{"history_item_ids": [item_ids[n] for n in reversed(history)], "query": query.tolist()}
               for history, query in zip(fixture_histories,
                                          sequence.queries(model, fixture_histories, state.item_vectors))]
    (staging / sequence.FIXTURE).write_text(json.dumps(fixture))
    return {"file": sequence.FILE, "length": settings.length, "future_window": settings.future_window,
            "onnx_max_abs_diff": difference}


def held_out_part(universe: Universe, held: np.ndarray) -> tuple[list[Interaction], dict[int, set[int]],
                                                                  set[tuple[int, int]]]:
    """The interactions not ``held`` (what features are fitted on), and the held ones as
    each user's held-out items and the (user, item) pairs among them that were liked."""
    interactions = universe.dataset.interactions
    past_interactions = [i for i, h in zip(interactions, held) if not h]
    held_out: dict[int, set[int]] = {}
    liked: set[tuple[int, int]] = set()
    for interaction, h in zip(interactions, held):
        if h:
            pair = (universe.user_position[interaction.user_id], universe.item_position[interaction.item_id])
            held_out.setdefault(pair[0], set()).add(pair[1])
            if interaction.rating >= 4 or interaction.event in ("like", "purchase"):
                liked.add(pair)
    return past_interactions, held_out, liked


def held_out_mask(draws: np.ndarray, holdout: float, part: int) -> np.ndarray:
    """The interactions in held-out part ``part``: those whose draw (uniform in [0, 1)) lies in
    [part x holdout, (part + 1) x holdout), so that parts are disjoint."""
    return (draws >= part * holdout) & (draws < (part + 1) * holdout)


def forget_reconsumed(held_out: dict[int, set[int]], past: ModelState) -> None:
    """Re-consumed items are not news: a held-out item already in the user's past is dropped."""
    for user, items in held_out.items():
        items.difference_update(past.histories[user].items)


@dataclass
class OtherFold:
    """A further held-out part's training rows, with the state their features come from."""
    state: ModelState
    rows: RankerRows
    events: ItemEventLog


def other_fold(universe: Universe, features: FeatureConfig, config: TrainConfig, draws: np.ndarray, fold: int,
               users: np.ndarray, request_times: list[int | None]) -> OtherFold:
    """Held-out part ``fold`` (> 0): its feature models fitted on the rest, and ``users``'
    recall-style rows. Its own generators (numpy and torch), so that the first part's
    models see the same random streams whatever the number of parts."""
    rng = np.random.default_rng(config.seed + 100 + fold)
    torch_state = torch.get_rng_state()
    torch.manual_seed(config.seed + 100 + fold)
    past_interactions, held_out, liked = held_out_part(universe, held_out_mask(draws, config.ranker_holdout, fold))
    state = fit_state(universe, past_interactions, config, rng, f"past, part {fold + 1}")
    forget_reconsumed(held_out, state)
    encode_state(state, universe, features, request_times)
    rows = ranker_rows(state, users, held_out, liked, config, rng, hard=True)
    torch.set_rng_state(torch_state)
    return OtherFold(state, rows, ItemEventLog.from_interactions(past_interactions, universe.item_position))


def fold_tensors(parts: list[tuple[RankerRows, ModelState]]) -> tuple[torch.Tensor, ...]:
    """The fine model's inputs of several parts' rows, each with its own state's features."""
    return tuple(torch.cat(columns) for columns in zip(*(rows.tensors(state) for rows, state in parts)))


def train_bundle(data_dir: Path, out_root: Path, config: TrainConfig | None = None, version: str | None = None) -> Path:
    config = config or TrainConfig()
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)

    dataset: Dataset = load_dataset(data_dir)
    log(f"loaded {len(dataset.interactions)} interactions, {len(dataset.items)} items, {len(dataset.users)} users from {data_dir}")
    raw_features = load_raw_config(Path(config.feature_config) if config.feature_config else None)
    item_position = {item.item_id: n for n, item in enumerate(dataset.items)}
    user_ids = _numeric_first({i.user_id for i in dataset.interactions})
    encoding = content.ContentEncoding.of(dataset.items)
    universe = Universe(dataset, user_ids, {uid: n for n, uid in enumerate(user_ids)}, item_position, raw_features,
                        encoding, encoding.features(dataset.items))

    # 1. Feature models on the "past" part; rankers learn to predict the held-out part (the
    # first of `ranker_folds`; the others add training rows below, `other_fold`).
    if not 1 <= config.ranker_folds <= int(1 / config.ranker_holdout):
        raise ValueError(f"ranker_folds = {config.ranker_folds}: between 1 and 1 / ranker_holdout "
                         f"({int(1 / config.ranker_holdout)}), the disjoint parts of that size")
    draws = rng.random(len(dataset.interactions))
    past_interactions, held_out, liked = held_out_part(universe, held_out_mask(draws, config.ranker_holdout, 0))
    past = fit_state(universe, past_interactions, config, rng, "past")
    forget_reconsumed(held_out, past)
    final = fit_state(universe, dataset.interactions, config, rng, "all")
    features = build_config(raw_features, dataset, user_ids, final.histories, final.statistics)
    # The rankers' "requests" happen right after each user's latest training activity
    # (held out or not), as an offline replay of the data would ask them.
    request_times = [max(h.timestamps, default=None) for h in final.histories]
    encode_state(past, universe, features, request_times)
    encode_state(final, universe, features)

    users = rng.permutation(len(user_ids))
    validation_count = max(1, int(len(users) * config.ranker_validation_users))
    validation_users, training_users = users[:validation_count], users[validation_count:]
    train_rows = ranker_rows(past, training_users, held_out, liked, config, rng, hard=True)
    validation_rows = ranker_rows(past, validation_users, held_out, liked, config, rng, hard=True)
    auc_rows = ranker_rows(past, validation_users, held_out, liked, config, rng, hard=False)
    other_folds = [other_fold(universe, features, config, draws, fold, training_users, request_times)
                   for fold in range(1, config.ranker_folds)]
    # The candidates' windowed counts as of each user's request, from the events the
    # feature store would hold then (held-out ones excluded: they are what is predicted).
    past_events = ItemEventLog.from_interactions(past_interactions, item_position)
    asked_at = np.array([t or 0 for t in request_times], dtype=np.int64)
    live_names = live_sources(raw_features)

    def live_values(rows: RankerRows) -> dict[str, np.ndarray]:
        return past_events.values(rows.items, asked_at[rows.users], live_names)

    attach_live_items(features, raw_features, live_values, train_rows, validation_rows, auc_rows)
    for fold in other_folds:
        fold.rows.live = encode_live(features.live_item, fold.events.values(fold.rows.items, asked_at[fold.rows.users],
                                                                            live_names), len(fold.rows.items))
    # The selection draws from its own generator: with or without crosses, every other
    # model of the bundle sees the same random stream (make eval compares the two).
    feature_selection = automated_crosses(universe, past, past_interactions, features, config, asked_at,
                                          np.random.default_rng(config.seed + 1), other_folds, train_rows,
                                          validation_rows, auc_rows)
    log(f"live item features: {[f.source for f in features.live_item] or 'none (no counted events)'}")
    train_parts = [(train_rows, past)] + [(fold.rows, fold.state) for fold in other_folds]
    train_inputs = fold_tensors(train_parts)
    clicks = torch.as_tensor(np.concatenate([rows.labels for rows, _ in train_parts]))
    likes = torch.as_tensor(np.concatenate([rows.likes for rows, _ in train_parts]))
    log(f"ranker data: {len(clicks)} training rows ({int(clicks.sum())} positive) from {config.ranker_folds} "
        f"held-out part(s), {len(validation_rows.labels)} validation rows from {validation_count} held-out users")

    validation_inputs = validation_rows.tensors(past)
    coarse = CoarseRanker(features.coarse_cross)
    groups = row_groups([rows for rows, _ in train_parts], len(user_ids))
    _fit(coarse, (train_inputs[-1],), (clicks, torch.as_tensor(groups)), coarse_loss(config.coarse_listwise_weight),
         config.coarse_epochs, config, rng,
         lambda: auc(validation_rows.labels, predict(coarse, (validation_inputs[-1],))), "coarse", drop_user_ids=False,
         groups=groups if config.coarse_listwise_weight > 0 else None)
    # Each user's features as a user with no behaviour, at the same request time; the
    # cross columns serving still computes for such a user (profile and time crosses).
    no_behaviour = [UserHistory(items=[], timestamps=[]) for _ in user_ids]
    cold_user_rows = torch.as_tensor(user_feature_rows(features, dataset, user_ids, no_behaviour, request_times))
    profile_kinds = {table["name"]: table["user_field"] != "history" for table in features.attribute_crosses}
    profile_cross = torch.as_tensor([profile_kinds.get(name, False) for name in features.cross])

    def fit_fine(cross_columns: int):
        """The fine model over the first `cross_columns` cross features, and its AUC on the
        validation users' recall-style candidates."""
        def inputs(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (*tensors[:-1], tensors[-1][:, :cross_columns])

        model = FINE_RANKERS[features.fine_model](len(user_ids), len(dataset.items), features.user_dim,
                                                  features.ranker_item_dim, cross_columns, features.embedding_dim,
                                                  base=coarse, like_weight=features.like_weight)
        _fit(model, inputs(train_inputs), (clicks, likes), multi_task_loss(features.like_loss_weight),
             config.ranker_epochs, config, rng, lambda: auc(validation_rows.labels, predict(model, inputs(validation_inputs))),
             features.fine_model, drop_user_ids=True, cold_user_rows=cold_user_rows, profile_cross=profile_cross)
        return model, auc(validation_rows.labels, predict(model, inputs(validation_inputs)))

    crosses_spec = raw_features.get("crosses", {})
    kept_crosses = len(features.attribute_crosses) if crosses_spec.get("fine_check", True) else 0
    before_fine = (torch.get_rng_state(), copy.deepcopy(rng.bit_generator.state))
    fine, with_auc = fit_fine(features.cross_dim)
    if kept_crosses:
        # The probe judged each cross beside main effects; the fine model has the last word.
        # Without the crosses, from the same random state: the crosses stay only if the
        # fine model ranks the held-out candidates better with them.
        torch.set_rng_state(before_fine[0])
        rng.bit_generator.state = before_fine[1]
        base_columns = features.cross_dim - kept_crosses
        without, without_auc = fit_fine(base_columns)
        feature_selection.update(fine_auc_recall_candidates_with=round(with_auc, 6),
                                 fine_auc_recall_candidates_without=round(without_auc, 6))
        # A margin: the two AUCs differ by about ±0.002 from run to run on MovieLens.
        if with_auc < without_auc + float(crosses_spec.get("fine_check_margin", 0.001)):
            log(f"feature crosses dropped: the fine model's AUC on held-out candidates is {without_auc:.4f} "
                f"without them, {with_auc:.4f} with")
            fine = without
            features.cross = features.cross[:base_columns]
            features.attribute_crosses = []
            profile_cross = profile_cross[:base_columns]
            for rows in (train_rows, validation_rows, auc_rows, *(fold.rows for fold in other_folds)):
                rows.cross = rows.cross[:, :base_columns]
            train_inputs, validation_inputs = fold_tensors(train_parts), validation_rows.tensors(past)
    if feature_selection is not None:
        feature_selection["shipped"] = [table["name"] for table in features.attribute_crosses]
    # What follows (the student, the sequence encoder) starts from the same random state
    # whatever the crosses did, so that a bundle with them and one without differ in the
    # fine model and its inputs only (make eval compares the two).
    torch.manual_seed(config.seed + 2)
    rng = np.random.default_rng(config.seed + 3)
    auc_inputs = auc_rows.tensors(past)
    metrics = {
        "coarse_auc": auc(auc_rows.labels, predict(coarse, (auc_inputs[-1],))),
        "fine_auc": auc(auc_rows.labels, predict(fine, auc_inputs)),
        "coarse_auc_recall_candidates": auc(validation_rows.labels, predict(coarse, (validation_inputs[-1],))),
        "fine_auc_recall_candidates": auc(validation_rows.labels, predict(fine, validation_inputs)),
        "like_auc": like_auc(fine, validation_rows, validation_inputs),
    }
    log("held-out AUC (sampled negatives): coarse {coarse_auc:.4f}, fine {fine_auc:.4f}; "
        "on recall candidates: coarse {coarse_auc_recall_candidates:.4f}, fine {fine_auc_recall_candidates:.4f}; "
        "like head on engaged rows {like_auc:.4f}".format(**metrics))

    version, staging = bundle.staging_dir(out_root, version, dataset.sha256)
    fine_diff = export_onnx(fine, validation_inputs, FINE_INPUTS, staging / "ranker.onnx")
    coarse_diff = export_onnx(coarse, (validation_inputs[-1],), COARSE_INPUTS, staging / "coarse.onnx")
    onnx_diff = max(fine_diff, coarse_diff)
    log(f"rankers exported to ONNX; max |pytorch - onnxruntime| = {fine_diff:.2e} (fine), {coarse_diff:.2e} (coarse)")
    if onnx_diff > 1e-4:
        raise RuntimeError(f"ONNX export differs from PyTorch by {onnx_diff}")
    metrics.update(smaller_fine_models(fine, coarse, features, len(user_ids), len(dataset.items), train_inputs,
                                       clicks, validation_rows, validation_inputs, auc_rows, auc_inputs, staging,
                                       config, rng, cold_user_rows, profile_cross))

    fixture = ranker_fixture(universe, final, features, validation_users, fine, coarse, rng)
    (staging / "ranker_fixture.json").write_text(json.dumps(fixture))
    catalog = [
        {"id": item.item_id, "title": item.title, "genres": item.genres, "year": item.year,
         "interactions": int(final.statistics[item.item_id]["interactions"]), "stats": final.statistics[item.item_id]}
        for item in dataset.items
    ]
    (staging / "items.json").write_text(json.dumps(catalog))
    (staging / "users.json").write_text(json.dumps(user_ids))
    # What each user's vector was trained on: serving moves it by the events after these.
    trained_on = np.array([[max(h.timestamps, default=0), len(h.items)] for h in final.histories], dtype=np.int64)
    bundle.write_embeddings(staging / bundle.EMBEDDINGS, final.item_vectors, final.user_vectors, trained_on)
    rows = final.neighbor_rows
    bundle.write_item_to_item(staging / bundle.ITEM_TO_ITEM, rows.offsets, rows.neighbors, rows.weights)
    interactions = np.array([final.statistics[item.item_id]["interactions"] for item in dataset.items], dtype=np.float64)
    bundle.write_item_signals(staging / bundle.ITEM_SIGNALS,
                              recent_popularity(dataset.interactions, item_position, len(dataset.items),
                                                config.popularity_half_life_days))
    # Its own generator: the threshold's draws do not move the sequence encoder's random stream.
    cold_start = cold_start_policy(universe, final, interactions == 0, config, np.random.default_rng(config.seed + 4))
    sequence_section = sequence_encoder(final, [item.item_id for item in dataset.items], validation_users, config,
                                        staging, rng)

    val_scores = predict(fine, validation_inputs)
    counts, edges = np.histogram(val_scores, bins=20, range=(0.0, 1.0))
    # Reference distributions of two ranker inputs over the training interactions, for
    # feature drift in rank-svc (same encoding as the model sees).
    user_idx = np.array([universe.user_position[i.user_id] for i in dataset.interactions])
    item_idx = np.array([item_position[i.item_id] for i in dataset.interactions])
    feature_distributions = {}
    for name, values in (
        ("user_events", final.user_rows[user_idx, features.offset("user", "event_count")]),
        ("item_interactions", final.item_rows[item_idx, features.offset("item", "interactions")]),
    ):
        f_counts, f_edges = np.histogram(values, bins=20, range=(0.0, 1.0))
        feature_distributions[name] = {"edges": [round(e, 4) for e in f_edges.tolist()], "counts": f_counts.tolist()}
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_data_sha256": dataset.sha256,
        "embedding_dim": config.embedding_dim,
        "num_users": len(user_ids),
        "num_items": len(dataset.items),
        "feature_config": features.to_json(),
        "metrics": {**{k: round(v, 6) for k, v in metrics.items()}, "ranker_val_auc": round(metrics["fine_auc"], 6),
                    "onnx_max_abs_diff": onnx_diff, "training_seconds": round(time.monotonic() - started, 1),
                    "ranker_training_rows": len(clicks)},
        "score_distribution": {"edges": [round(e, 4) for e in edges.tolist()], "counts": counts.tolist()},
        "feature_distributions": feature_distributions,
        "training_config": config.__dict__,
    }
    if cold_start is not None:
        manifest["cold_start"] = cold_start
    if feature_selection is not None:
        manifest["feature_selection"] = feature_selection
    if sequence_section is not None:
        manifest["sequence"] = sequence_section
    published = bundle.publish(staging, out_root, version, manifest)
    log(f"published bundle {version} at {published} in {time.monotonic() - started:.1f}s "
        f"(AUC coarse {metrics['coarse_auc']:.4f}, fine {metrics['fine_auc']:.4f})")
    return published
