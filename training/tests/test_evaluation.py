import math

import numpy as np
import pytest

from recsys_training.data import Interaction
from recsys_training.evaluation import ranking_metrics, stratified_split


def interactions(pairs):
    return [Interaction(user_id=u, item_id=i, timestamp=n) for n, (u, i) in enumerate(pairs)]


def test_split_keeps_75_percent_of_every_item_and_is_reproducible():
    rows = interactions([(str(u), str(i)) for i in range(20) for u in range(8)])
    train, test = stratified_split(rows, ratio=0.75, filter_by="item", seed=42)
    assert len(train) == 20 * 6 and len(test) == 20 * 2
    for item in map(str, range(20)):
        assert sum(r.item_id == item for r in train) == 6
    again = stratified_split(rows, ratio=0.75, filter_by="item", seed=42)
    assert [(r.user_id, r.item_id) for r in again[0]] == [(r.user_id, r.item_id) for r in train]
    other = stratified_split(rows, ratio=0.75, filter_by="item", seed=7)
    assert [(r.user_id, r.item_id) for r in other[1]] != [(r.user_id, r.item_id) for r in test]


def test_split_follows_the_seeded_uniform_draw_in_data_order():
    # One group of four: the two rows with the largest draws of rand(4) (seed 42) are test.
    rows = interactions([("u0", "x"), ("u1", "x"), ("u2", "x"), ("u3", "x")])
    np.random.seed(42)
    draws = np.random.rand(4)
    expected_test = {f"u{n}" for n in np.argsort(draws)[2:]}
    _, test = stratified_split(rows, ratio=0.5, filter_by="item", seed=42)
    assert {r.user_id for r in test} == expected_test


def test_split_rejects_an_unknown_grouping():
    with pytest.raises(ValueError):
        stratified_split([], filter_by="session")


def test_metrics_on_a_hand_computed_example():
    relevant = {"a": {"1", "3", "9"}, "b": {"2"}, "c": {"5"}}
    recommended = {"a": ["1", "2", "3"], "b": ["7", "8", "2"], "z": ["1"]}
    metrics = ranking_metrics(relevant, recommended, k=3)
    assert metrics.users == 2  # "c" got no list, "z" has no test items
    assert metrics.precision_at_k == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert metrics.recall_at_k == pytest.approx((2 / 3 + 1) / 2)
    ndcg_a = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    ndcg_b = (1 / math.log2(4)) / 1
    assert metrics.ndcg_at_k == pytest.approx((ndcg_a + ndcg_b) / 2)
    map_a = (1 / 1 + 2 / 3) / 3
    map_b = (1 / 3) / 1
    assert metrics.map == pytest.approx((map_a + map_b) / 2)


def test_perfect_lists_score_one():
    relevant = {"a": {"1", "2"}}
    metrics = ranking_metrics(relevant, {"a": ["1", "2"]}, k=2)
    assert metrics.precision_at_k == metrics.recall_at_k == metrics.ndcg_at_k == metrics.map == 1.0


def test_beyond_accuracy_measures_coverage_genre_diversity_and_novelty(small_dataset):
    from recsys_training.serving_eval import beyond_accuracy

    # Items 0-19 are Action, 20-39 Comedy|Romance; each user took 8 of one cluster.
    same_genre = beyond_accuracy([["0", "1"], ["2", "3"]], small_dataset)
    mixed = beyond_accuracy([["0", "20"], ["1", "21"]], small_dataset)
    assert same_genre["coverage"] == pytest.approx(4 / 40)
    assert same_genre["diversity"] == 0.0
    assert mixed["diversity"] == 1.0, "no genre in common"
    # An item nobody took carries more information than one many took.
    unseen = beyond_accuracy([["never-taken"]], small_dataset)["novelty"]
    assert unseen > same_genre["novelty"] > 0
