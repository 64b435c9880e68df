"""Content-based vectors for items nobody has interacted with yet: the cold-start path.

BPR only ever meets an item without interactions as a sampled negative, so its trained
vector points away from every user and no channel can find it. Here a ridge regression
learns, over the items that do have interactions, how their attributes (genres, release
era) map to their trained vectors; each item without interactions takes the vector its
attributes map to. The embedding space is unchanged, so a user's vector (or, for a user
without a trained one, the mean vector of their latest 50 items, as serving computes it)
finds such an item by inner product u·v, which is what recall's cold-start channel scores
(the manifest's `cold_start.score`, "inner_product").

The bundle ships the map (`cold_start.content` in the manifest: recall-svc maps a run-time
catalogue item's attributes the same way, so an item added after training is scored
too) and a threshold on that score (`cold_start.threshold`, set on stand-ins:
train.py's `cold_start_policy`): rank-svc marks a cold-start candidate at or above it,
and rerank's `new_item_slot` rule gives it a slot. The score is not divided by |u|
(bundles before `cold_start.score` did): the user's norm carries how sure the model is of
the user, and thresholding the model's own score showed more of the users' test items per
warm item displaced on `make eval`'s cold-start protocol. (Judging the new item instead by
its margin over the known item it would displace was measured too: it showed fewer.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Item

# Release-era buckets, as years before the newest release year in the catalogue: the
# newest year, the one before, 2-3 years, 4-7, 8-17, 18-37, older (and unknown apart).
ERA_EDGES = (0, 1, 2, 4, 8, 18, 38)
USER_CHUNK = 4096
# The manifest's `cold_start.score`: how `cold_start_scores` (and recall's cold-start
# channel) score a new item for a user.
COLD_START_SCORE = "inner_product"


@dataclass
class ContentEncoding:
    """How attributes become content features: the genre vocabulary (sorted) and the
    newest release year the eras count back from. recall-svc encodes run-time catalogue
    items the same way (`recsys_bundle::ContentMap`, from the manifest), so a new item
    gets a vector without retraining."""
    genres: list[str]
    newest_year: int

    @staticmethod
    def of(items: list[Item]) -> "ContentEncoding":
        known_years = [item.year for item in items if item.year > 0]
        return ContentEncoding(sorted({genre for item in items for genre in item.genres}), max(known_years, default=0))

    @property
    def width(self) -> int:
        return len(self.genres) + len(ERA_EDGES) + 2  # genres, eras and an unknown year, intercept

    def features(self, items: list[Item]) -> np.ndarray:
        """One row per item: genres (multi-hot), release era (one-hot, unknown year apart)
        and a constant column for the regression's intercept."""
        column = {genre: n for n, genre in enumerate(self.genres)}
        unknown_era = len(ERA_EDGES)
        rows = np.zeros((len(items), self.width), dtype=np.float64)
        for n, item in enumerate(items):
            for genre in item.genres:
                if genre in column:
                    rows[n, column[genre]] = 1.0
            if item.year > 0:
                before_newest = max(self.newest_year - item.year, 0)
                era = int(np.searchsorted(ERA_EDGES, before_newest, side="right")) - 1
            else:
                era = unknown_era
            rows[n, len(self.genres) + era] = 1.0
            rows[n, -1] = 1.0
        return rows

    def to_json(self, mapping: np.ndarray) -> dict:
        """The manifest's `cold_start.content`: the encoding and the map's rows."""
        return {"genres": self.genres, "newest_year": self.newest_year, "era_edges": list(ERA_EDGES),
                "mapping": [[round(float(v), 6) for v in row] for row in mapping]}


def content_features(items: list[Item]) -> np.ndarray:
    """`ContentEncoding.features` with the encoding these items define."""
    return ContentEncoding.of(items).features(items)


def fit_content_map(item_vectors: np.ndarray, has_interactions: np.ndarray, features: np.ndarray,
                    l2: float) -> np.ndarray | None:
    """The ridge regression (strength `l2`, the intercept not shrunk) of the vectors of
    the items with interactions on their content features: [features, dim]; None
    without any such item."""
    if not has_interactions.any():
        return None
    warm_features = features[has_interactions]
    penalty = l2 * np.eye(features.shape[1])
    penalty[-1, -1] = 0.0  # the intercept (the constant column) is not shrunk
    gram = warm_features.T @ warm_features + penalty
    return np.linalg.solve(gram, warm_features.T @ item_vectors[has_interactions].astype(np.float64))


def map_cold_vectors(item_vectors: np.ndarray, has_interactions: np.ndarray, features: np.ndarray,
                     mapping: np.ndarray) -> np.ndarray:
    """`item_vectors` with the rows of items without interactions replaced by what their
    content features map to through `mapping`."""
    vectors = item_vectors.copy()
    cold = ~has_interactions
    vectors[cold] = (features[cold] @ mapping).astype(vectors.dtype)
    return vectors


def impute_vectors(item_vectors: np.ndarray, has_interactions: np.ndarray, features: np.ndarray,
                   l2: float) -> np.ndarray:
    """`map_cold_vectors` through the map fitted on the items with interactions
    (`fit_content_map`); the vectors unchanged when no item or every item has them."""
    mapping = fit_content_map(item_vectors, has_interactions, features, l2) if not has_interactions.all() else None
    if mapping is None:
        return item_vectors.copy()
    return map_cold_vectors(item_vectors, has_interactions, features, mapping)


def cold_start_scores(user_vectors: np.ndarray, pool_vectors: np.ndarray) -> np.ndarray:
    """Each user's best score over the pool: max over items of u·v (what recall's
    cold-start channel scores), NaN for a user with a zero vector (who gets no query)."""
    best = np.full(len(user_vectors), np.nan)
    for start in range(0, len(user_vectors), USER_CHUNK):
        users = user_vectors[start:start + USER_CHUNK].astype(np.float64)
        has_vector = np.linalg.norm(users, axis=1) > 0
        scores = (users @ pool_vectors.T.astype(np.float64)).max(axis=1)
        best[start:start + USER_CHUNK] = np.where(has_vector, scores, np.nan)
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
