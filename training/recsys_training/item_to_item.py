"""The item-to-item model at any catalogue size, as compressed sparse rows.

Two methods, chosen by item popularity:

- the **head** (the ``head_items`` most-interacted items) gets EASE (Steck, 2019), a
  closed-form regression of each item on all others, or with ``dropout`` above 0 its
  denoising form DLAE (Steck, 2020: the same regression trained as if each input item were
  dropped with that probability, which penalises every weight by its item's popularity
  instead of forbidding self-weights); the best item-to-item models on MovieLens, they need
  a dense head x head Gram matrix and its inverse;
- the **tail** gets windowed co-occurrence: items consumed within ``window`` steps of
  each other in a user's time-ordered history, weighted by 1/distance and normalised by
  both items' popularity (cosine), computed with sparse matrices only.

Neither ever materialises an N x N matrix for the whole catalogue: memory is head^2 plus
the co-occurring pairs. Each row keeps its ``keep`` strongest weights. The tail's weights
are rescaled so that their typical strongest weight matches the head's, so one history
mixing head and tail items sums comparable evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class ItemToItemConfig:
    #: Items (by interaction count) whose rows come from EASE; 0 = co-occurrence only.
    head_items: int = 8_000
    #: Ridge strength.
    l2: float = 400.0
    #: DLAE's input dropout probability (0: EASE). The regression's penalty on item j's
    #: weights becomes l2 + dropout / (1 - dropout) * count_j.
    dropout: float = 0.0
    #: Co-occurrence window (steps in a user's history) for the tail.
    window: int = 5
    #: Weights kept per item.
    keep: int = 200


@dataclass
class SparseRows:
    """Row ``i``: ``neighbors[offsets[i]:offsets[i + 1]]`` with ``weights``, strongest first."""
    offsets: np.ndarray
    neighbors: np.ndarray
    weights: np.ndarray

    def dense(self, num_items: int) -> np.ndarray:
        out = np.zeros((num_items, num_items), dtype=np.float32)
        rows = np.repeat(np.arange(num_items), np.diff(self.offsets))
        out[rows, self.neighbors] = self.weights
        return out


def fit(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_users: int, num_items: int,
        config: ItemToItemConfig) -> SparseRows:
    """Weights from interactions given as parallel arrays of user and item positions."""
    counts = np.bincount(items, minlength=num_items)
    by_popularity = np.argsort(-counts, kind="stable")
    head = np.sort(by_popularity[:min(config.head_items, num_items)])
    head = head[counts[head] > 0]
    is_head = np.zeros(num_items, dtype=bool)
    is_head[head] = True

    tail_matrix = cooccurrence(users, items, timestamps, num_items, config.window)
    # Keep the strongest per row, then drop the head rows (EASE replaces them).
    tail = top_per_row(tail_matrix, config.keep, by_magnitude=False)
    if len(head):
        ease = ease_rows(users, items, num_users, num_items, head, config.l2, config.keep, config.dropout)
        scale = _typical_top(ease) / max(_typical_top(tail), 1e-12)
        tail = SparseRows(tail.offsets, tail.neighbors, tail.weights * scale)
        return _merge(ease, tail, is_head)
    return tail


def cooccurrence(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, num_items: int,
                 window: int) -> sp.csr_matrix:
    """Symmetric item x item weights: sum over users of 1/d for each pair d <= ``window``
    steps apart in the user's time-ordered history, divided by sqrt(count_i * count_j).
    Accumulated one distance at a time, so memory holds the distinct pairs, not every
    occurrence."""
    order = np.lexsort((timestamps, users))
    users, items = users[order], items[order].astype(np.int32)
    matrix = sp.csr_matrix((num_items, num_items), dtype=np.float32)
    for distance in range(1, window + 1):
        same = users[distance:] == users[:-distance]
        a, b = items[:-distance][same], items[distance:][same]
        different = a != b
        a, b = a[different], b[different]
        weight = np.full(2 * len(a), 1.0 / distance, dtype=np.float32)
        matrix = matrix + sp.csr_matrix((weight, (np.concatenate([a, b]), np.concatenate([b, a]))),
                                        shape=(num_items, num_items))
    norm = 1.0 / np.sqrt(np.maximum(np.bincount(items, minlength=num_items), 1)).astype(np.float32)
    return (sp.diags(norm) @ matrix @ sp.diags(norm)).tocsr()


def ease_rows(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, head: np.ndarray, l2: float,
              keep: int, dropout: float = 0.0) -> SparseRows:
    """EASE (``dropout`` 0) or DLAE over the ``head`` items (their rows and columns only),
    as sparse rows of the whole catalogue (rows of other items are empty)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    column = np.full(num_items, -1, dtype=np.int64)
    column[head] = np.arange(len(head))
    in_head = column[items] >= 0
    x = sp.csr_matrix((np.ones(int(in_head.sum()), dtype=np.float64), (users[in_head], column[items[in_head]])),
                      shape=(num_users, len(head)))
    x.sum_duplicates()
    x.data[:] = 1.0  # repeated interactions count once
    gram = (x.T @ x).toarray()
    penalty = l2 + dropout / (1.0 - dropout) * np.diag(gram)
    gram[np.diag_indices_from(gram)] += penalty
    inverse = np.linalg.inv(gram)
    if dropout > 0.0:
        # DLAE: B = (G + Λ)^-1 G = I - (G + Λ)^-1 Λ, so B_ij = -inverse_ij * Λ_j off the diagonal.
        weights = -inverse * penalty[None, :]
    else:
        # EASE: the same regression with B_jj = 0 enforced, B_ij = -inverse_ij / inverse_jj.
        weights = -inverse / np.diag(inverse)
    # A self-weight only scores items the user already has, which are never served.
    np.fill_diagonal(weights, 0.0)
    local = top_per_row(sp.csr_matrix(weights.astype(np.float32)), keep, by_magnitude=True)
    # Back to catalogue positions: row r of `local` is item head[r].
    counts = np.zeros(num_items, dtype=np.int64)
    counts[head] = np.diff(local.offsets)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    return SparseRows(offsets, head[local.neighbors].astype(np.int64), local.weights)


def top_per_row(matrix: sp.csr_matrix, keep: int, by_magnitude: bool) -> SparseRows:
    """Each row's ``keep`` largest entries (by value, or by absolute value: EASE's negative
    weights are evidence too), in value order (largest first)."""
    matrix = matrix.tocsr()
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    lengths = np.diff(matrix.indptr)
    row_of = np.repeat(np.arange(matrix.shape[0], dtype=np.int32), lengths)
    strength = np.abs(matrix.data) if by_magnitude else matrix.data
    # Strongest first within each row (a stable sort: ties keep column order).
    order = np.lexsort((-strength, row_of))
    rank = np.arange(len(order)) - np.repeat(matrix.indptr[:-1], lengths)
    chosen = order[rank < keep]
    kept = np.minimum(lengths, keep)
    offsets = np.concatenate(([0], np.cumsum(kept)))
    neighbors, weights = matrix.indices[chosen].astype(np.int64), matrix.data[chosen].astype(np.float32)
    if by_magnitude:
        final = np.lexsort((-weights, np.repeat(np.arange(matrix.shape[0]), kept)))
        neighbors, weights = neighbors[final], weights[final]
    return SparseRows(offsets, neighbors, weights)


def _typical_top(rows: SparseRows) -> float:
    """Median of the rows' strongest weights."""
    starts = rows.offsets[:-1][np.diff(rows.offsets) > 0]
    return float(np.median(rows.weights[starts])) if len(starts) else 0.0


def _merge(head: SparseRows, tail: SparseRows, is_head: np.ndarray) -> SparseRows:
    """Head rows from ``head``, the others from ``tail``."""
    lengths = np.where(is_head, np.diff(head.offsets), np.diff(tail.offsets))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    take_head = np.repeat(is_head, lengths)
    head_rows = np.flatnonzero(is_head)
    head_index = _ranges(head.offsets[head_rows], head.offsets[head_rows + 1])
    tail_rows = np.flatnonzero(~is_head)
    tail_index = _ranges(tail.offsets[tail_rows], tail.offsets[tail_rows + 1])
    neighbors = np.empty(offsets[-1], dtype=np.int64)
    weights = np.empty(offsets[-1], dtype=np.float32)
    neighbors[take_head], weights[take_head] = head.neighbors[head_index], head.weights[head_index]
    neighbors[~take_head], weights[~take_head] = tail.neighbors[tail_index], tail.weights[tail_index]
    return SparseRows(offsets, neighbors, weights)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair, vectorised."""
    lengths = ends - starts
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(lengths.sum()) + offsets
