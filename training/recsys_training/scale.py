"""Retrieval models at catalogue scale (10^6 items, 10^7 interactions), columnar end to end.

``train_bundle`` (``train.py``) reads rows into Python objects and fits the rankers with
per-user loops: right for MovieLens, hours at a million items. This pipeline trains what
recall serves — the retrieval embeddings, the item-to-item model, popularity and the
HNSW index — from numpy arrays, and publishes a *retrieval bundle* that recall-svc serves
(rank-svc needs the rankers of a full bundle and refuses it).

- **Data** is read with pyarrow (Parquet or CSV in the project's format); ids become
  dense positions once, through the dictionary of a dictionary-encoded column.
- **Retrieval model**: one item embedding table; a user is the mean of the embeddings of
  their latest ``history`` items, so the user side is computed at request time from
  behaviour (a click a second ago moves it, a new user has one) and the bundle carries no
  per-user table. Trained on minibatches with in-batch sampled softmax, corrected for the
  popularity of the sampled negatives (logQ), with sparse gradients and SparseAdam.
- **Item-to-item**: EASE for the head items, windowed co-occurrence for the tail
  (``item_to_item``).
- **Index**: an HNSW graph over the item vectors (inner product), built with hnswlib and
  stored by item position with an int8 copy of the vectors (``ann``).
- **Evaluation**: each user's last interaction is held out; the manifest reports hit
  rate@100 of the embedding and item-to-item channels against popularity.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import ann, bundle, item_to_item, scale_rankers
from .counters import COUNTED
from .data import DataError, table_path
from .features import ItemEventLog

#: Latest history items pooled into the user vector; recall-svc uses the same number.
HISTORY_ITEMS = 50


@dataclass
class ScaleConfig:
    seed: int = 42
    dim: int = 64
    epochs: int = 1
    batch_size: int = 2048
    lr: float = 0.02
    history: int = HISTORY_ITEMS
    item_to_item: item_to_item.ItemToItemConfig = None  # type: ignore[assignment]
    #: Catalogues at least this large get an HNSW index; smaller ones are scanned exactly.
    ann_min_items: int = 50_000
    # M 32 / efConstruction 200: at a million clustered items M 16 stays under recall@100
    # 0.99 even at ef 1024 (hnswlib measured 0.985).
    ann_connectivity: int = 32
    ann_expansion_add: int = 200
    #: Users sampled for the held-out evaluation.
    eval_users: int = 5_000
    threads: int = 2
    #: The rankers' training; None for a retrieval bundle (no rankers).
    rankers: scale_rankers.RankerScaleConfig | None = None
    #: Feature configuration file; empty for ``training/feature_config.toml``.
    feature_config: str = ""

    def __post_init__(self):
        if self.item_to_item is None:
            self.item_to_item = item_to_item.ItemToItemConfig(keep=50)


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[scale {time.monotonic() - _STARTED:7.1f}s] {message}", flush=True)


@dataclass
class Columns:
    """Interactions as parallel arrays, each user's in time order."""
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    #: Rows that are a like: a rating of 4 or more, or a like or purchase event.
    liked: np.ndarray
    item_table: dict
    users_table: "scale_rankers.UserTable"
    sha256: str
    #: Every counted event (impressions too) by item and time: the live item features.
    events: ItemEventLog | None = None

    @property
    def num_users(self) -> int:
        return len(self.users_table.ids)


def _read_table(path: Path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)


def _positions(column, ids, path: Path, name: str) -> np.ndarray:
    """Positions in ``ids`` of each value of ``column`` (a dictionary-encoded column is
    mapped through its dictionary, so 20 million rows cost one lookup per distinct id)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        mapped = pc.index_in(column.dictionary.cast(pa.string()), value_set=ids).fill_null(-1).to_numpy()
        positions = mapped[column.indices.to_numpy(zero_copy_only=False)]
    else:
        positions = pc.index_in(column.cast(pa.string()), value_set=ids).fill_null(-1).to_numpy()
    unknown = np.flatnonzero(positions < 0)
    if len(unknown):
        raise DataError(f"{path}: row {int(unknown[0]) + 1}, column {name}: id not in the {name.split('_')[0]} table")
    return positions.astype(np.int64)


def load_columns(data_dir: Path) -> Columns:
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    interactions_path, items_path = table_path(data_dir, "interactions"), table_path(data_dir, "items")
    interactions, items = _read_table(interactions_path), _read_table(items_path)
    for path, table, required in ((interactions_path, interactions, ["user_id", "item_id", "timestamp"]),
                                  (items_path, items, ["item_id", "title"])):
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} in columns {table.column_names}")
    item_ids = items.column("item_id").cast(pa.string()).combine_chunks()
    item_positions = _positions(interactions.column("item_id"), item_ids, interactions_path, "item_id")
    user_column = interactions.column("user_id").combine_chunks()
    user_dictionary = user_column.dictionary.cast(pa.string()) if pa.types.is_dictionary(user_column.type) \
        else pc.unique(user_column.cast(pa.string()))
    user_positions = _positions(user_column, user_dictionary, interactions_path, "user_id")
    timestamps = interactions.column("timestamp").cast(pa.int64()).to_numpy()
    liked = np.zeros(len(timestamps), dtype=bool)
    # Impressions are exposure, not behaviour: the feature store keeps only engagements in
    # a user's history, so the models learn from (and predict) engagements alone.
    engaged = np.ones(len(timestamps), dtype=bool)
    if "rating" in interactions.column_names:
        liked |= np.nan_to_num(interactions.column("rating").cast(pa.float64()).to_numpy(zero_copy_only=False)) >= 4
    kinds = np.full(len(timestamps), -1, dtype=np.int64)
    if "event" in interactions.column_names:
        event = interactions.column("event").cast(pa.string())
        liked |= pc.is_in(event, value_set=pa.array(["like", "purchase"])).to_numpy(zero_copy_only=False)
        engaged = pc.invert(pc.equal(event, "impression")).fill_null(True).to_numpy(zero_copy_only=False)
        kinds = pc.index_in(event, value_set=pa.array(COUNTED)).fill_null(-1).to_numpy(zero_copy_only=False)
    events = ItemEventLog(item_positions, timestamps, np.asarray(kinds, dtype=np.int64))
    order = np.flatnonzero(engaged)
    order = order[np.lexsort((timestamps[order], user_positions[order]))]
    users_path = table_path(data_dir, "users")
    digest = hashlib.sha256()
    for path in (interactions_path, items_path) + ((users_path,) if users_path.is_file() else ()):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    year = items.column("year").to_numpy(zero_copy_only=False) if "year" in items.column_names else None
    item_table = {
        "id": item_ids.to_pylist(),
        "title": items.column("title").cast(pa.string()).to_pylist(),
        "genres": items.column("genres").cast(pa.string()).to_pylist() if "genres" in items.column_names else None,
        "year": np.nan_to_num(np.asarray(year, dtype=np.float64)).astype(np.int64) if year is not None else None,
    }
    return Columns(user_positions[order], item_positions[order], timestamps[order], liked[order], item_table,
                   _user_table(users_path, user_dictionary), digest.hexdigest(), events)


def _user_table(path: Path, user_ids) -> "scale_rankers.UserTable":
    """Attributes of the interactions' users, by position (empty where the file has none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    count = len(user_ids)
    table = scale_rankers.UserTable(ids=user_ids.to_pylist(), age=np.zeros(count, dtype=np.int64),
                                    gender=np.full(count, "", dtype=object), occupation=np.full(count, "", dtype=object))
    if not path.is_file():
        return table
    users = _read_table(path)
    if "user_id" not in users.column_names:
        raise DataError(f"{path}: missing column user_id in columns {users.column_names}")
    at = pc.index_in(users.column("user_id").cast(pa.string()), value_set=user_ids).fill_null(-1).to_numpy()
    known = at >= 0
    if "age" in users.column_names:
        table.age[at[known]] = np.nan_to_num(users.column("age").cast(pa.float64()).to_numpy(zero_copy_only=False))[known]
    for name in ("gender", "occupation"):
        if name in users.column_names:
            values = np.asarray(users.column(name).cast(pa.string()).fill_null("").to_pylist(), dtype=object)
            getattr(table, name)[at[known]] = values[known]
    return table


def hold_out_last(columns: Columns) -> tuple[np.ndarray, np.ndarray]:
    """(training mask, index of each held-out row): every user with two or more
    interactions keeps their last one out."""
    last = np.append(columns.users[1:] != columns.users[:-1], True)
    first = np.insert(columns.users[1:] != columns.users[:-1], 0, True)
    held = last & ~first
    return ~held, np.flatnonzero(held)


def history_before(users: np.ndarray, items: np.ndarray, rows: np.ndarray, length: int, pad: int) -> np.ndarray:
    """[len(rows), length]: the items each row's user consumed just before it, latest
    first, ``pad`` where the history is shorter. ``users``/``items`` are in user-then-time
    order."""
    out = np.full((len(rows), length), pad, dtype=np.int64)
    alive = np.ones(len(rows), dtype=bool)
    for back in range(1, length + 1):
        previous = rows - back
        alive &= previous >= 0
        alive[alive] &= users[previous[alive]] == users[rows[alive]]
        if not alive.any():
            break
        out[alive, back - 1] = items[previous[alive]]
    return out


class PooledHistoryModel(torch.nn.Module):
    """Item embeddings; a user is the mean of their history's. Row ``num_items`` is the
    padding (zero, never trained).

    Scores are cosines (both sides L2-normalised) over a temperature, and the bundle ships
    the unit item vectors: inner-product HNSW search over vectors of free norm reaches
    poor recall (the norms, not the directions, decide the graph's neighbourhoods), while
    over unit vectors inner product is cosine and the index is accurate. The served query
    is the mean of the history's unit vectors; its norm does not change the ranking."""

    def __init__(self, num_items: int, dim: int, temperature: float = 0.07):
        super().__init__()
        self.num_items = num_items
        self.temperature = temperature
        self.items = torch.nn.Embedding(num_items + 1, dim, sparse=True, padding_idx=num_items)
        torch.nn.init.normal_(self.items.weight, std=0.05)
        with torch.no_grad():
            self.items.weight[num_items].zero_()

    def users(self, history: torch.Tensor) -> torch.Tensor:
        """Mean of the history's unit vectors (what serving computes from the bundle)."""
        vectors = torch.nn.functional.normalize(
            torch.nn.functional.embedding(history, self.items.weight, sparse=True), dim=-1)
        valid = (history != self.num_items).unsqueeze(-1).to(vectors.dtype)
        return (vectors * valid).sum(1) / valid.sum(1).clamp(min=1.0)

    def loss(self, history: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """In-batch sampled softmax: each row's target against the batch's other targets,
        with their sampling log-probability subtracted (logQ correction) and repeats of
        the row's own target masked."""
        users = torch.nn.functional.normalize(self.users(history), dim=-1)
        target_vectors = torch.nn.functional.normalize(
            torch.nn.functional.embedding(targets, self.items.weight, sparse=True), dim=-1)
        logits = users @ target_vectors.T / self.temperature - log_q[targets].unsqueeze(0)
        repeats = (targets.unsqueeze(0) == targets.unsqueeze(1)) & ~torch.eye(len(targets), dtype=torch.bool)
        logits = logits.masked_fill(repeats, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(targets)))


def train_retrieval(columns: Columns, train_mask: np.ndarray, num_items: int, config: ScaleConfig,
                    rng: np.random.Generator) -> np.ndarray:
    users, items = columns.users, columns.items
    rows = np.flatnonzero(train_mask)
    # A row with no earlier item of its user has nothing to pool; it still serves as context.
    has_history = np.insert(users[1:] == users[:-1], 0, False)
    rows = rows[has_history[rows]]
    counts = np.bincount(items[train_mask], minlength=num_items).astype(np.float64)
    log_q = torch.as_tensor(np.log(np.maximum(counts, 1.0) / counts.sum()), dtype=torch.float32)
    # Training sees only training rows as history: mask held-out rows to padding.
    visible_items = np.where(train_mask, items, num_items)
    model = PooledHistoryModel(num_items, config.dim)
    optimiser = torch.optim.SparseAdam(model.parameters(), lr=config.lr)
    steps = (len(rows) + config.batch_size - 1) // config.batch_size
    for epoch in range(config.epochs):
        order = rows[rng.permutation(len(rows))]
        total, started = 0.0, time.monotonic()
        for step in range(steps):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            history = torch.as_tensor(history_before(users, visible_items, batch, config.history, num_items))
            loss = model.loss(history, torch.as_tensor(items[batch]), log_q)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
            if step % 1000 == 0 or step == steps - 1:
                log(f"retrieval epoch {epoch + 1}/{config.epochs} step {step + 1}/{steps} "
                    f"loss {total / (step + 1):.4f} ({(step + 1) / (time.monotonic() - started):.0f} steps/s)")
    vectors = model.items.weight.detach()[:num_items]
    return torch.nn.functional.normalize(vectors, dim=-1).numpy().astype(np.float32)


def hit_rates(columns: Columns, held: np.ndarray, vectors: np.ndarray, rows: item_to_item.SparseRows,
              popularity: np.ndarray, config: ScaleConfig, rng: np.random.Generator, k: int = 100) -> dict:
    """Hit rate@k of each user's held-out last item among the top k unseen items of the
    embedding channel, the item-to-item channel and popularity (a sample of users)."""
    num_items = len(vectors)
    sample = held if len(held) <= config.eval_users else np.sort(rng.choice(held, config.eval_users, replace=False))
    history = history_before(columns.users, columns.items, sample, config.history, num_items)
    hits = {"embedding": 0, "item_to_item": 0, "popularity": 0}
    popular_top = np.argsort(-popularity, kind="stable")[:k + config.history]
    for row, seen in zip(sample, history):
        seen = seen[seen < num_items]
        target = columns.items[row]
        seen_set = set(seen.tolist())
        query = vectors[seen].mean(axis=0)
        scores = vectors @ query
        scores[seen] = -np.inf
        hits["embedding"] += target in np.argpartition(-scores, k)[:k]
        evidence: dict[int, float] = {}
        for item in seen:
            start, end = rows.offsets[item], rows.offsets[item + 1]
            for neighbor, weight in zip(rows.neighbors[start:end].tolist(), rows.weights[start:end].tolist()):
                evidence[neighbor] = evidence.get(neighbor, 0.0) + weight
        ranked = sorted((n for n in evidence if n not in seen_set and evidence[n] > 0), key=lambda n: -evidence[n])
        hits["item_to_item"] += target in ranked[:k]
        hits["popularity"] += target in [n for n in popular_top.tolist() if n not in seen_set][:k]
    return {f"hit_rate_at_{k}_{name}": round(count / max(len(sample), 1), 6) for name, count in hits.items()} | {
        "hit_rate_users": len(sample)}


def candidate_search(vectors: np.ndarray, index, expansion: int = 128):
    """``search(query, k)``: the embedding channel's top k, from the HNSW index when there
    is one (as served), else exactly."""
    if index is not None:
        index.set_ef(expansion)
        return lambda query, k: index.knn_query(query, k=min(k, len(vectors)))[0][0].astype(np.int64).tolist()

    def exact(query, k):
        scores = vectors @ query
        top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
        return top[np.argsort(-scores[top], kind="stable")].tolist()
    return exact


def scale_fixture(users: "scale_rankers.Users", columns: Columns, rows: "scale_rankers.RankerRows", inputs,
                  fine, coarse, count: int = 8) -> list[dict]:
    """``train.ranker_fixture`` for this pipeline: examples with their exact inputs and
    PyTorch scores, for rank-svc's parity test (RECSYS_TEST_BUNDLE=<this bundle>)."""
    from .train import FINE_INPUTS, predict

    picked = np.unique(rows.users, return_index=True)[1][:count // 2]
    picked = np.sort(np.concatenate([picked, picked + 1]))
    picked = picked[picked < len(rows.users)]
    tensors = tuple(t[torch.as_tensor(picked)] for t in inputs)
    fine_scores, coarse_scores = predict(fine, tensors), predict(coarse, (tensors[-1],))
    item_ids, table = columns.item_table["id"], users.table
    examples = []
    for n, row in enumerate(picked.tolist()):
        user = int(rows.users[row])
        history, timestamps = users.history(user)
        examples.append({
            "user_id": table.ids[user], "age": int(table.age[user]), "gender": str(table.gender[user]),
            "occupation": str(table.occupation[user]), "event_count": len(history),
            "request_time": int(rows.request_times[row]),
            "history_item_ids": [item_ids[i] for i in history.tolist()], "history_timestamps": timestamps.tolist(),
            "item_id": item_ids[int(rows.items[row])],
            "item_counts": columns.events.windowed_counts(int(rows.items[row]), int(rows.request_times[row])),
            **{name: tensor[n].tolist() for name, tensor in zip(FINE_INPUTS, tensors)},
            "fine_score": float(fine_scores[n]), "coarse_score": float(coarse_scores[n]),
        })
    return examples


def train_scale_bundle(data_dir: Path, out_root: Path, config: ScaleConfig | None = None,
                       version: str | None = None) -> Path:
    """Every model of a bundle at catalogue scale; with ``config.rankers`` None, a
    retrieval bundle (recall-svc serves it, rank-svc refuses it)."""
    from .features import load_raw_config
    from .train import COARSE_INPUTS, FINE_INPUTS, export_onnx

    config = config or ScaleConfig()
    started = time.monotonic()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)

    columns = load_columns(data_dir)
    num_items = len(columns.item_table["id"])
    log(f"loaded {len(columns.items):,} interactions, {num_items:,} items, {columns.num_users:,} users from {data_dir}")
    train_mask, held = hold_out_last(columns)
    timings = {}

    phase = time.monotonic()
    vectors = train_retrieval(columns, train_mask, num_items, config, rng)
    timings["retrieval_seconds"] = round(time.monotonic() - phase, 1)

    phase = time.monotonic()
    rows = item_to_item.fit(columns.users[train_mask], columns.items[train_mask], columns.timestamps[train_mask],
                            columns.num_users, num_items, config.item_to_item)
    timings["item_to_item_seconds"] = round(time.monotonic() - phase, 1)
    log(f"item-to-item: {len(rows.neighbors):,} weights in {timings['item_to_item_seconds']} s")

    counts = np.bincount(columns.items[train_mask], minlength=num_items).astype(np.float64)
    popularity = counts / max(counts.max(), 1.0)
    metrics = hit_rates(columns, held, vectors, rows, popularity, config, rng)
    log("held-out hit rate@100: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))

    index = None
    if num_items >= config.ann_min_items:
        phase = time.monotonic()
        index = ann.build(vectors, config.ann_connectivity, config.ann_expansion_add, config.threads, config.seed)
        timings["index_seconds"] = round(time.monotonic() - phase, 1)
        log(f"HNSW index (M {config.ann_connectivity}, efConstruction {config.ann_expansion_add}) "
            f"built in {timings['index_seconds']} s")

    version, staging = bundle.staging_dir(out_root, version, columns.sha256)
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training_data_sha256": columns.sha256,
        "embedding_dim": config.dim,
        "num_users": 0,
        "num_items": num_items,
        "training_config": asdict(config),
    }
    raw_features = load_raw_config(Path(config.feature_config) if config.feature_config else None)
    stats = scale_rankers.item_statistics(columns.items[train_mask], columns.timestamps[train_mask],
                                          columns.liked[train_mask], num_items, [
                                              f["source"] for f in raw_features.get("item", [])])
    if config.rankers is None:
        # A retrieval bundle carries no rankers: rank-svc refuses it (no coarse.onnx).
        manifest["contents"] = "retrieval"
        manifest["feature_config"] = {"fine_model": "", "coarse_model": "", "embedding_dim": config.dim,
                                      "history_length": 0, "user": [], "item": [], "cross": []}
    else:
        phase = time.monotonic()
        users = scale_rankers.Users(columns.users[train_mask], columns.items[train_mask],
                                    columns.timestamps[train_mask], columns.users_table)
        fine, coarse, features, validation_rows, validation_inputs, ranker_metrics = scale_rankers.train_rankers(
            users, held, columns, vectors, rows, stats, candidate_search(vectors, index), raw_features,
            config.rankers, rng, log)
        fine_diff = export_onnx(fine, validation_inputs, FINE_INPUTS, staging / "ranker.onnx")
        coarse_diff = export_onnx(coarse, (validation_inputs[-1],), COARSE_INPUTS, staging / "coarse.onnx")
        if max(fine_diff, coarse_diff) > 1e-4:
            raise RuntimeError(f"ONNX export differs from PyTorch by {max(fine_diff, coarse_diff)}")
        fixture = scale_fixture(users, columns, validation_rows, validation_inputs, fine, coarse)
        (staging / "ranker_fixture.json").write_text(json.dumps(fixture))
        timings["rankers_seconds"] = round(time.monotonic() - phase, 1)
        log(f"rankers trained and exported in {timings['rankers_seconds']} s: " +
            ", ".join(f"{k} {v:.4f}" for k, v in ranker_metrics.items()))
        metrics |= {k: round(v, 6) for k, v in ranker_metrics.items()} | {"onnx_max_abs_diff": max(fine_diff, coarse_diff)}
        manifest["feature_config"] = features.to_json()

    bundle.write_embeddings(staging / bundle.EMBEDDINGS, vectors, None)
    bundle.write_item_to_item(staging / bundle.ITEM_TO_ITEM, rows.offsets, rows.neighbors, rows.weights)
    bundle.write_item_signals(staging / bundle.ITEM_SIGNALS, popularity)
    if index is not None:
        bundle.write_tensors(staging / bundle.ANN_INDEX, ann.bundle_tensors(index, vectors))
        del index
    table = columns.item_table
    genres = table["genres"] or [""] * num_items
    years = table["year"] if table["year"] is not None else np.zeros(num_items, dtype=np.int64)
    stat_lists = {name: values.tolist() for name, values in stats.items()}
    with open(staging / "items.json", "w") as out:
        out.write("[")
        for n, (item_id, title, genre, year) in enumerate(zip(table["id"], table["title"], genres, years.tolist())):
            item = {"id": item_id, "title": title, "genres": [g for g in (genre or "").split("|") if g],
                    "year": int(year), "interactions": int(counts[n])}
            if config.rankers is not None:
                item["stats"] = {name: values[n] for name, values in stat_lists.items()}
            out.write(("," if n else "") + json.dumps(item, separators=(",", ":")))
        out.write("]")
    (staging / "users.json").write_text("[]")
    manifest["metrics"] = {**metrics, **timings, "training_seconds": round(time.monotonic() - started, 1)}
    published = bundle.publish(staging, out_root, version, manifest)
    log(f"published {manifest.get('contents', 'full')} bundle {version} at {published} in "
        f"{time.monotonic() - started:.1f}s")
    return published
