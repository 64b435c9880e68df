#!/usr/bin/env bash
# Creates (once) the Python environment for the training pipeline in a cache outside the clone,
# keyed by the hash of training/requirements.txt, and prints its path. Re-runs reuse it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${RECSYS_CACHE:-$HOME/.cache/recsys}
hash=$(sha256sum "$root/training/requirements.txt" | cut -c1-12)
venv="$cache/venv-$hash"
if [ ! -f "$venv/.complete" ]; then
  echo ">> creating Python environment $venv (torch is large: first time only)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/training/requirements.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv"
