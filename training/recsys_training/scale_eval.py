"""``make eval-scale``: does the served pipeline learn at catalogue scale?

On the synthetic data and its bundle (``train-scale``), each user's last engagement was
held out of every model. For a sample of those users — from the evaluation share that the
rankers never trained on (``scale_rankers.is_evaluation_user``) — this seeds a feature
store with their training history and attributes only, starts the whole cluster on the
bundle (``recsys-eval``, over gRPC; the debug build, with every stage given 2 s since this
measures quality, not latency — ``make bench-recall`` measures that), asks the
orchestrator for each user's top 100 and scores the held-out item: the hit rate@100 of the served answer and of recall's fused
candidates, against the most popular items the user has not seen.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from .scale import hold_out_last, load_columns
from .scale_rankers import Users, is_evaluation_user

K = 100


def write_seed(seed_dir: Path, columns, users: Users, sample_users: np.ndarray) -> None:
    """``interactions.csv`` and ``users.csv`` in the feature store's seed format: the
    sampled users' training engagements, as clicks."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    item_ids, table = columns.item_table["id"], columns.users_table
    with open(seed_dir / "interactions.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["user_id", "item_id", "timestamp", "event"])
        for user in sample_users.tolist():
            items, timestamps = users.history(user)
            for item, timestamp in zip(items[::-1].tolist(), timestamps[::-1].tolist()):
                writer.writerow([table.ids[user], item_ids[item], timestamp, "click"])
    with open(seed_dir / "users.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["user_id", "age", "gender", "occupation"])
        for user in sample_users.tolist():
            writer.writerow([table.ids[user], int(table.age[user]), table.gender[user], table.occupation[user]])


def seed_evaluation_users(data_dir: Path, seed_dir: Path, users: int, seed: int = 7):
    """Samples held-out evaluation users and writes their seed (plus ``users.txt``, their
    ids); returns (columns, training mask, sampled held-out rows, their histories)."""
    columns = load_columns(data_dir)
    train_mask, held = hold_out_last(columns)
    eligible = held[is_evaluation_user(columns.users[held])]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(eligible, min(users, len(eligible)), replace=False))
    history = Users(columns.users[train_mask], columns.items[train_mask], columns.timestamps[train_mask],
                    columns.users_table)
    write_seed(seed_dir, columns, history, columns.users[sample])
    ids = columns.users_table.ids
    (seed_dir / "users.txt").write_text("\n".join(ids[user] for user in columns.users[sample].tolist()) + "\n")
    return columns, train_mask, sample, history


def run(data_dir: Path, bundles: Path, bin_dir: Path, work: Path, report_path: Path, users: int = 2_000,
        seed: int = 7) -> dict:
    started = time.monotonic()
    columns, train_mask, sample, history = seed_evaluation_users(data_dir, work / "seed", users, seed)
    sample_users = columns.users[sample]
    ids = columns.users_table.ids
    print(f"[eval-scale] {len(sample):,} held-out users; starting the cluster on {bundles}", flush=True)
    answers_path = work / "answers.jsonl"
    subprocess.run([str(bin_dir / "recsys-eval"), "--bin-dir", str(bin_dir), "--bundle", str(bundles), "--seed",
                    str(work / "seed"), "--users", str(work / "seed" / "users.txt"), "--out", str(answers_path),
                    "--top-k", str(K), "--ablation", "--stage-budget-ms", "2000"], check=True)
    answers = {a["user_id"]: a for a in map(json.loads, answers_path.read_text().splitlines())}

    item_ids = columns.item_table["id"]
    counts = np.bincount(columns.items[train_mask], minlength=len(item_ids))
    popular = np.argsort(-counts, kind="stable")[:K + 1_000].tolist()
    # The served answer holds as many items as the fine stage keeps (50 by default), so
    # popularity is scored at the same length as well as at 100.
    served = recalled = popular_same_length = popular_at_k = 0
    lengths = []
    for row, user in zip(sample.tolist(), sample_users.tolist()):
        target = item_ids[columns.items[row]]
        answer = answers[ids[user]]
        length = len(answer["items"][:K])
        lengths.append(length)
        served += target in answer["items"][:K]
        recalled += target in answer["ablation"]["recall:fused"][:K]
        seen = set(history.history(user)[0].tolist())
        unseen_popular = [item_ids[i] for i in popular if i not in seen][:K]
        popular_same_length += target in unseen_popular[:length]
        popular_at_k += target in unseen_popular
    count = len(sample)
    report = {
        "users": count,
        "served_answer_length": round(float(np.mean(lengths)), 1),
        "served_hit_rate": round(served / count, 4),
        "popularity_hit_rate_same_length": round(popular_same_length / count, 4),
        "recall_hit_rate_at_100": round(recalled / count, 4),
        "popularity_hit_rate_at_100": round(popular_at_k / count, 4),
    }
    print(f"\nheld-out last engagement found ({count:,} users, {len(item_ids):,} items)")
    print(f"  {'served answer (orchestrator)':<30} {report['served_hit_rate']:.4f} in "
          f"{report['served_answer_length']:.0f} items; most popular unseen, as many: "
          f"{report['popularity_hit_rate_same_length']:.4f}")
    print(f"  {'recall, fused top 100':<30} {report['recall_hit_rate_at_100']:.4f}; most popular unseen top 100: "
          f"{report['popularity_hit_rate_at_100']:.4f}")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    print(f"report written to {report_path} in {time.monotonic() - started:.0f} s")
    return report
