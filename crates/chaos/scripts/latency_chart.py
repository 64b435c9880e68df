"""Draws `make bench`'s latency chart from the latencies `bench-path` wrote.

    python latency_chart.py --latencies target/bench/latencies.json --out target/reports/bench-latency.png

Left: latency by percentile for each data set — the compute floor (in-process), one client
in a closed loop, and the open loop at half the peak rate. Right: the peak search, p99 by
offered rate, against the deadline.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PERCENTILES = np.concatenate([np.linspace(0, 90, 91), np.linspace(90.1, 99.9, 99)])
RUNS = [("floor", "compute floor", ":"), ("closed_loop", "closed loop, 1 client", "-"), ("half_peak", "open loop, ½ peak", "--")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latencies", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--deadline-ms", type=float, default=50.0)
    args = parser.parse_args()
    data = json.loads(args.latencies.read_text())

    figure, (by_percentile, by_rate) = plt.subplots(1, 2, figsize=(13, 5))
    colours = dict(zip(sorted(data), ["tab:blue", "tab:orange", "tab:green"]))
    for name, runs in sorted(data.items()):
        for key, label, style in RUNS:
            values = np.asarray(runs[key], dtype=float)
            if values.size:
                by_percentile.plot(PERCENTILES, np.percentile(values, PERCENTILES), style, color=colours[name],
                                   label=f"{name}: {label}")
        steps = runs["peak_search"]
        rates = [s["rate"] for s in steps]
        p99s = [s["p99_ms"] for s in steps]
        by_rate.scatter(rates, p99s, color=colours[name], marker="o", label=f"{name}: p99 per step")
        failed = [(s["rate"], s["p99_ms"]) for s in steps if not s["passed"]]
        if failed:
            by_rate.scatter(*zip(*failed), color=colours[name], marker="x", s=80)
        by_rate.axvline(runs["peak_rps"], color=colours[name], linestyle=":", label=f"{name}: peak {runs['peak_rps']:.0f}/s")
    by_percentile.set(xlabel="percentile", ylabel="Recommend latency (ms)", yscale="log",
                      title="Latency by percentile")
    by_percentile.grid(True, which="both", alpha=0.3)
    by_percentile.legend(fontsize=8)
    by_rate.axhline(args.deadline_ms, color="red", linestyle="--", label=f"deadline {args.deadline_ms:.0f} ms")
    by_rate.set(xlabel="offered rate (requests/s, open loop)", ylabel="p99 (ms)", yscale="log",
                title="Peak search (x: not sustainable)")
    by_rate.grid(True, which="both", alpha=0.3)
    by_rate.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"chart written to {args.out}")


if __name__ == "__main__":
    main()
