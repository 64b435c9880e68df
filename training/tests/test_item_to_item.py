import numpy as np
import pytest

from recsys_training.item_to_item import ItemToItemConfig, fit


def planted(seed: int = 3, users: int = 300, items: int = 60, per_user: int = 12):
    """Two clusters of items (0-29, 30-59) with a popularity slope inside each; a user
    consumes items of one cluster, in time order."""
    rng = np.random.default_rng(seed)
    u, i, t = [], [], []
    weights = 1.0 / np.arange(1, 31)
    for user in range(users):
        base = 0 if user % 2 else 30
        chosen = base + rng.choice(30, per_user, replace=False, p=weights / weights.sum())
        u += [user] * per_user
        i += list(chosen)
        t += list(1_000 + np.arange(per_user) * 60)
    return np.array(u), np.array(i), np.array(t), users, items


def reference_ease(users, items, num_users, num_items, l2, keep):
    """The dense EASE of the original pipeline, sparsified by magnitude."""
    x = np.zeros((num_users, num_items))
    x[users, items] = 1.0
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += l2
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    np.fill_diagonal(weights, 0.0)
    return strongest_per_row(weights, keep)


def strongest_per_row(weights, keep):
    """Each row's ``keep`` weights of largest magnitude, the rest zero."""
    out = np.zeros_like(weights, dtype=np.float32)
    for row, values in enumerate(weights):
        top = np.argsort(-np.abs(values), kind="stable")[:keep]
        out[row, top] = values[top]
    return out


def rows_of(result, item):
    start, end = result.offsets[item], result.offsets[item + 1]
    return result.neighbors[start:end], result.weights[start:end]


def test_the_head_path_is_exactly_dense_ease():
    users, items, times, num_users, num_items = planted()
    result = fit(users, items, times, num_users, num_items, ItemToItemConfig(head_items=1_000, l2=50.0, keep=10))
    expected = reference_ease(users, items, num_users, num_items, 50.0, 10)
    np.testing.assert_allclose(result.dense(num_items), expected, rtol=1e-5, atol=1e-7)
    for item in range(num_items):
        _, weights = rows_of(result, item)
        assert list(weights) == sorted(weights, reverse=True), "rows are strongest first"


def test_with_dropout_the_head_path_is_dense_dlae():
    """DLAE's definition, B = (G + Λ)^-1 G with Λ = l2 + p / (1 - p) * diag(G), computed
    directly (the pipeline uses the equivalent I - (G + Λ)^-1 Λ), self-weights dropped."""
    users, items, times, num_users, num_items = planted()
    x = np.zeros((num_users, num_items))
    x[users, items] = 1.0
    gram = x.T @ x
    penalty = 50.0 + 0.5 / (1 - 0.5) * np.diag(gram)
    weights = np.linalg.solve(gram + np.diag(penalty), gram)
    np.fill_diagonal(weights, 0.0)
    expected = strongest_per_row(weights, 10)

    config = ItemToItemConfig(head_items=1_000, l2=50.0, dropout=0.5, keep=10)
    result = fit(users, items, times, num_users, num_items, config)
    np.testing.assert_allclose(result.dense(num_items), expected, rtol=1e-4, atol=1e-6)
    ease = fit(users, items, times, num_users, num_items, ItemToItemConfig(head_items=1_000, l2=50.0, keep=10))
    assert not np.allclose(result.dense(num_items), ease.dense(num_items)), "dropout changes the weights"


def test_a_dropout_outside_zero_to_one_is_refused():
    users, items, times, num_users, num_items = planted()
    for dropout in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            fit(users, items, times, num_users, num_items, ItemToItemConfig(head_items=1_000, dropout=dropout))


def test_the_sparse_path_finds_the_clusters_without_a_dense_matrix():
    users, items, times, num_users, num_items = planted()
    result = fit(users, items, times, num_users, num_items, ItemToItemConfig(head_items=0, window=3, keep=8))
    dense = result.dense(num_items)
    assert (dense >= 0).all(), "co-occurrence weights are positive"
    for item in range(num_items):
        neighbors, weights = rows_of(result, item)
        assert 0 < len(neighbors) <= 8 and item not in neighbors
        assert all((n < 30) == (item < 30) for n in neighbors), (item, neighbors)
        assert list(weights) == sorted(weights, reverse=True)


def test_head_and_tail_rows_come_from_their_own_method_on_one_scale():
    users, items, times, num_users, num_items = planted()
    counts = np.bincount(items, minlength=num_items)
    config = ItemToItemConfig(head_items=20, l2=50.0, window=3, keep=8)
    mixed = fit(users, items, times, num_users, num_items, config)
    tail_only = fit(users, items, times, num_users, num_items, ItemToItemConfig(head_items=0, window=3, keep=8))
    head = set(np.argsort(-counts, kind="stable")[:20].tolist())
    for item in range(num_items):
        neighbors, weights = rows_of(mixed, item)
        if item in head:
            assert set(neighbors.tolist()) <= head, "EASE rows stay inside the head"
        else:
            tail_neighbors, tail_weights = rows_of(tail_only, item)
            np.testing.assert_array_equal(neighbors, tail_neighbors)
            # The tail is rescaled by one factor for the whole catalogue.
            ratio = weights / tail_weights
            np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    head_top = np.median([rows_of(mixed, i)[1][0] for i in head])
    tail_top = np.median([rows_of(mixed, i)[1][0] for i in range(num_items) if i not in head])
    assert 0.2 < tail_top / head_top < 5.0, (head_top, tail_top)
