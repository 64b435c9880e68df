"""Publishes a model bundle atomically: everything is written under a temporary name in
the same directory, then renamed into place, then ``current`` is re-pointed with a
rename of a fresh symlink. A service never sees half a bundle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

FORMAT_VERSION = 2


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
