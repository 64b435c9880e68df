import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from recsys_training.bundle import verify
from recsys_training.data import DataError
from recsys_training.item_to_item import ItemToItemConfig
from recsys_training.scale import ScaleConfig, history_before, load_columns, train_retrieval_bundle
from recsys_training.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(SyntheticConfig(items=3_000, users=3_000, interactions=60_000, clusters=30, seed=5), out)
    return out


def test_history_before_takes_the_same_users_latest_items_first():
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([10, 11, 12, 20, 21])
    history = history_before(users, items, np.array([2, 3, 4]), length=3, pad=99)
    assert history.tolist() == [[11, 10, 99], [99, 99, 99], [20, 99, 99]]


def test_a_retrieval_bundle_learns_beyond_popularity_and_ships_an_index(synthetic, tmp_path):
    config = ScaleConfig(epochs=2, ann_min_items=1_000, eval_users=1_000,
                         item_to_item=ItemToItemConfig(head_items=500, keep=20))
    published = train_retrieval_bundle(synthetic, tmp_path / "bundles", config, version="r1")
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
