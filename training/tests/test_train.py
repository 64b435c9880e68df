import json

import numpy as np
import onnxruntime

from recsys_training.bundle import verify
from recsys_training.models import auc
from recsys_training.train import TrainConfig, train_bundle


def quick_config() -> TrainConfig:
    return TrainConfig(bpr_epochs=15, ranker_epochs=3, batch_size=256, embedding_dim=16)


def test_training_publishes_a_complete_verified_bundle(small_dataset, tmp_path):
    out = tmp_path / "bundles"
    published = train_bundle(small_dataset, out, quick_config(), version="v1")
    assert published == out / "v1"
    assert (out / "current").resolve() == published.resolve()
    assert verify(published) == []
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["num_items"] == 40 and manifest["num_users"] == 60
    assert set(manifest["files"]) >= {"ranker.onnx", "items.json", "users.json", "item_embeddings.f32",
                                      "user_embeddings.f32", "item_neighbors.json", "popularity.json"}
    assert manifest["metrics"]["onnx_max_abs_diff"] <= 1e-4
    assert sum(manifest["score_distribution"]["counts"]) > 0
    embeddings = np.fromfile(published / "item_embeddings.f32", dtype="<f4")
    assert embeddings.shape == (40 * 16,)
    assert not list(out.glob(".staging-*")), "no staging directory is left behind"


def test_models_learn_the_planted_structure(small_dataset, tmp_path):
    published = train_bundle(small_dataset, tmp_path / "b", quick_config(), version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["metrics"]["ranker_val_auc"] > 0.7
    # Item-to-item neighbours stay inside the genre cluster the users consume together.
    neighbours = json.loads((published / "item_neighbors.json").read_text())
    top = [int(n) for n, _ in neighbours["3"][:5]]
    assert all(n < 20 for n in top), top


def test_onnx_ranker_takes_any_batch_size(small_dataset, tmp_path):
    published = train_bundle(small_dataset, tmp_path / "b", quick_config(), version="v1")
    manifest = json.loads((published / "manifest.json").read_text())
    spec = manifest["feature_spec"]
    user_dim = 3 + len(spec["occupations"]) + 1
    item_dim = len(spec["genres"]) + 2
    session = onnxruntime.InferenceSession(str(published / "ranker.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 300):
        scores = session.run(["score"], {
            "user_index": np.zeros(batch, dtype=np.int64),
            "item_index": np.arange(batch, dtype=np.int64) % 41,
            "user_features": np.zeros((batch, user_dim), dtype=np.float32),
            "item_features": np.zeros((batch, item_dim), dtype=np.float32),
        })[0]
        assert scores.shape == (batch,)
        assert np.all((scores >= 0) & (scores <= 1))


def test_auc_matches_hand_computed_values():
    assert auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.1, 0.9])) == 0.0
    assert auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
