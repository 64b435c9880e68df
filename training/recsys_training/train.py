"""Trains every model of a bundle from one data directory and publishes the bundle."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import bundle
from .data import Dataset, load_dataset
from .features import build_spec, item_feature_matrix, user_feature_matrix
from .models import BprMatrixFactorization, FineRanker, auc


@dataclass
class TrainConfig:
    seed: int = 42
    embedding_dim: int = 64
    bpr_epochs: int = 40
    bpr_lr: float = 0.01
    bpr_l2: float = 1e-4
    neighbors: int = 50
    ranker_epochs: int = 4
    ranker_negatives: int = 4
    ranker_lr: float = 2e-3
    user_dropout: float = 0.1
    batch_size: int = 4096
    threads: int = 2


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[train {time.monotonic() - _STARTED:6.1f}s] {message}", flush=True)


def _numeric_first(ids):
    return sorted(ids, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))


def train_bpr(num_users, num_items, user_idx, item_idx, config: TrainConfig, rng) -> tuple[np.ndarray, np.ndarray]:
    model = BprMatrixFactorization(num_users, num_items, config.embedding_dim)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.bpr_lr)
    users_t = torch.as_tensor(user_idx)
    items_t = torch.as_tensor(item_idx)
    n = len(user_idx)
    for epoch in range(config.bpr_epochs):
        permutation = torch.as_tensor(rng.permutation(n))
        negatives = torch.as_tensor(rng.integers(0, num_items, n))
        total = 0.0
        for start in range(0, n, config.batch_size):
            batch = permutation[start:start + config.batch_size]
            loss = model.bpr_loss(users_t[batch], items_t[batch], negatives[batch], config.bpr_l2)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 0 or epoch == config.bpr_epochs - 1:
            log(f"bpr epoch {epoch + 1}/{config.bpr_epochs} loss {total / n:.4f}")
    return model.users.weight.detach().numpy().copy(), model.items.weight.detach().numpy().copy()


def item_neighbors(num_users, num_items, user_idx, item_idx, k: int) -> list[list[tuple[int, float]]]:
    """Item-to-item cosine similarity over co-occurrence in user histories."""
    interactions = np.zeros((num_users, num_items), dtype=np.float32)
    interactions[user_idx, item_idx] = 1.0
    co_occurrence = interactions.T @ interactions
    counts = np.diag(co_occurrence).copy()
    similarity = co_occurrence / (np.sqrt(np.outer(counts, counts)) + 1e-9)
    np.fill_diagonal(similarity, 0.0)
    result = []
    for row in similarity:
        top = np.argpartition(-row, min(k, num_items - 1))[:k]
        top = top[np.argsort(-row[top])]
        result.append([(int(j), float(row[j])) for j in top if row[j] > 0])
    return result


def train_ranker(dataset, spec, user_ids, user_events, item_interactions, user_idx, item_idx, config: TrainConfig, rng):
    num_users, num_items = len(user_ids), len(dataset.items)
    user_features = user_feature_matrix(spec, dataset, user_ids, user_events)
    item_features = item_feature_matrix(spec, dataset, item_interactions)
    positives = set((user_idx.astype(np.int64) * num_items + item_idx).tolist())
    neg_users = np.repeat(user_idx, config.ranker_negatives)
    neg_items = rng.integers(0, num_items, len(neg_users))
    keep = ~np.isin(neg_users.astype(np.int64) * num_items + neg_items, np.fromiter(positives, dtype=np.int64))
    users = np.concatenate([user_idx, neg_users[keep]]) + 1
    items = np.concatenate([item_idx, neg_items[keep]]) + 1
    labels = np.concatenate([np.ones(len(user_idx)), np.zeros(keep.sum())]).astype(np.float32)
    order = rng.permutation(len(labels))
    users, items, labels = users[order], items[order], labels[order]
    holdout = max(len(labels) // 20, 1)
    val = slice(0, holdout)
    train = slice(holdout, None)

    model = FineRanker(num_users, num_items, spec.user_feature_dim, spec.item_feature_dim)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.ranker_lr)
    loss_fn = torch.nn.BCELoss()
    uf_t, if_t = torch.as_tensor(user_features), torch.as_tensor(item_features)
    tr_users = torch.as_tensor(users[train])
    tr_items = torch.as_tensor(items[train])
    tr_labels = torch.as_tensor(labels[train])
    n = len(tr_labels)

    def scores(u, i):
        with torch.no_grad():
            return model(u, i, uf_t[u], if_t[i]).numpy()

    val_u, val_i = torch.as_tensor(users[val]), torch.as_tensor(items[val])
    for epoch in range(config.ranker_epochs):
        model.train()
        permutation = torch.as_tensor(rng.permutation(n))
        total = 0.0
        for start in range(0, n, config.batch_size):
            batch = permutation[start:start + config.batch_size]
            u = tr_users[batch]
            # Drop user ids now and then so index 0 (unknown user) learns a sensible default.
            dropped = torch.as_tensor(rng.random(len(batch)) < config.user_dropout)
            u_id = torch.where(dropped, torch.zeros_like(u), u)
            i = tr_items[batch]
            loss = loss_fn(model(u_id, i, uf_t[u], if_t[i]), tr_labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(batch)
        model.eval()
        val_auc = auc(labels[val], scores(val_u, val_i))
        log(f"ranker epoch {epoch + 1}/{config.ranker_epochs} loss {total / n:.4f} val_auc {val_auc:.4f}")
    model.eval()
    val_scores = scores(val_u, val_i)
    held_out = (val_u, val_i, uf_t[val_u], if_t[val_i])
    return model, float(auc(labels[val], val_scores)), val_scores, held_out


def ranker_fixture(dataset, user_ids, user_events, held_out, model, count: int = 8) -> list[dict]:
    """Examples with the exact tensors and PyTorch scores of training, so rank-svc's tests
    can prove that serving builds the same inputs and the ONNX model gives the same score."""
    users, items, user_features, item_features = (t[:count] for t in held_out)
    with torch.no_grad():
        expected = model(users, items, user_features, item_features).numpy()
    examples = []
    for n in range(len(users)):
        uid = user_ids[int(users[n]) - 1]
        user = dataset.users.get(uid)
        examples.append({
            "user_id": uid,
            "age": user.age if user else 0,
            "gender": user.gender if user else "",
            "occupation": user.occupation if user else "",
            "event_count": user_events.get(uid, 0),
            "item_id": dataset.items[int(items[n]) - 1].item_id,
            "user_index": int(users[n]),
            "item_index": int(items[n]),
            "user_features": user_features[n].tolist(),
            "item_features": item_features[n].tolist(),
            "score": float(expected[n]),
        })
    return examples


def export_ranker(model, held_out, path: Path) -> float:
    """Exports to ONNX with a dynamic batch axis and returns the max abs difference
    between PyTorch and ONNX Runtime on the held-out batch."""
    import onnxruntime

    names = ["user_index", "item_index", "user_features", "item_features"]
    sample = tuple(t[:8] for t in held_out)
    torch.onnx.export(
        model, sample, str(path), input_names=names, output_names=["score"],
        dynamic_axes={**{n: {0: "batch"} for n in names}, "score": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {n: t.numpy() for n, t in zip(names, held_out)}
    onnx_scores = session.run(["score"], feed)[0]
    with torch.no_grad():
        torch_scores = model(*held_out).numpy()
    return float(np.max(np.abs(onnx_scores - torch_scores)))


def train_bundle(data_dir: Path, out_root: Path, config: TrainConfig | None = None, version: str | None = None) -> Path:
    config = config or TrainConfig()
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)

    dataset: Dataset = load_dataset(data_dir)
    log(f"loaded {len(dataset.interactions)} interactions, {len(dataset.items)} items, {len(dataset.users)} users from {data_dir}")
    item_position = {item.item_id: n for n, item in enumerate(dataset.items)}
    user_ids = _numeric_first({i.user_id for i in dataset.interactions})
    user_position = {uid: n for n, uid in enumerate(user_ids)}
    pairs = sorted({(user_position[i.user_id], item_position[i.item_id]) for i in dataset.interactions})
    user_idx = np.array([p[0] for p in pairs], dtype=np.int64)
    item_idx = np.array([p[1] for p in pairs], dtype=np.int64)
    user_events = Counter(i.user_id for i in dataset.interactions)
    item_interactions = Counter(i.item_id for i in dataset.interactions)
    spec = build_spec(dataset, user_events, item_interactions)

    user_vectors, item_vectors = train_bpr(len(user_ids), len(dataset.items), user_idx, item_idx, config, rng)
    log("computing item-to-item neighbours")
    neighbours = item_neighbors(len(user_ids), len(dataset.items), user_idx, item_idx, config.neighbors)
    model, ranker_auc, val_scores, held_out = train_ranker(
        dataset, spec, user_ids, user_events, item_interactions, user_idx, item_idx, config, rng)

    out_root.mkdir(parents=True, exist_ok=True)
    version = version or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{dataset.sha256[:8]}"
    staging = out_root / f".staging-{version}"
    if staging.exists():
        import shutil
        shutil.rmtree(staging)
    staging.mkdir()
    onnx_diff = export_ranker(model, held_out, staging / "ranker.onnx")
    log(f"ranker exported to ONNX; max |pytorch - onnxruntime| = {onnx_diff:.2e}")
    if onnx_diff > 1e-4:
        raise RuntimeError(f"ONNX export differs from PyTorch by {onnx_diff}")

    fixture = ranker_fixture(dataset, user_ids, user_events, held_out, model)
    (staging / "ranker_fixture.json").write_text(json.dumps(fixture))
    catalog = [
        {"id": item.item_id, "title": item.title, "genres": item.genres, "year": item.year,
         "interactions": item_interactions.get(item.item_id, 0)}
        for item in dataset.items
    ]
    (staging / "items.json").write_text(json.dumps(catalog))
    (staging / "users.json").write_text(json.dumps(user_ids))
    user_vectors.astype("<f4").tofile(staging / "user_embeddings.f32")
    item_vectors.astype("<f4").tofile(staging / "item_embeddings.f32")
    (staging / "item_neighbors.json").write_text(json.dumps({
        dataset.items[n].item_id: [[dataset.items[j].item_id, round(s, 6)] for j, s in row]
        for n, row in enumerate(neighbours)
    }))
    max_count = max(item_interactions.values())
    popularity = sorted(((iid, c / max_count) for iid, c in item_interactions.items()), key=lambda p: (-p[1], p[0]))
    (staging / "popularity.json").write_text(json.dumps([[iid, round(s, 6)] for iid, s in popularity]))

    counts, edges = np.histogram(val_scores, bins=20, range=(0.0, 1.0))
    # Reference distributions of two ranker inputs over the training interactions, for
    # feature drift in rank-svc (same encoding as the model sees, so values lie in [0, 1]).
    user_feature_rows = user_feature_matrix(spec, dataset, user_ids, user_events)
    item_feature_rows = item_feature_matrix(spec, dataset, item_interactions)
    feature_distributions = {}
    for name, values in (("user_events", user_feature_rows[user_idx + 1, -1]), ("item_interactions", item_feature_rows[item_idx + 1, -1])):
        f_counts, f_edges = np.histogram(values, bins=20, range=(0.0, 1.0))
        feature_distributions[name] = {"edges": [round(e, 4) for e in f_edges.tolist()], "counts": f_counts.tolist()}
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_data_sha256": dataset.sha256,
        "embedding_dim": config.embedding_dim,
        "num_users": len(user_ids),
        "num_items": len(dataset.items),
        "feature_spec": spec.to_json(),
        "metrics": {"ranker_val_auc": round(ranker_auc, 6), "onnx_max_abs_diff": onnx_diff,
                    "training_seconds": round(time.monotonic() - started, 1)},
        "score_distribution": {"edges": [round(e, 4) for e in edges.tolist()], "counts": counts.tolist()},
        "feature_distributions": feature_distributions,
        "training_config": config.__dict__,
    }
    published = bundle.publish(staging, out_root, version, manifest)
    log(f"published bundle {version} at {published} in {time.monotonic() - started:.1f}s (ranker AUC {ranker_auc:.4f})")
    return published
