"""Content-based vectors for items nobody has interacted with yet: the cold-start path.

BPR only ever meets an item without interactions as a sampled negative, so its trained
vector points away from every user and no channel can find it. Here a ridge regression
learns, over the items that do have interactions, how their attributes (genres, release
era) map to their trained vectors; each item without interactions takes the vector its
attributes map to. The embedding space is unchanged, so a user's vector (or, for a user
without a trained one, the mean vector of their latest 50 items, as serving computes it)
finds such an item by inner product, which is what recall's cold-start channel scores.

The bundle ships the score that a configured share of the training users' best new item
reaches (`cold_start.threshold` in the manifest): rank-svc marks a cold-start candidate
at or above it, and rerank's `new_item_slot` rule gives it a slot. (Judging the new item
instead by its margin over the known item it would displace was measured too: it showed
fewer of the users' test items per warm item lost on `make eval`'s cold-start protocol.)
"""

from __future__ import annotations

import numpy as np

from .data import Item

# Release-era buckets, as years before the newest release year in the catalogue: the
# newest year, the one before, 2-3 years, 4-7, 8-17, 18-37, older (and unknown apart).
ERA_EDGES = (0, 1, 2, 4, 8, 18, 38)
USER_CHUNK = 4096


def content_features(items: list[Item]) -> np.ndarray:
    """One row per item: genres (multi-hot), release era (one-hot, unknown year apart) and
    a constant column for the regression's intercept."""
    genres = sorted({genre for item in items for genre in item.genres})
    column = {genre: n for n, genre in enumerate(genres)}
    known_years = [item.year for item in items if item.year > 0]
    newest = max(known_years, default=0)
    eras = len(ERA_EDGES) + 1  # the buckets, and one for an unknown year
    rows = np.zeros((len(items), len(genres) + eras + 1), dtype=np.float64)
    for n, item in enumerate(items):
        for genre in item.genres:
            rows[n, column[genre]] = 1.0
        if item.year > 0:
            era = int(np.searchsorted(ERA_EDGES, newest - item.year, side="right")) - 1
        else:
            era = eras - 1
        rows[n, len(genres) + era] = 1.0
        rows[n, -1] = 1.0
    return rows


def impute_vectors(item_vectors: np.ndarray, has_interactions: np.ndarray, features: np.ndarray,
                   l2: float) -> np.ndarray:
    """`item_vectors` with the rows of items without interactions replaced by the ridge
    regression (strength `l2`) of the others' vectors on their content features."""
    vectors = item_vectors.copy()
    cold = ~has_interactions
    if not cold.any() or not has_interactions.any():
        return vectors
    warm_features = features[has_interactions]
    penalty = l2 * np.eye(features.shape[1])
    penalty[-1, -1] = 0.0  # the intercept (content_features' constant column) is not shrunk
    gram = warm_features.T @ warm_features + penalty
    mapping = np.linalg.solve(gram, warm_features.T @ item_vectors[has_interactions].astype(np.float64))
    vectors[cold] = (features[cold] @ mapping).astype(vectors.dtype)
    return vectors


def cold_start_scores(user_vectors: np.ndarray, pool_vectors: np.ndarray) -> np.ndarray:
    """Each user's best score over the pool: max over items of u·v / |u| (what recall's
    cold-start channel scores), NaN for a user with a zero vector."""
    best = np.full(len(user_vectors), np.nan)
    for start in range(0, len(user_vectors), USER_CHUNK):
        users = user_vectors[start:start + USER_CHUNK].astype(np.float64)
        norms = np.linalg.norm(users, axis=1)
        scores = (users @ pool_vectors.T.astype(np.float64)).max(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            best[start:start + USER_CHUNK] = np.where(norms > 0, scores / norms, np.nan)
    return best


def cold_start_threshold(user_vectors: np.ndarray, pool_vectors: np.ndarray, share: float) -> float | None:
    """The score at or above which a `share` of the users have a new item to be shown;
    None without users or new items, or for a share outside (0, 1]."""
    if len(pool_vectors) == 0 or not 0.0 < share <= 1.0:
        return None
    best = cold_start_scores(user_vectors, pool_vectors)
    best = best[np.isfinite(best)]
    if len(best) == 0:
        return None
    return float(np.quantile(best, 1.0 - share))
