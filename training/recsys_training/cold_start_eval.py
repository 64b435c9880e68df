"""``make eval``'s item cold-start protocol.

On the published split, a seeded tenth of the catalogue loses every training interaction
but keeps its metadata (genres, year) — items just added to the catalogue, as far as the
models can tell. The served top 10 (over the whole catalogue, seen items excluded) of every
test user is scored by recall@10 on the test interactions with those cold items and on the
warm ones, with the cold-start machinery on (as shipped) and off (recall's cold-start
channel given no quota), so that lifting cold items at the expense of warm ones shows as
``warm_recall_drop`` (warm recall@10 with the machinery off minus on), and what it costs
the request path as ``serving_cost_ratio`` (mean Recommend latency on ÷ off, same run).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import Interaction, load_dataset
from .evaluation import stratified_split

COLD_SHARE = 0.1
K = 10
# The cold-start machinery off: recall's cold-start channel proposes nothing.
MACHINERY_OFF = {"RECSYS_RECALL__CHANNELS__COLD_START__QUOTA": "0"}


def cold_items(item_ids: list[str], share: float = COLD_SHARE, seed: int = 42) -> set[str]:
    """A seeded `share` of the items (at least one)."""
    ordered = sorted(item_ids)
    count = max(1, round(len(ordered) * share))
    chosen = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return {ordered[n] for n in chosen}


def recall_at_k(relevant: dict[str, set[str]], recommended: dict[str, list[str]], k: int = K) -> float:
    """Mean over users with relevant items of the share of them in the user's top k."""
    users = [user for user, items in relevant.items() if items and user in recommended]
    if not users:
        return 0.0
    return sum(len(set(recommended[user][:k]) & relevant[user]) / len(relevant[user]) for user in users) / len(users)


def split_relevance(test: list[Interaction], cold: set[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    cold_relevant: dict[str, set[str]] = {}
    warm_relevant: dict[str, set[str]] = {}
    for row in test:
        target = cold_relevant if row.item_id in cold else warm_relevant
        target.setdefault(row.user_id, set()).add(row.item_id)
    return cold_relevant, warm_relevant


def cold_start_protocol(data_dir: Path, work: Path, bin_dir: Path, config) -> dict:
    # Imported here: serving_eval imports this module.
    from .serving_eval import serve_and_collect, write_training_dir
    from .train import train_bundle

    dataset = load_dataset(data_dir)
    train, test = stratified_split(dataset.interactions, ratio=0.75, filter_by="item", seed=42)
    cold = cold_items([item.item_id for item in dataset.items])
    train = [row for row in train if row.item_id not in cold]
    train_dir = work / "train"
    write_training_dir(train, data_dir, train_dir)
    cold_relevant, warm_relevant = split_relevance(test, cold)
    print(f"[eval] item cold start: {len(cold)} items without training interactions; "
          f"{sum(map(len, cold_relevant.values()))} cold and {sum(map(len, warm_relevant.values()))} warm test "
          f"interactions", flush=True)
    bundles = work / "bundles"
    train_bundle(train_dir, bundles, config, version="eval-cold-start")
    users_file = work / "users.txt"
    users_file.write_text("\n".join(sorted(set(cold_relevant) | set(warm_relevant))) + "\n")
    served, latency = {}, {}
    for mode, settings in (("on", {}), ("off", MACHINERY_OFF)):
        answers = serve_and_collect(bin_dir, bundles, train_dir, users_file, work / f"predictions-{mode}.jsonl", False,
                                    settings=settings)
        served[mode] = {answer["user_id"]: answer["items"] for answer in answers}
        latency[mode] = float(np.mean([answer["latency_ms"] for answer in answers]))
    result = {
        "cold_items": len(cold),
        "cold_recall@10": round(recall_at_k(cold_relevant, served["on"]), 6),
        "warm_recall@10": round(recall_at_k(warm_relevant, served["on"]), 6),
        "cold_recall@10_machinery_off": round(recall_at_k(cold_relevant, served["off"]), 6),
        "warm_recall@10_machinery_off": round(recall_at_k(warm_relevant, served["off"]), 6),
        "cold_users": len(cold_relevant),
        "warm_users": len(warm_relevant),
    }
    result["warm_recall_drop"] = round(result["warm_recall@10_machinery_off"] - result["warm_recall@10"], 6)
    # What the machinery costs the request path: mean Recommend latency on ÷ off.
    result["mean_latency_ms"] = {mode: round(value, 3) for mode, value in latency.items()}
    result["serving_cost_ratio"] = round(latency["on"] / latency["off"], 4)
    (work / "cold_start.json").write_text(json.dumps(result, indent=2))
    return result
