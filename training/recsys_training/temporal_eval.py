"""``make eval``'s temporal protocol: the served pipeline on a global time split.

Everything before the time that leaves the last 20% of interactions is training, the rest
is test, as a system deployed at that moment would see it. Every user with a test event is
evaluated; on MovieLens-100k most of them have no training events at all (they joined
after the cut), so users with and without training history are also reported apart. The
baseline on the same split is EASE (Steck, 2019: a closed-form item-item model, the
strongest simple baseline on this data) with the most popular training items for users
without history.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import Interaction, load_dataset
from .evaluation import ranking_metrics

TEST_SHARE = 0.2
EASE_L2 = 500.0
K = 10


def temporal_split(interactions: list[Interaction], test_share: float = TEST_SHARE
                   ) -> tuple[list[Interaction], list[Interaction], int]:
    """Training: interactions strictly before the cut time; test: from it on. The cut is
    the timestamp at the (1 - test_share) quantile of all interactions' times."""
    if not interactions:
        raise ValueError("no interactions to split")
    times = sorted(row.timestamp for row in interactions)
    cut = times[min(int(len(times) * (1.0 - test_share)), len(times) - 1)]
    train = [row for row in interactions if row.timestamp < cut]
    test = [row for row in interactions if row.timestamp >= cut]
    return train, test, cut


def ease_with_popularity(train: list[Interaction], users: list[str], k: int = K, l2: float = EASE_L2
                         ) -> dict[str, list[str]]:
    """Each user's top k unseen items by EASE over their training items, or the k most
    popular training items when they have none."""
    items = sorted({row.item_id for row in train})
    item_index = {item: n for n, item in enumerate(items)}
    histories: dict[str, set[int]] = {}
    for row in train:
        histories.setdefault(row.user_id, set()).add(item_index[row.item_id])
    known = sorted(histories)
    x = np.zeros((len(known), len(items)))
    for n, user in enumerate(known):
        x[n, sorted(histories[user])] = 1.0
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += l2
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)
    weights[np.diag_indices_from(weights)] = 0.0
    popularity = x.sum(axis=0)
    popular = [items[n] for n in np.argsort(-popularity, kind="stable")[:k]]
    row_of = {user: n for n, user in enumerate(known)}
    recommended = {}
    for user in users:
        if user not in row_of:
            recommended[user] = popular
            continue
        scores = x[row_of[user]] @ weights
        scores[sorted(histories[user])] = -np.inf
        recommended[user] = [items[n] for n in np.argsort(-scores, kind="stable")[:k]]
    return recommended


def scores(relevant: dict[str, set[str]], recommended: dict[str, list[str]]) -> dict:
    metrics = ranking_metrics(relevant, recommended, k=K).as_report(K)
    return {key: round(metrics[key], 6) for key in ("ndcg@10", "recall@10")} | {"users": metrics["users"]}


def temporal_protocol(data_dir: Path, work: Path, bin_dir: Path, config) -> dict:
    """Trains a bundle on the temporal training part, serves every test user's top 10 and
    scores it beside EASE with a popularity fallback on the same split."""
    # Imported here: serving_eval imports this module.
    from .serving_eval import relevant_items, serve_and_collect, write_training_dir
    from .train import train_bundle

    dataset = load_dataset(data_dir)
    train, test, cut = temporal_split(dataset.interactions)
    train_dir = work / "train"
    write_training_dir(train, data_dir, train_dir)
    relevant = relevant_items(test)
    with_history = {row.user_id for row in train}
    warm = {user: items for user, items in relevant.items() if user in with_history}
    new = {user: items for user, items in relevant.items() if user not in with_history}
    print(f"[eval] temporal split at {cut}: {len(train)} training and {len(test)} test interactions; "
          f"{len(relevant)} test users, {len(warm)} with training history and {len(new)} without", flush=True)

    bundles = work / "bundles"
    train_bundle(train_dir, bundles, config, version="eval-temporal")
    users_file = work / "users.txt"
    users_file.write_text("\n".join(sorted(relevant)) + "\n")
    answers = serve_and_collect(bin_dir, bundles, train_dir, users_file, work / "predictions.jsonl", False)
    served = {answer["user_id"]: answer["items"] for answer in answers}
    baseline = ease_with_popularity(train, sorted(relevant))

    ease = scores(relevant, baseline)
    result = {
        "cut_timestamp": cut,
        **scores(relevant, served),
        "ease_ndcg@10": ease["ndcg@10"],
        "ease_recall@10": ease["recall@10"],
        "warm_user_ndcg@10": scores(warm, served)["ndcg@10"],
        "new_user_ndcg@10": scores(new, served)["ndcg@10"],
        "ease_warm_user_ndcg@10": scores(warm, baseline)["ndcg@10"],
        "ease_new_user_ndcg@10": scores(new, baseline)["ndcg@10"],
        "warm_users": len(warm),
        "new_users": len(new),
    }
    result["ratio_vs_ease"] = round(result["ndcg@10"] / result["ease_ndcg@10"], 6) if result["ease_ndcg@10"] else 0.0
    (work / "temporal.json").write_text(json.dumps(result, indent=2))
    return result
