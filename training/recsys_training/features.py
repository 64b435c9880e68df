"""Ranker input features, encoded exactly as ``crates/bundle/src/features.rs`` does.

The specification (vocabularies and scales) is stored in the bundle manifest, so rank-svc
rebuilds the same vectors from the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .data import Dataset, Item


@dataclass
class FeatureSpec:
    genres: list[str]
    occupations: list[str]
    age_scale: float
    user_events_log_scale: float
    item_interactions_log_scale: float
    year_min: int
    year_max: int

    @property
    def user_feature_dim(self) -> int:
        return 3 + len(self.occupations) + 1

    @property
    def item_feature_dim(self) -> int:
        return len(self.genres) + 2

    def to_json(self) -> dict:
        return asdict(self)

    def user_features(self, age: int, gender: str, occupation: str, event_count: int) -> list[float]:
        return (
            [age / self.age_scale, float(gender == "M"), float(gender == "F")]
            + [float(o == occupation) for o in self.occupations]
            + [math.log1p(event_count) / self.user_events_log_scale]
        )

    def item_features(self, item: Item, interactions: int) -> list[float]:
        if item.year == 0 or self.year_max <= self.year_min:
            year = 0.0
        else:
            year = (min(max(item.year, self.year_min), self.year_max) - self.year_min) / (self.year_max - self.year_min)
        return (
            [float(g in item.genres) for g in self.genres]
            + [year, math.log1p(interactions) / self.item_interactions_log_scale]
        )


def build_spec(dataset: Dataset, user_events: dict[str, int], item_interactions: dict[str, int]) -> FeatureSpec:
    genres = sorted({g for item in dataset.items for g in item.genres})
    occupations = sorted({u.occupation for u in dataset.users.values() if u.occupation})
    years = [item.year for item in dataset.items if item.year > 0]
    return FeatureSpec(
        genres=genres,
        occupations=occupations,
        age_scale=100.0,
        user_events_log_scale=max(math.log1p(max(user_events.values(), default=1)), 1.0),
        item_interactions_log_scale=max(math.log1p(max(item_interactions.values(), default=1)), 1.0),
        year_min=min(years, default=0),
        year_max=max(years, default=0),
    )


def user_feature_matrix(spec: FeatureSpec, dataset: Dataset, user_ids: list[str], user_events: dict[str, int]) -> np.ndarray:
    """Row ``i + 1`` holds user ``user_ids[i]``; row 0 is the unknown user."""
    rows = [spec.user_features(0, "", "", 0)]
    for uid in user_ids:
        user = dataset.users.get(uid)
        rows.append(spec.user_features(
            user.age if user else 0, user.gender if user else "", user.occupation if user else "",
            user_events.get(uid, 0),
        ))
    return np.asarray(rows, dtype=np.float32)


def item_feature_matrix(spec: FeatureSpec, dataset: Dataset, item_interactions: dict[str, int]) -> np.ndarray:
    """Row ``i + 1`` holds catalog item ``i``; row 0 is an unknown item."""
    rows = [[0.0] * spec.item_feature_dim]
    rows += [spec.item_features(item, item_interactions.get(item.item_id, 0)) for item in dataset.items]
    return np.asarray(rows, dtype=np.float32)
