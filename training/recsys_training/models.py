"""PyTorch models: BPR matrix factorisation for embedding recall and coarse ranking, and
the fine-ranking MLP exported to ONNX for rank-svc."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class BprMatrixFactorization(nn.Module):
    """User and item embeddings scored by their dot product, trained with the BPR loss."""

    def __init__(self, num_users: int, num_items: int, dim: int) -> None:
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def bpr_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, l2: float) -> torch.Tensor:
        u = self.users(users)
        p = self.items(positives)
        n = self.items(negatives)
        margin = (u * p).sum(-1) - (u * n).sum(-1)
        regulariser = l2 * (u.pow(2).sum(-1) + p.pow(2).sum(-1) + n.pow(2).sum(-1)).mean()
        return -nn.functional.logsigmoid(margin).mean() + regulariser


class FineRanker(nn.Module):
    """Click-style probability from id embeddings, their interaction and side features.

    Index 0 of both embedding tables is the unknown user/item (training drops user ids to
    0 now and then so the unknown row learns a useful default)."""

    def __init__(self, num_users: int, num_items: int, user_dim: int, item_dim: int, embedding_dim: int = 32) -> None:
        super().__init__()
        self.user_embedding = nn.Embedding(num_users + 1, embedding_dim)
        self.item_embedding = nn.Embedding(num_items + 1, embedding_dim)
        nn.init.normal_(self.user_embedding.weight, std=0.05)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        width = 3 * embedding_dim + user_dim + item_dim
        self.mlp = nn.Sequential(
            nn.Linear(width, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 1),
        )

    def forward(self, user_index, item_index, user_features, item_features):
        u = self.user_embedding(user_index)
        i = self.item_embedding(item_index)
        x = torch.cat([u, i, u * i, user_features, item_features], dim=-1)
        return torch.sigmoid(self.mlp(x).squeeze(-1))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
