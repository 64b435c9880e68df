import numpy as np

from recsys_training.content import (
    ContentEncoding, cold_start_scores, cold_start_threshold, content_features, impute_vectors,
)
from recsys_training.data import Item


def test_content_features_are_genres_release_era_and_an_intercept():
    items = [Item("a", "A", ["Drama"], 1998), Item("b", "B", ["Comedy", "Drama"], 1990), Item("c", "C", [], 0)]
    rows = content_features(items)
    genres, eras = 2, 8  # Comedy, Drama; seven era buckets and an unknown year
    assert rows.shape == (3, genres + eras + 1)
    assert rows[0, :2].tolist() == [0, 1] and rows[1, :2].tolist() == [1, 1]
    # 1998 is the newest year (bucket 0); 1990 is 8 years older (bucket "8-17").
    assert rows[0, genres + 0] == 1 and rows[1, genres + 4] == 1
    assert rows[2, genres + eras - 1] == 1, "an unknown year has its own column"
    assert rows[:, -1].tolist() == [1, 1, 1]
    assert rows.sum(axis=1).tolist() == [3, 4, 2]


def test_an_item_without_interactions_takes_the_vector_its_attributes_map_to():
    rng = np.random.default_rng(0)
    # Two kinds of items, each with its own direction; the last of each kind is new.
    items = [Item(f"d{n}", "", ["Drama"], 1995) for n in range(20)] + \
            [Item(f"h{n}", "", ["Horror"], 1995) for n in range(20)]
    drama, horror = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    vectors = np.vstack([drama + 0.05 * rng.standard_normal(3) for _ in range(20)] +
                        [horror + 0.05 * rng.standard_normal(3) for _ in range(20)]).astype(np.float32)
    has_interactions = np.ones(40, dtype=bool)
    has_interactions[[19, 39]] = False
    untrained = vectors.copy()
    untrained[[19, 39]] = -5.0  # what sampled negatives make of an item nobody chose
    imputed = impute_vectors(untrained, has_interactions, content_features(items), l2=0.1)
    assert np.array_equal(imputed[has_interactions], untrained[has_interactions]), "trained vectors are kept"
    assert imputed.dtype == np.float32
    assert np.allclose(imputed[19], drama, atol=0.1), imputed[19]
    assert np.allclose(imputed[39], horror, atol=0.1), imputed[39]
    # Nothing to learn from, or nothing to fill: unchanged.
    assert np.array_equal(impute_vectors(untrained, np.ones(40, dtype=bool), content_features(items), 1.0), untrained)


def test_the_threshold_shows_a_new_item_to_the_configured_share_of_users():
    rng = np.random.default_rng(1)
    users = rng.standard_normal((1_000, 8))
    users[0] = 0.0  # a user without a vector is not counted
    pool = rng.standard_normal((30, 8))
    best = cold_start_scores(users, pool)
    assert np.isnan(best[0])
    assert np.isclose(best[1], (users[1] @ pool.T).max())
    threshold = cold_start_threshold(users, pool, share=0.3)
    assert abs(np.mean(best[1:] >= threshold) - 0.3) < 0.002
    assert cold_start_threshold(users, pool[:0], share=0.3) is None
    assert cold_start_threshold(users, pool, share=0.0) is None


def test_an_item_added_after_training_is_encoded_with_the_bundles_vocabulary():
    # The same cases as recsys_bundle's ContentMap tests (crates/bundle/src/content.rs):
    # the two encoders must agree.
    encoding = ContentEncoding(["Comedy", "Drama"], 1998)
    rows = encoding.features([Item("x", "", ["Drama", "Western"], 2001), Item("y", "", ["Comedy"], 1960),
                              Item("z", "", [], 0)])
    assert rows.tolist() == [
        # Comedy Drama | 0  1  2-3 4-7 8-17 18-37 38+ unknown | intercept
        [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1],  # an unknown genre is ignored; a year past the newest is the newest era
        [1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1],  # 38 years before the newest
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
    ]
    assert encoding.to_json(np.ones((11, 2)))["era_edges"] == [0, 1, 2, 4, 8, 18, 38]
