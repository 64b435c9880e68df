"""Automated feature crosses: degree-2 crosses of a user field and an item field, kept only
when they add to the ranker's own inputs on held-out data.

Each candidate (``gender × genres``, ``daypart × genres``, ...: every configured user field
against every configured item field) is a table of lifts learnt from the training
interactions: how much more often users with one value chose items with the other than
users at large did, ``log((n(u, i) + m·p(i)) / (n(u) + m) / p(i))`` with ``m`` pseudo-events
pulling a rare user value towards no lift. The user field ``history`` is a window
statistic instead: the same lift computed per request from the item values of the user's
latest 50 items. A candidate's value for a user and an item is the mean lift over the
item's values (a film has several genres); an unknown value is 0.

Selection is by each candidate's gain on held-out rows: a logistic probe over the
ranker's own inputs (user and item columns, the cross features) — main effects only, so
it cannot learn a user × item interaction itself — is fitted on the ranker's training rows
with and without each candidate, and a candidate is kept when it lowers the probe's
held-out log loss by at least ``min_gain`` and by ``min_z`` standard errors of the per-row
differences (best first, at most ``max_kept``). Mutual
information with the label is reported beside it. The kept tables go into the bundle's
feature configuration (``attribute_crosses``) and their names into its ``cross`` columns,
which rank-svc computes the same way (``crates/bundle/src/features.rs``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .data import Interaction, Item, User

DAY_SECONDS = 86_400
# "history" is the user's recent behaviour rather than an attribute: the item field's
# values over the user's latest HISTORY_ITEMS items (a windowed statistic of the user,
# crossed with the candidate's values).
USER_FIELDS = ("gender", "occupation", "age_band", "daypart", "history")
ITEM_FIELDS = ("genres", "decade")
HISTORY_ITEMS = 50
PROBE_ROWS = 100_000


def user_value(field: str, user: User | None, request_time: int) -> str:
    """The user's value of an attribute field at a request ("" when unknown)."""
    if field == "daypart":  # UTC hours 0-5, 6-11, 12-17, 18-23
        return str((request_time % DAY_SECONDS) // 3600 // 6)
    if user is None:
        return ""
    if field == "gender":
        return user.gender
    if field == "occupation":
        return user.occupation
    if field == "age_band":
        return str(user.age // 10 * 10) if user.age > 0 else ""
    raise ValueError(f"unknown user field {field!r} (known: {USER_FIELDS})")


def item_values(field: str, item: Item) -> list[str]:
    if field == "genres":
        return list(item.genres)
    if field == "decade":
        return [str(item.year // 10 * 10)] if item.year > 0 else []
    raise ValueError(f"unknown item field {field!r} (known: {ITEM_FIELDS})")


@dataclass
class AttributeCross:
    """One cross as the bundle ships it. For an attribute field, ``lift[u][i]`` is the lift
    of user value ``user_values[u]`` for item value ``item_values[i]``; for ``history`` the
    user's row is computed per request from the item values of their latest items, with
    ``prior`` (each item value's share of all interactions) and ``smoothing``."""
    name: str
    user_field: str
    item_field: str
    user_values: list[str]
    item_values: list[str]
    lift: list[list[float]]
    prior: list[float]
    smoothing: float

    def to_json(self) -> dict:
        return asdict(self)


def _lift(count: np.ndarray, total: float, prior: np.ndarray, smoothing: float) -> np.ndarray:
    """log((n(v) + m·p(v)) / (n + m) / p(v)) for every value v."""
    return np.log((count + smoothing * prior) / (total + smoothing) / prior)


def item_membership(field: str, item_vocabulary: list[str], catalogue: list[Item]) -> np.ndarray:
    """[items, values]: 1/k for each of an item's k known values (a mean over them)."""
    index = {value: n for n, value in enumerate(item_vocabulary)}
    membership = np.zeros((len(catalogue), len(item_vocabulary)))
    for n, item in enumerate(catalogue):
        known = [index[v] for v in item_values(field, item) if v in index]
        for column in known:
            membership[n, column] += 1.0 / len(known)
    return membership


def fit_cross(user_field: str, item_field: str, interactions: list[Interaction], users: dict[str, User],
              items: dict[str, Item], smoothing: float) -> AttributeCross:
    """The lift table (or, for ``history``, the priors) of one candidate over
    `interactions` (each counted at its own time)."""
    pairs: dict[tuple[str, str], float] = {}
    per_user_value: dict[str, float] = {}
    per_item_value: dict[str, float] = {}
    total = 0.0
    for interaction in interactions:
        values = item_values(item_field, items[interaction.item_id])
        if not values:
            continue
        share = 1.0 / len(values)  # a film with three genres counts a third to each
        total += 1.0
        for value in values:
            per_item_value[value] = per_item_value.get(value, 0.0) + share
        if user_field == "history":
            continue
        u = user_value(user_field, users.get(interaction.user_id), interaction.timestamp)
        if u:
            per_user_value[u] = per_user_value.get(u, 0.0) + 1.0
            for value in values:
                pairs[(u, value)] = pairs.get((u, value), 0.0) + share
    user_vocabulary, item_vocabulary = sorted(per_user_value), sorted(per_item_value)
    prior = np.array([per_item_value[i] / total for i in item_vocabulary])
    lift = [[round(float(v), 6) for v in _lift(np.array([pairs.get((u, i), 0.0) for i in item_vocabulary]),
                                                per_user_value[u], prior, smoothing)] for u in user_vocabulary]
    return AttributeCross(f"{user_field}×{item_field}", user_field, item_field, user_vocabulary, item_vocabulary,
                          lift, [round(float(p), 9) for p in prior], smoothing)


def history_lift(cross: AttributeCross, membership: np.ndarray, history: list[int]) -> np.ndarray | None:
    """A user's lift row from the item values of their latest items (None without any)."""
    latest = membership[history[:HISTORY_ITEMS]]
    known = latest.sum(axis=1) > 0
    if not known.any():
        return None
    return _lift(latest.sum(axis=0), float(known.sum()), np.asarray(cross.prior), cross.smoothing)


def columns(crosses: list[AttributeCross], catalogue: list[Item], users: list[User | None],
            histories: list[list[int]], row_users: np.ndarray, row_items: np.ndarray,
            request_times: np.ndarray) -> np.ndarray:
    """[rows, crosses]: each cross's value for each row's user (an index into `users` and
    `histories`, item positions latest first), item (a position in `catalogue`) and
    request time."""
    out = np.zeros((len(row_items), len(crosses)), dtype=np.float32)
    for c, cross in enumerate(crosses):
        membership = item_membership(cross.item_field, cross.item_values, catalogue)
        if cross.user_field == "history":
            lifts = np.zeros((len(users), len(cross.item_values)))
            for user in np.unique(row_users):
                row = history_lift(cross, membership, histories[user])
                if row is not None:
                    lifts[user] = row
            rows_lift = lifts[row_users]
        else:
            # Each user value's lift row, and a last row of zeros for an unknown one.
            table = np.vstack([np.asarray(cross.lift, dtype=np.float64).reshape(-1, len(cross.item_values)),
                               np.zeros((1, len(cross.item_values)))])
            index = {value: n for n, value in enumerate(cross.user_values)}
            unknown = len(cross.user_values)
            rows_lift = table[np.fromiter((index.get(user_value(cross.user_field, users[user], int(at)), unknown)
                                           for user, at in zip(row_users, request_times)), dtype=np.int64,
                                          count=len(row_items))]
        out[:, c] = (membership[row_items] * rows_lift).sum(axis=1)
    return out


def mutual_information(values: np.ndarray, labels: np.ndarray, bins: int = 16) -> float:
    """Mutual information (nats) between a value, cut at its quantiles, and a 0/1 label."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    cells = np.digitize(values, edges)
    joint = np.zeros((len(edges) + 1, 2))
    np.add.at(joint, (cells, labels.astype(np.int64)), 1.0)
    joint /= joint.sum()
    expected = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(joint[nonzero] / expected[nonzero])).sum())


def _standardise(train: np.ndarray, held_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std[std < 1e-9] = 1.0
    add_bias = lambda x: np.hstack([(x - mean) / std, np.ones((len(x), 1))])  # noqa: E731
    return add_bias(train), add_bias(held_out)


def probe_log_loss(train: np.ndarray, train_labels: np.ndarray, held_out: np.ndarray, held_out_labels: np.ndarray,
                   l2: float = 1.0, iterations: int = 12) -> tuple[np.ndarray, float]:
    """Each held-out row's log loss, and the AUC, of an L2 logistic regression (Newton's
    method) fitted on `train`."""
    from .models import auc

    x, x_held = _standardise(train.astype(np.float64), held_out.astype(np.float64))
    weights = np.zeros(x.shape[1])
    penalty = l2 * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ weights)))
        gradient = x.T @ (p - train_labels) + penalty @ weights
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
        weights -= np.linalg.solve(hessian, gradient)
    p = np.clip(1.0 / (1.0 + np.exp(-(x_held @ weights))), 1e-7, 1 - 1e-7)
    losses = -(held_out_labels * np.log(p) + (1 - held_out_labels) * np.log(1 - p))
    return losses, float(auc(held_out_labels, p))


@dataclass
class Selection:
    kept: list[int]
    report: dict


def select(base_train: np.ndarray, candidates_train: np.ndarray, train_labels: np.ndarray, base_held: np.ndarray,
           candidates_held: np.ndarray, held_labels: np.ndarray, names: list[str], min_gain: float, min_z: float,
           max_kept: int, rng) -> Selection:
    """Which candidate columns to keep (see the module's text), and the report of it: a
    candidate is kept when its held-out log-loss gain is at least `min_gain` and at least
    `min_z` standard errors of the per-row gains (best first, at most `max_kept`)."""
    if len(train_labels) > PROBE_ROWS:
        sample = rng.choice(len(train_labels), PROBE_ROWS, replace=False)
        base_train, candidates_train, train_labels = base_train[sample], candidates_train[sample], train_labels[sample]
    base_losses, base_auc = probe_log_loss(base_train, train_labels, base_held, held_labels)
    rows = []
    for n, name in enumerate(names):
        losses, _ = probe_log_loss(np.hstack([base_train, candidates_train[:, n:n + 1]]), train_labels,
                                   np.hstack([base_held, candidates_held[:, n:n + 1]]), held_labels)
        gains = base_losses - losses
        rows.append({"name": name, "held_out_log_loss_gain": round(float(gains.mean()), 6),
                     "gain_standard_error": round(float(gains.std() / np.sqrt(len(gains))), 6),
                     "mutual_information": round(mutual_information(candidates_held[:, n], held_labels), 6)})
    significant = [n for n, row in enumerate(rows) if row["held_out_log_loss_gain"] >= max(
        min_gain, min_z * row["gain_standard_error"])]
    kept = sorted(sorted(significant, key=lambda n: -rows[n]["held_out_log_loss_gain"])[:max_kept])
    report = {"candidates": rows, "kept": [names[n] for n in kept], "min_gain": min_gain, "min_z": min_z,
              "max_kept": max_kept, "probe_held_out_log_loss_without": round(float(base_losses.mean()), 6),
              "probe_held_out_auc_without": round(base_auc, 6)}
    if kept:
        losses, with_auc = probe_log_loss(np.hstack([base_train, candidates_train[:, kept]]), train_labels,
                                          np.hstack([base_held, candidates_held[:, kept]]), held_labels)
        report.update(probe_held_out_log_loss_with=round(float(losses.mean()), 6),
                      probe_held_out_auc_with=round(with_auc, 6))
    return Selection(kept, report)
