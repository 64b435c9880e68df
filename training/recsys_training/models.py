"""The bundle's neural models: the retrieval vectors (LightGCN over the user–item graph, or
BPR matrix factorisation), the coarse MLP and the fine rankers (DIN, DeepFM, Wide & Deep),
the last two exported to ONNX for rank-svc. The item-to-item model is in ``item_to_item``."""

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


def normalised_graph(num_users: int, num_items: int, user_idx: np.ndarray, item_idx: np.ndarray,
                     weights: np.ndarray) -> torch.Tensor:
    """The user–item graph's adjacency, users first then items, each edge weighted and the
    whole symmetrically normalised (D^-1/2 A D^-1/2, D the weighted degrees): LightGCN's
    propagation matrix, sparse."""
    nodes = num_users + num_items
    rows = np.concatenate([user_idx, num_users + item_idx])
    cols = np.concatenate([num_users + item_idx, user_idx])
    values = np.concatenate([weights, weights]).astype(np.float64)
    degree = np.bincount(rows, weights=values, minlength=nodes)
    scale = np.zeros(nodes)
    np.power(degree, -0.5, out=scale, where=degree > 0)
    normalised = (values * scale[rows] * scale[cols]).astype(np.float32)
    indices = torch.as_tensor(np.vstack([rows, cols]), dtype=torch.int64)
    # Built from checked arrays above: torch's own invariant checks would only repeat them.
    return torch.sparse_coo_tensor(indices, torch.as_tensor(normalised), (nodes, nodes),
                                   check_invariants=False).coalesce()


class LightGcn(nn.Module):
    """LightGCN (He et al., 2020): one free vector per user and item, smoothed over the
    interaction graph — each layer replaces a node's vector by the weighted, normalised sum
    of its neighbours' — and the mean of the layers is the node's vector. Scored by the dot
    product and trained with the BPR loss, L2 on the free vectors. A user's vector is thus
    mostly the aggregate of the items they chose, which is what serving computes for a user
    the bundle has not seen (the mean of their items' vectors)."""

    def __init__(self, num_users: int, num_items: int, dim: int, graph: torch.Tensor, layers: int) -> None:
        super().__init__()
        self.num_users = num_users
        self.layers = layers
        self.graph = graph
        self.free = nn.Embedding(num_users + num_items, dim)
        nn.init.normal_(self.free.weight, std=0.1)

    def propagate(self) -> torch.Tensor:
        """Every node's vector: users, then items."""
        layer = self.free.weight
        total = layer
        for _ in range(self.layers):
            layer = torch.sparse.mm(self.graph, layer)
            total = total + layer
        return total / (self.layers + 1)

    def bpr_loss(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, l2: float) -> torch.Tensor:
        vectors = self.propagate()
        positives, negatives = positives + self.num_users, negatives + self.num_users
        u, p, n = vectors[users], vectors[positives], vectors[negatives]
        margin = (u * p).sum(-1) - (u * n).sum(-1)
        free = self.free.weight
        regulariser = l2 * (free[users].pow(2).sum(-1) + free[positives].pow(2).sum(-1)
                            + free[negatives].pow(2).sum(-1)).mean()
        return -nn.functional.logsigmoid(margin).mean() + regulariser


class CoarseRanker(nn.Module):
    """The coarse stage: a shallow MLP over a few cheap cross features (``columns`` of the
    cross feature vector, chosen in the feature configuration), so it can score every
    recalled candidate."""

    def __init__(self, columns: list[int], hidden: int = 16) -> None:
        super().__init__()
        self.register_buffer("columns", torch.as_tensor(columns, dtype=torch.int64))
        self.mlp = nn.Sequential(nn.Linear(len(columns), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def logit(self, cross_features):
        return self.mlp(cross_features.index_select(-1, self.columns)).squeeze(-1)

    def forward(self, cross_features):
        return torch.sigmoid(self.logit(cross_features))


class FineRanker(nn.Module):
    """What DIN and DeepFM share.

    Residual on the coarse ranker: the click logit is added to the (frozen) coarse logit
    and the click head starts at zero, so training begins at the coarse ranker's quality
    and keeps only what improves on it.

    Multi-task: two heads over the same inputs, *click* (the user engages with the item)
    and *like* (given engagement, a rating >= 4 or a like/purchase event). The like tower
    reads the inputs with gradients stopped, so the sparser like labels cannot pull the
    shared embeddings away from the click task (sharing them cost engagement accuracy on
    MovieLens). The served score fuses them: ``click * (1 - like_weight + like_weight *
    like)``; ``like_weight = 0`` ranks by engagement alone. Subclasses implement
    ``trunk_input`` and may add terms to the click logit with ``extra_click_logit``."""

    def __init__(self, base: CoarseRanker | None, width: int, like_weight: float,
                 trunk: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        self.base = base
        if base is not None:
            for parameter in base.parameters():
                parameter.requires_grad_(False)
        self.trunk = nn.Sequential(nn.Linear(width, trunk[0]), nn.ReLU(), nn.Dropout(0.1), nn.Linear(*trunk), nn.ReLU())
        self.click_head = nn.Linear(trunk[1], 1)
        nn.init.zeros_(self.click_head.weight)
        nn.init.zeros_(self.click_head.bias)
        self.like_tower = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1))
        self.like_weight = float(like_weight)

    def base_logit(self, cross_features):
        return self.base.logit(cross_features) if self.base is not None else 0.0

    def trunk_input(self, user_index, item_index, history, user_features, item_features, cross_features):
        raise NotImplementedError

    def extra_click_logit(self, inputs, x):
        return 0.0

    def logits(self, *inputs):
        """(click logit, like logit) per row, for training."""
        x = self.trunk_input(*inputs)
        hidden = self.trunk(x)
        click = self.base_logit(inputs[-1]) + self.extra_click_logit(inputs, x) + self.click_head(hidden).squeeze(-1)
        return click, self.like_tower(x.detach()).squeeze(-1)

    def forward(self, user_index, item_index, history, user_features, item_features, cross_features):
        click, like = self.logits(user_index, item_index, history, user_features, item_features, cross_features)
        return torch.sigmoid(click) * (1.0 - self.like_weight + self.like_weight * torch.sigmoid(like))


def id_embeddings(num_users: int, num_items: int, dim: int) -> tuple[nn.Embedding, nn.Embedding]:
    """The fine rankers' user and item id tables (index 0: the unknown user or item, and
    the sequence padding), with small initial values."""
    user, item = nn.Embedding(num_users + 1, dim), nn.Embedding(num_items + 1, dim)
    nn.init.normal_(user.weight, std=0.05)
    nn.init.normal_(item.weight, std=0.05)
    return user, item


def sequence_mean(item_embedding: nn.Embedding, history: torch.Tensor) -> torch.Tensor:
    """The mean embedding of a behaviour sequence's items (0 is padding; an empty sequence
    gives zeros)."""
    embedded = item_embedding(history)
    mask = (history > 0).to(embedded.dtype).unsqueeze(-1)
    return (embedded * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Din(FineRanker):
    """Deep Interest Network (Zhou et al., 2018): the candidate attends over the user's
    behaviour sequence, so the user's interest vector depends on the item being scored.

    Index 0 of the id tables is the unknown user/item and the sequence padding. As in the
    paper the attention weights are not softmax-normalised (intensity matters); the sum is
    divided by the sequence length only to keep its scale independent of history length."""

    def __init__(self, num_users: int, num_items: int, user_dim: int, item_dim: int, cross_dim: int, dim: int,
                 base: CoarseRanker | None = None, like_weight: float = 0.0, trunk: tuple[int, int] = (128, 64),
                 attention: int = 32) -> None:
        super().__init__(base, 3 * dim + user_dim + item_dim + cross_dim, like_weight, trunk)
        self.user_embedding, self.item_embedding = id_embeddings(num_users, num_items, dim)
        self.attention = nn.Sequential(nn.Linear(4 * dim, attention), nn.ReLU(), nn.Linear(attention, 1))

    def trunk_input(self, user_index, item_index, history, user_features, item_features, cross_features):
        user = self.user_embedding(user_index)
        item = self.item_embedding(item_index)
        behaviour = self.item_embedding(history)
        query = item.unsqueeze(1).expand_as(behaviour)
        weights = self.attention(torch.cat([behaviour, query, behaviour - query, behaviour * query], dim=-1)).squeeze(-1)
        mask = (history > 0).to(weights.dtype)
        interest = ((weights * mask).unsqueeze(-1) * behaviour).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return torch.cat([user, item, interest, user_features, item_features, cross_features], dim=-1)


class DeepFm(FineRanker):
    """DeepFM (Guo et al., 2017): first-order terms, pairwise factorisation-machine
    interactions between field embeddings, and a deep MLP over the same embeddings.
    Fields: user id, item id, the mean of the behaviour sequence, and one learned
    projection each of the user, item and cross feature vectors."""

    def __init__(self, num_users: int, num_items: int, user_dim: int, item_dim: int, cross_dim: int, dim: int,
                 base: CoarseRanker | None = None, like_weight: float = 0.0, trunk: tuple[int, int] = (128, 64),
                 attention: int = 0) -> None:
        # ``attention`` is DIN's; accepted so that both rankers take the same widths.
        super().__init__(base, 6 * dim, like_weight, trunk)
        self.user_embedding, self.item_embedding = id_embeddings(num_users, num_items, dim)
        self.user_bias = nn.Embedding(num_users + 1, 1)
        self.item_bias = nn.Embedding(num_items + 1, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.linear = nn.Linear(user_dim + item_dim + cross_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.user_field = nn.Linear(user_dim, dim)
        self.item_field = nn.Linear(item_dim, dim)
        self.cross_field = nn.Linear(cross_dim, dim)
        # Small field vectors, so the pairwise term starts near 0 and training starts at
        # the coarse ranker's quality (like the other terms).
        for field in (self.user_field, self.item_field, self.cross_field):
            nn.init.normal_(field.weight, std=0.01)
            nn.init.zeros_(field.bias)
        self.dim = dim

    def trunk_input(self, user_index, item_index, history, user_features, item_features, cross_features):
        """The deep part's input: the field embeddings, flattened."""
        behaviour = sequence_mean(self.item_embedding, history)
        fields = torch.stack([
            self.user_embedding(user_index), self.item_embedding(item_index), behaviour,
            self.user_field(user_features), self.item_field(item_features), self.cross_field(cross_features),
        ], dim=1)
        return fields.flatten(1)

    def extra_click_logit(self, inputs, x):
        """First-order terms and the factorisation machine's pairwise interactions."""
        user_index, item_index, _, user_features, item_features, cross_features = inputs
        fields = x.reshape(-1, x.shape[1] // self.dim, self.dim)
        first_order = (self.linear(torch.cat([user_features, item_features, cross_features], dim=-1))
                       + self.user_bias(user_index) + self.item_bias(item_index)).squeeze(-1)
        pairwise = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1)).sum(-1)
        return first_order + pairwise


class WideDeep(FineRanker):
    """Wide & Deep (Cheng et al., 2016): a wide linear model that memorises feature
    crosses beside a deep network that generalises through embeddings.

    Wide: a linear term over the user, item and cross features and over their cross
    products — every user feature times every item feature (gender × genre, occupation ×
    genre, hour × genre, ...), the paper's cross-product transformation on our encoded
    fields — plus per-user and per-item biases. Deep: an MLP over the user and item
    embeddings, the mean of the behaviour sequence, and the dense features. The wide
    weights start at zero, so training starts from the coarse ranker's order."""

    def __init__(self, num_users: int, num_items: int, user_dim: int, item_dim: int, cross_dim: int, dim: int,
                 base: CoarseRanker | None = None, like_weight: float = 0.0, trunk: tuple[int, int] = (128, 64),
                 attention: int = 0) -> None:
        # ``attention`` is DIN's; accepted so that every ranker takes the same widths.
        super().__init__(base, 3 * dim + user_dim + item_dim + cross_dim, like_weight, trunk)
        self.user_embedding, self.item_embedding = id_embeddings(num_users, num_items, dim)
        self.user_bias = nn.Embedding(num_users + 1, 1)
        self.item_bias = nn.Embedding(num_items + 1, 1)
        self.wide = nn.Linear(user_dim + item_dim + cross_dim + user_dim * item_dim, 1)
        for parameter in (self.user_bias.weight, self.item_bias.weight, self.wide.weight, self.wide.bias):
            nn.init.zeros_(parameter)

    def trunk_input(self, user_index, item_index, history, user_features, item_features, cross_features):
        behaviour = sequence_mean(self.item_embedding, history)
        return torch.cat([self.user_embedding(user_index), self.item_embedding(item_index), behaviour,
                          user_features, item_features, cross_features], dim=-1)

    def extra_click_logit(self, inputs, x):
        """The wide part."""
        user_index, item_index, _, user_features, item_features, cross_features = inputs
        crosses = (user_features.unsqueeze(-1) * item_features.unsqueeze(1)).flatten(1)
        wide = torch.cat([user_features, item_features, cross_features, crosses], dim=-1)
        return (self.wide(wide) + self.user_bias(user_index) + self.item_bias(item_index)).squeeze(-1)


FINE_RANKERS = {"din": Din, "deepfm": DeepFm, "wide_deep": WideDeep}


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
