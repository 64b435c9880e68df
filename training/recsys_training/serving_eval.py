"""``make eval``: the published MovieLens-100k protocol applied to the *served* pipeline.

Splits the data (see ``evaluation.stratified_split``), trains a bundle on the training
part only, starts the cluster on that bundle with the feature store seeded from the
training part (so seen items are excluded the way serving excludes them), asks the
orchestrator over gRPC for every test user's top 10 (``recsys-eval``), and scores the
answers. Prints the result next to the published rows and writes the JSON report.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

from .data import load_dataset
from .evaluation import ranking_metrics, stratified_split
from .train import TrainConfig, train_bundle

# Microsoft Recommenders README, "Algorithm comparison", MovieLens-100k, top 10.
PUBLISHED = {
    "BPR": {"map": 0.132, "ndcg@10": 0.442, "precision@10": 0.388, "recall@10": 0.213},
    "BiVAE": {"ndcg@10": 0.475},
    "LightGCN": {"ndcg@10": 0.420},
    "NCF": {"ndcg@10": 0.396},
    "SAR": {"ndcg@10": 0.382},
}


def write_split(data_dir: Path, work: Path) -> tuple[Path, dict[str, set[str]]]:
    dataset = load_dataset(data_dir)
    train, test = stratified_split(dataset.interactions, ratio=0.75, filter_by="item", seed=42)
    train_dir = work / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    with open(train_dir / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "event", "rating"])
        for row in train:
            writer.writerow([row.user_id, row.item_id, row.timestamp, row.event, row.rating])
    for name in ("items.csv", "users.csv"):
        if (data_dir / name).exists():
            (train_dir / name).write_bytes((data_dir / name).read_bytes())
    relevant: dict[str, set[str]] = {}
    for row in test:
        relevant.setdefault(row.user_id, set()).add(row.item_id)
    print(f"[eval] split: {len(train)} training and {len(test)} test interactions, {len(relevant)} test users", flush=True)
    return train_dir, relevant


def run(data_dir: Path, work: Path, bin_dir: Path, report: Path, seed: int = 42) -> dict:
    started = time.monotonic()
    train_dir, relevant = write_split(data_dir, work)
    bundles = work / "bundles"
    train_bundle(train_dir, bundles, TrainConfig(seed=seed), version="eval")
    users_file = work / "users.txt"
    users_file.write_text("\n".join(sorted(relevant)) + "\n")
    predictions_file = work / "predictions.jsonl"
    subprocess.run(
        [str(bin_dir / "recsys-eval"), "--bin-dir", str(bin_dir), "--bundle", str(bundles), "--seed", str(train_dir),
         "--users", str(users_file), "--out", str(predictions_file)],
        check=True,
    )
    recommended = {}
    for line in predictions_file.read_text().splitlines():
        answer = json.loads(line)
        recommended[answer["user_id"]] = answer["items"]
    metrics = ranking_metrics(relevant, recommended, k=10).as_report(10)
    result = {**{key: round(value, 6) for key, value in metrics.items() if key != "users"},
              "users": metrics["users"], "protocol": "python_stratified_split ratio=0.75 filter_by=item seed=42, k=10",
              "seconds": round(time.monotonic() - started, 1), "published": PUBLISHED}
    print()
    print(f"{'model':<22} {'MAP':>7} {'nDCG@10':>8} {'P@10':>7} {'R@10':>7}")
    print(f"{'recsys (served)':<22} {result['map']:>7.3f} {result['ndcg@10']:>8.3f} {result['precision@10']:>7.3f} {result['recall@10']:>7.3f}")
    for name, row in PUBLISHED.items():
        cells = [f"{row[k]:.3f}" if k in row else "-" for k in ("map", "ndcg@10", "precision@10", "recall@10")]
        print(f"{name + ' (published)':<22} {cells[0]:>7} {cells[1]:>8} {cells[2]:>7} {cells[3]:>7}")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    print(f"\n[eval] report written to {report}")
    return result
