"""The offline evaluation protocol of the published MovieLens-100k table (Microsoft
Recommenders, "Algorithm comparison"), re-implemented so that our served pipeline is
measured the way the published rows were:

- split: stratified random split, ratio 0.75, grouped by item (``filter_by="item"``),
  seed 42 — every item's interactions are shuffled and its first 75% go to training;
- metrics at k = 10 with binary relevance (every test interaction is relevant, seen
  training items are never recommended): precision@k, recall@k, nDCG@k and MAP, averaged
  over the users that have both test interactions and recommendations.

This module is the foundation of ``make eval`` (issue: served-pipeline evaluation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .data import Interaction


def stratified_split(interactions: list[Interaction], ratio: float = 0.75, filter_by: str = "item",
                     seed: int = 42) -> tuple[list[Interaction], list[Interaction]]:
    """Microsoft Recommenders' ``python_stratified_split``: a uniform random number per
    row (numpy's legacy generator seeded with ``seed``, in data order), rows ranked within
    their group by it (ties by order), and a row goes to training when
    ``rank / group size <= ratio``."""
    if filter_by not in ("user", "item"):
        raise ValueError("filter_by must be 'user' or 'item'")
    np.random.seed(seed)
    keys = np.random.rand(len(interactions))
    groups: dict[str, list[int]] = defaultdict(list)
    for index, interaction in enumerate(interactions):
        groups[interaction.item_id if filter_by == "item" else interaction.user_id].append(index)
    in_train = np.zeros(len(interactions), dtype=bool)
    for members in groups.values():
        # A stable sort gives pandas' rank(method="first") order for equal keys.
        ordered = sorted(members, key=lambda i: keys[i])
        count = len(ordered)
        for rank, index in enumerate(ordered, start=1):
            in_train[index] = rank / count <= ratio
    train = [interaction for interaction, keep in zip(interactions, in_train) if keep]
    test = [interaction for interaction, keep in zip(interactions, in_train) if not keep]
    return train, test


@dataclass
class RankingMetrics:
    precision_at_k: float
    recall_at_k: float
    ndcg_at_k: float
    map: float
    users: int
    # Each user's nDCG@k, for confidence intervals.
    ndcg_per_user: list[float] = field(default_factory=list)

    def ndcg_ci95(self) -> tuple[float, float]:
        """Normal-approximation 95% interval of the mean nDCG@k over users."""
        values = np.asarray(self.ndcg_per_user)
        if len(values) < 2:
            return (self.ndcg_at_k, self.ndcg_at_k)
        half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
        return (self.ndcg_at_k - half, self.ndcg_at_k + half)

    def as_report(self, k: int) -> dict:
        return {f"precision@{k}": self.precision_at_k, f"recall@{k}": self.recall_at_k,
                f"ndcg@{k}": self.ndcg_at_k, "map": self.map, "users": self.users}


def ranking_metrics(relevant: dict[str, set[str]], recommended: dict[str, list[str]], k: int = 10) -> RankingMetrics:
    """Binary-relevance metrics over the users present in both mappings; a user's list
    is cut at k. MAP divides each user's sum of precisions at hits by the number of
    relevant items (the definition behind the published MAP column)."""
    users = [user for user in recommended if relevant.get(user)]
    if not users:
        return RankingMetrics(0.0, 0.0, 0.0, 0.0, 0)
    precision = recall = ndcg = average_precision = 0.0
    per_user = []
    for user in users:
        truth = relevant[user]
        hits = [item in truth for item in recommended[user][:k]]
        hit_count = sum(hits)
        precision += hit_count / k
        recall += hit_count / len(truth)
        dcg = sum(1.0 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
        ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(truth), k)))
        ndcg += dcg / ideal
        per_user.append(dcg / ideal)
        seen = 0
        precision_sum = 0.0
        for rank, hit in enumerate(hits, start=1):
            if hit:
                seen += 1
                precision_sum += seen / rank
        average_precision += precision_sum / len(truth)
    n = len(users)
    return RankingMetrics(precision / n, recall / n, ndcg / n, average_precision / n, n, per_user)
