"""The raw model time for `make bench-rank`: onnxruntime's own Python session runs the
exact inputs rank-svc built (written by bench-rank), with the served configuration — one
intra-op thread, one inter-op thread, the same batches: the coarse model on every
candidate, then the fine model on the survivors. Each request's time is the sum of its
model runs; arrays are built before timing, so only inference is measured."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime

FINE_INPUTS = ["user_index", "item_index", "history", "user_features", "item_features", "cross_features"]


def session(path: str) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def array(data: bytes, spec: dict) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    count = int(np.prod(spec["shape"]))
    return np.frombuffer(data, dtype=dtype, count=count, offset=spec["offset"]).reshape(spec["shape"])


def measure(case: dict, requests: int) -> dict:
    data = Path(case["data"]).read_bytes()
    coarse, fine = session(case["coarse_model"]), session(case["fine_model"])
    feeds = [({"cross_features": array(data, r["coarse"]["cross_features"])},
              {name: array(data, r["fine"][name]) for name in FINE_INPUTS}) for r in case["requests"]]

    def run(feed) -> float:
        started = time.perf_counter()
        coarse.run(["score"], feed[0])
        fine.run(["score"], feed[1])
        return time.perf_counter() - started

    for feed in feeds:  # warm-up: one pass, as bench-rank does over gRPC
        run(feed)
    times = np.array([run(feeds[n % len(feeds)]) for n in range(requests)]) * 1000.0
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "fine_rows": int(len(feeds[0][1]["item_index"])), "coarse_rows": int(len(feeds[0][0]["cross_features"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {}
    for case in json.loads(args.cases.read_text()):
        results[case["name"]] = measure(case, args.requests)
        r = results[case["name"]]
        print(f"  raw {case['name']:<22} coarse {r['coarse_rows']:>4} + fine {r['fine_rows']:>4} rows: "
              f"p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms", flush=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
