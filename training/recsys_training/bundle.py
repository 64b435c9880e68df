"""Writes and publishes model bundles.

Publishing is atomic: everything is written under a temporary name in the same directory,
then renamed into place, then ``current`` is re-pointed with a rename of a fresh symlink.
A service never sees half a bundle.

Arrays whose size grows with the catalogue (vectors, neighbour lists, per-item signals)
are safetensors files: a JSON header naming each tensor's dtype, shape and byte range,
then the raw little-endian data, which the services memory-map in place. Rows are item
positions (the order of ``items.json``), so no reader maps ids to rows but once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

FORMAT_VERSION = 5

EMBEDDINGS = "embeddings.safetensors"
ITEM_TO_ITEM = "item_to_item.safetensors"
ITEM_SIGNALS = "item_signals.safetensors"
ANN_INDEX = "item_index.safetensors"


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file; arrays are stored C-contiguous and little-endian."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, str(path))


def write_embeddings(path: Path, item_vectors: np.ndarray, user_vectors: np.ndarray | None,
                     user_trained: np.ndarray | None = None) -> None:
    """``item_vectors`` [items, dim] f32; ``user_vectors`` [users, dim] f32 when the model
    has a per-user table (a cache: serving derives a user's vector from their history
    otherwise), with ``user_trained`` [users, 2] i64 saying what each row was trained on —
    the user's latest training event time (Unix seconds) and number of training events —
    so that serving moves the vector by the user's later events; ``item_vector_sum`` [dim]
    and ``item_vector_gram`` [dim, dim] f64, Σx and Σxxᵀ, with which rank-svc standardises
    a user's scores over the catalogue without scoring it."""
    vectors = item_vectors.astype("<f4")
    wide = vectors.astype(np.float64)
    tensors = {"item_vectors": vectors, "item_vector_sum": wide.sum(axis=0), "item_vector_gram": wide.T @ wide}
    if user_vectors is not None:
        tensors["user_vectors"] = user_vectors.astype("<f4")
        if user_trained is not None:
            if user_trained.shape != (len(user_vectors), 2):
                raise ValueError(f"user_trained is {user_trained.shape}, not [{len(user_vectors)}, 2]")
            tensors["user_trained"] = user_trained.astype("<i8")
    write_tensors(path, tensors)


def write_item_to_item(path: Path, offsets: np.ndarray, neighbors: np.ndarray, weights: np.ndarray) -> None:
    """Item-to-item weights in compressed sparse rows: item ``i``'s neighbours are
    ``neighbors[offsets[i]:offsets[i + 1]]`` (item positions, strongest weight first)
    with ``weights`` alongside."""
    if len(neighbors) != len(weights) or offsets[-1] != len(neighbors):
        raise ValueError("item-to-item rows do not match their offsets")
    write_tensors(path, {"offsets": offsets.astype("<i8"), "neighbors": neighbors.astype("<u4"),
                         "weights": weights.astype("<f4")})


def write_item_signals(path: Path, popularity: np.ndarray) -> None:
    """Per-item signals by position: ``popularity`` in [0, 1] (the most popular item 1;
    train.py weighs interactions by recency, scale.py counts them)."""
    write_tensors(path, {"popularity": popularity.astype("<f4")})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pipeline_fingerprint() -> str:
    """sha256 over the pipeline's code and the feature configuration: a bundle records it,
    so a checkout whose pipeline changed knows its bundle is stale."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")) + [package.parent / "feature_config.toml"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def staging_dir(out_root: Path, version: str | None, data_sha256: str) -> tuple[str, Path]:
    """(version, an empty directory to write the bundle into before ``publish``); the
    version defaults to the time and the training data's hash."""
    from datetime import datetime, timezone

    out_root.mkdir(parents=True, exist_ok=True)
    version = version or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{data_sha256[:8]}"
    staging = out_root / f".staging-{version}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return version, staging


def publish(staging: Path, out_root: Path, version: str, manifest: dict) -> Path:
    """Adds the file list and checksums to ``manifest``, writes it into ``staging`` and
    moves ``staging`` to ``out_root/version``; returns the published directory."""
    files = {}
    for path in sorted(staging.iterdir()):
        if path.is_file() and path.name != "manifest.json":
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {**manifest, "format": FORMAT_VERSION, "version": version, "files": files,
                "pipeline_sha256": pipeline_fingerprint()}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    final = out_root / version
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    link_tmp = out_root / f".current-{version}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(version, link_tmp)
    os.replace(link_tmp, out_root / "current")
    return final


def verify(bundle_dir: Path) -> list[str]:
    """Problems found in a bundle (empty when it is intact)."""
    manifest_path = bundle_dir / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    for name, entry in manifest.get("files", {}).items():
        path = bundle_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: checksum mismatch")
    return problems
