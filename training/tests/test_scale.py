import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from recsys_training.bundle import verify
from recsys_training.data import DataError
from recsys_training.item_to_item import ItemToItemConfig
from recsys_training.scale import ScaleConfig, history_before, load_columns, train_scale_bundle
from recsys_training.scale_rankers import CrossFeatures, RankerScaleConfig
from recsys_training.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(SyntheticConfig(items=3_000, users=3_000, interactions=150_000, clusters=30, seed=5), out)
    return out


def test_history_before_takes_the_same_users_latest_items_first():
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([10, 11, 12, 20, 21])
    history = history_before(users, items, np.array([2, 3, 4]), length=3, pad=99)
    assert history.tolist() == [[11, 10, 99], [99, 99, 99], [20, 99, 99]]


def test_a_retrieval_bundle_learns_beyond_popularity_and_ships_an_index(synthetic, tmp_path):
    config = ScaleConfig(epochs=2, ann_min_items=1_000, eval_users=1_000,
                         item_to_item=ItemToItemConfig(head_items=500, keep=20))
    published = train_scale_bundle(synthetic, tmp_path / "bundles", config, version="r1")
    assert verify(published) == []
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["contents"] == "retrieval" and manifest["num_items"] == 3_000
    assert {"embeddings.safetensors", "item_to_item.safetensors", "item_signals.safetensors",
            "item_index.safetensors"} <= set(manifest["files"])
    embeddings = load_file(published / "embeddings.safetensors")
    assert embeddings["item_vectors"].shape == (3_000, 64) and "user_vectors" not in embeddings
    metrics = manifest["metrics"]
    popularity = metrics["hit_rate_at_100_popularity"]
    assert metrics["hit_rate_at_100_embedding"] > 1.5 * popularity, metrics
    assert metrics["hit_rate_at_100_item_to_item"] > 1.5 * popularity, metrics

    index = load_file(published / "item_index.safetensors")
    assert index["level0_links"].shape == (3_000, 1 + 2 * config.ann_connectivity)
    assert index["item_codes"].shape == (3_000, 64) and index["item_code_scales"].shape == (3_000,)


def test_interactions_naming_an_unknown_item_are_refused(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title\na,A\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu,a,1\nu,b,2\n")
    with pytest.raises(DataError, match="row 2, column item_id"):
        load_columns(tmp_path)


def test_a_full_bundle_at_scale_ships_rankers_that_learn(synthetic, tmp_path):
    config = ScaleConfig(epochs=2, ann_min_items=1_000, eval_users=500,
                         item_to_item=ItemToItemConfig(head_items=500, keep=20),
                         rankers=RankerScaleConfig(training_users=1_500, validation_users=500, epochs=2,
                                                   coarse_epochs=2, batch_size=1_024, resolve_users=1_000))
    published = train_scale_bundle(synthetic, tmp_path / "bundles", config, version="full")
    assert verify(published) == []
    manifest = json.loads((published / "manifest.json").read_text())
    assert "contents" not in manifest
    assert {"coarse.onnx", "ranker.onnx", "ranker_fixture.json", "item_index.safetensors"} <= set(manifest["files"])
    features = manifest["feature_config"]
    assert features["fine_model"] == "din" and len(features["cross"]) == 5
    genres = next(f for f in features["item"] if f["source"] == "genres")
    assert len(genres["vocabulary"]) > 5, "the synthetic categories are the genre vocabulary"
    metrics = manifest["metrics"]
    assert metrics["fine_auc_recall_candidates"] > 0.6 and metrics["coarse_auc_recall_candidates"] > 0.6, metrics
    assert metrics["onnx_max_abs_diff"] < 1e-4
    items = json.loads((published / "items.json").read_text())
    assert {"interactions", "interactions_7d", "interactions_30d", "like_rate"} <= set(items[0]["stats"])
    fixture = json.loads((published / "ranker_fixture.json").read_text())
    assert len(fixture) >= 4 and all(example["user_index"] == 0 for example in fixture)


def test_cross_features_standardise_over_the_unseen_catalogue_without_scanning_it():
    rng = np.random.default_rng(1)
    num_items = 400
    vectors = rng.normal(size=(num_items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    offsets = np.arange(0, 10 * num_items + 1, 10, dtype=np.int64)
    neighbors = rng.integers(0, num_items, 10 * num_items).astype(np.uint32)
    weights = rng.random(10 * num_items).astype(np.float32)
    rows = type("Rows", (), {"offsets": offsets, "neighbors": neighbors, "weights": weights})()
    cross = ["item_cf_score", "item_cf_zscore", "item_cf_recent_score", "embedding_score", "embedding_zscore"]
    features = CrossFeatures(vectors, rows, cross)
    history = np.array([5, 17, 5, 230, 99, 3, 41, 8, 77, 12, 300, 150], dtype=np.int64)
    candidates = np.array([0, 1, 2, 60, 61, 399], dtype=np.int64)
    got = features.features(history, candidates)

    # Brute force over the whole catalogue, as rank-svc computes it.
    item_cf = np.zeros(num_items)
    recent = np.zeros(num_items)
    for position, item in enumerate(history):
        for at in range(offsets[item], offsets[item + 1]):
            item_cf[neighbors[at]] += weights[at]
            if position < 10:
                recent[neighbors[at]] += weights[at]
    unseen = np.ones(num_items, dtype=bool)
    unseen[history] = False
    embedding = (vectors @ vectors[history[:50]].mean(axis=0)).astype(np.float64)

    def z(scores):
        return (scores[candidates] - scores[unseen].mean()) / scores[unseen].std()

    expected = np.stack([item_cf[candidates], z(item_cf), recent[candidates], embedding[candidates], z(embedding)], 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
