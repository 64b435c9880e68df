#!/usr/bin/env bash
# Creates (once) a Python environment in a cache outside the clone, keyed by the hash of its
# requirements file, and prints its path. Re-runs reuse it.
# Usage: python-env.sh [REQUIREMENTS]   (default: training/requirements.txt)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${RECSYS_CACHE:-$HOME/.cache/recsys}
requirements=${1:-$root/training/requirements.txt}
hash=$(sha256sum "$requirements" | cut -c1-12)
venv="$cache/venv-$hash"
if [ ! -f "$venv/.complete" ]; then
  echo ">> creating Python environment $venv from $(basename "$requirements") (first time only; torch takes a while)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
  touch "$venv/.complete"
fi
echo "$venv"
