"""``make eval``: the published MovieLens-100k protocol applied to the *served* pipeline.

Splits the data (see ``evaluation.stratified_split``), trains a bundle on the training
part only, starts the cluster on that bundle with the feature store seeded from the
training part (so seen items are excluded the way serving excludes them), asks the
orchestrator over gRPC for every test user's top 10 (``recsys-eval``), and scores the
answers; the same run records every pipeline step's top 10 for the ablation. A second
run with the same seed (retrained from scratch) checks reproducibility. Prints the
tables next to the published rows, writes the JSON report and the ablation chart.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from .data import load_dataset
from .evaluation import ranking_metrics, stratified_split
from .cold_start_eval import cold_start_protocol
from .temporal_eval import temporal_protocol
from .train import TrainConfig, train_bundle

# Microsoft Recommenders README, "Algorithm comparison", MovieLens-100k, top 10.
PUBLISHED = {
    "BPR": {"map": 0.132, "ndcg@10": 0.442, "precision@10": 0.388, "recall@10": 0.213},
    "BiVAE": {"ndcg@10": 0.475},
    "LightGCN": {"ndcg@10": 0.420},
    "NCF": {"ndcg@10": 0.396},
    "SAR": {"ndcg@10": 0.382},
}


def write_training_dir(train: list, data_dir: Path, train_dir: Path) -> None:
    """The training part of a split as a data directory (item and user tables copied whole,
    so the bundle and the feature store know every item and user)."""
    train_dir.mkdir(parents=True, exist_ok=True)
    with open(train_dir / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "event", "rating"])
        for row in train:
            writer.writerow([row.user_id, row.item_id, row.timestamp, row.event, row.rating])
    for name in ("items.csv", "users.csv"):
        if (data_dir / name).exists():
            (train_dir / name).write_bytes((data_dir / name).read_bytes())


def relevant_items(test: list) -> dict[str, set[str]]:
    relevant: dict[str, set[str]] = {}
    for row in test:
        relevant.setdefault(row.user_id, set()).add(row.item_id)
    return relevant


def write_split(data_dir: Path, work: Path) -> tuple[Path, dict[str, set[str]]]:
    dataset = load_dataset(data_dir)
    train, test = stratified_split(dataset.interactions, ratio=0.75, filter_by="item", seed=42)
    train_dir = work / "train"
    write_training_dir(train, data_dir, train_dir)
    relevant = relevant_items(test)
    print(f"[eval] split: {len(train)} training and {len(test)} test interactions, {len(relevant)} test users", flush=True)
    return train_dir, relevant


METRIC_KEYS = ("ndcg@10", "map", "precision@10", "recall@10")
# Ablation steps in pipeline order; "+rerank" is the served answer.
ABLATION_STEPS = ("recall:embedding", "recall:item_cf", "recall:realtime", "recall:popular", "recall:cold_start",
                  "recall:sequence",
                  "recall:fused", "+coarse", "+fine", "+rerank")
REPRODUCIBILITY_TOLERANCE = 0.005


# The models serving runs per request for quality beyond the original pipeline: the
# sequence encoder and the cold-start machinery (recall-svc). With both off, the request
# path is the one before them (the bundle's attribute crosses stay: a few additions per
# candidate in rank-svc).
NEW_MODELS_OFF = {"RECSYS_RECALL__CHANNELS__SEQUENCE__QUOTA": "0",
                  "RECSYS_RECALL__CHANNELS__COLD_START__QUOTA": "0"}


def serving_cost(work: Path, bin_dir: Path, train_dir: Path, rounds: int = 4) -> dict:
    """Mean `Recommend` latency of the first run's bundle with the new models on ÷ off,
    served alternately `rounds` times each so that drift of a shared machine falls on both.
    Each round is ~943 requests (seconds); with 2 rounds the ratio of one bundle measured
    1.150 and 1.307 on two occasions, so more rounds buy a steadier figure cheaply."""
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    for round_ in range(rounds):
        for mode, settings in (("on", {}), ("off", NEW_MODELS_OFF)):
            answers = serve_and_collect(bin_dir, work / "bundles-eval-run1", train_dir, work / "users.txt",
                                        work / f"predictions-cost-{mode}-{round_}.jsonl", False, settings=settings)
            latencies[mode].extend(answer["latency_ms"] for answer in answers)
    mean = {mode: float(np.mean(values)) for mode, values in latencies.items()}
    return {"mean_latency_ms": {mode: round(value, 3) for mode, value in mean.items()},
            "serving_cost_ratio": round(mean["on"] / mean["off"], 4), "models": sorted(NEW_MODELS_OFF)}


def serve_and_collect(bin_dir: Path, bundles: Path, train_dir: Path, users_file: Path, out: Path, ablation: bool,
                      fine_variant: str = "teacher", rules: Path | None = None,
                      settings: dict[str, str] | None = None) -> list[dict]:
    command = [str(bin_dir / "recsys-eval"), "--bin-dir", str(bin_dir), "--bundle", str(bundles), "--seed", str(train_dir),
               "--users", str(users_file), "--out", str(out)]
    # The services read their configuration from the environment (RECSYS_RANK__SECTION__KEY);
    # rerank-svc serves deploy/rerank/rules.toml unless told another rules file. `settings`
    # adds more (e.g. a recall channel's quota).
    env = {**os.environ, "RECSYS_RANK__MODELS__FINE_VARIANT": fine_variant, **(settings or {})}
    if rules is not None:
        env["RECSYS_RERANK__RULES"] = str(rules)
    subprocess.run(command + (["--ablation"] if ablation else []), check=True, env=env)
    return [json.loads(line) for line in out.read_text().splitlines()]


def score(relevant: dict[str, set[str]], answers: list[dict], step: str | None = None) -> tuple[dict, tuple[float, float]]:
    if step is None or step == "+rerank":
        recommended = {a["user_id"]: a["items"] for a in answers}
    else:
        recommended = {a["user_id"]: a["ablation"][step] for a in answers}
    metrics = ranking_metrics(relevant, recommended, k=10)
    report = metrics.as_report(10)
    return {key: round(report[key], 6) for key in METRIC_KEYS}, metrics.ndcg_ci95()


def beyond_accuracy(lists: list[list[str]], train_dir: Path) -> dict:
    """Catalogue coverage of the lists, intra-list genre diversity (mean pairwise 1 - cosine
    of genre sets) and novelty (mean self-information -log2 of the share of training users
    who interacted with an item, smoothed (n + 1) / (users + 1))."""
    dataset = load_dataset(train_dir)
    genres = {item.item_id: set(item.genres) for item in dataset.items}
    users: dict[str, set[str]] = {}
    for row in dataset.interactions:
        users.setdefault(row.item_id, set()).add(row.user_id)
    user_count = len({row.user_id for row in dataset.interactions})
    shown = {item for items in lists for item in items}
    dissimilarities = []
    for items in lists:
        pairs = [(a, b) for i, a in enumerate(items) for b in items[i + 1:]]
        if not pairs:
            continue
        total = 0.0
        for a, b in pairs:
            ga, gb = genres.get(a, set()), genres.get(b, set())
            cosine = len(ga & gb) / math.sqrt(len(ga) * len(gb)) if ga and gb else 0.0
            total += 1.0 - cosine
        dissimilarities.append(total / len(pairs))
    information = [-math.log2((len(users.get(item, ())) + 1) / (user_count + 1)) for items in lists for item in items]
    return {
        "coverage": round(len(shown) / max(len(genres), 1), 6),
        "diversity": round(sum(dissimilarities) / max(len(dissimilarities), 1), 6),
        "novelty": round(sum(information) / max(len(information), 1), 6),
    }


def catalogue_coverage(answers: list[dict], catalogue_size: int) -> float:
    """Share of the catalogue recommended to at least one user."""
    shown = {item for answer in answers for item in answer["items"]}
    return len(shown) / max(catalogue_size, 1)


def rules_effect(work: Path, bin_dir: Path, train_dir: Path, relevant, with_rules: list[dict]) -> dict:
    """The default business rules' cost and effect: the first run (served with
    deploy/rerank/rules.toml) against the same bundle served with an empty rules file."""
    no_rules = work / "no-rules.toml"
    no_rules.write_text("# no business rules: the catalogue's availability and MMR only\n")
    without = serve_and_collect(bin_dir, work / "bundles-eval-run1", train_dir, work / "users.txt",
                                work / "predictions-without-rules.jsonl", False, rules=no_rules)
    with open(train_dir / "items.csv") as f:
        catalogue_size = sum(1 for _ in csv.DictReader(f))
    return {
        "ndcg@10_without_rules": score(relevant, without)[0]["ndcg@10"],
        "ndcg@10_with_rules": score(relevant, with_rules)[0]["ndcg@10"],
        "coverage_without_rules": round(catalogue_coverage(without, catalogue_size), 6),
        "coverage_with_rules": round(catalogue_coverage(with_rules, catalogue_size), 6),
    }


def one_run(work: Path, bin_dir: Path, config: TrainConfig, name: str, ablation: bool, relevant, train_dir: Path) -> dict:
    bundles = work / f"bundles-{name}"
    published = train_bundle(train_dir, bundles, config, version=name)
    manifest = json.loads((published / "manifest.json").read_text())
    users_file = work / "users.txt"
    users_file.write_text("\n".join(sorted(relevant)) + "\n")
    answers = serve_and_collect(bin_dir, bundles, train_dir, users_file, work / f"predictions-{name}.jsonl", ablation)
    served, _ = score(relevant, answers)
    result = {"metrics": served, "users": len(answers), "model_version": manifest["version"], "answers": answers,
              "ranker_auc": {k: manifest["metrics"][k] for k in ("coarse_auc", "fine_auc", "coarse_auc_recall_candidates",
                                                                  "fine_auc_recall_candidates")},
              "fine_model": manifest["feature_config"]["fine_model"],
              "feature_selection": manifest.get("feature_selection")}
    if ablation:
        result["ablation"] = {}
        for step in ABLATION_STEPS:
            metrics, (low, high) = score(relevant, answers, step)
            result["ablation"][step] = {**metrics, "ndcg@10_ci95": [round(low, 6), round(high, 6)]}
    return result


def print_table(result: dict) -> None:
    print()
    print(f"{'pipeline step':<24} {'MAP':>7} {'nDCG@10':>8} {'P@10':>7} {'R@10':>7}")
    for step, row in result["ablation"].items():
        print(f"{step:<24} {row['map']:>7.3f} {row['ndcg@10']:>8.3f} {row['precision@10']:>7.3f} {row['recall@10']:>7.3f}")
    print()
    print(f"{'model':<24} {'MAP':>7} {'nDCG@10':>8} {'P@10':>7} {'R@10':>7}")
    print(f"{'recsys (served)':<24} {result['map']:>7.3f} {result['ndcg@10']:>8.3f} {result['precision@10']:>7.3f} {result['recall@10']:>7.3f}")
    for name, row in PUBLISHED.items():
        cells = [f"{row[k]:.3f}" if k in row else "-" for k in ("map", "ndcg@10", "precision@10", "recall@10")]
        print(f"{name + ' (published)':<24} {cells[0]:>7} {cells[1]:>8} {cells[2]:>7} {cells[3]:>7}")
    auc = result["ranker_auc"]
    print(f"\nranker AUC on held-out interactions vs sampled negatives: coarse {auc['coarse_auc']:.4f}, "
          f"fine ({result['fine_model']}) {auc['fine_auc']:.4f}")
    sparse = result["sparse_item_to_item"]
    print(f"served with the sparse item-to-item method alone (no EASE head): nDCG@10 {sparse['ndcg@10']:.3f}, "
          f"MAP {sparse['map']:.3f}, P@10 {sparse['precision@10']:.3f}, R@10 {sparse['recall@10']:.3f}")
    for variant, row in result["fine_variants"].items():
        print(f"fine model {variant:<8} served nDCG@10 {row['ndcg@10']:.4f} "
              f"({row.get('ndcg@10_delta', 0.0):+.4f}), held-out AUC {row['auc']:.4f} ({row.get('auc_delta', 0.0):+.4f})")
    crosses = result["feature_crosses"]
    check = (f"; the fine model's AUC on held-out candidates {crosses['fine_auc_recall_candidates_with']:.4f} with "
             f"them, {crosses['fine_auc_recall_candidates_without']:.4f} without"
             if "fine_auc_recall_candidates_with" in crosses else "")
    print(f"automated feature crosses: the probe kept {', '.join(crosses['kept']) or 'none'}{check}; shipped "
          f"{', '.join(crosses.get('shipped', crosses['kept'])) or 'none'}; served nDCG@10 "
          f"{crosses['ndcg@10_with']:.4f}, {crosses['ndcg@10_without']:.4f} trained without crosses "
          f"({crosses['ndcg@10_lift']:+.4f})")
    for row in crosses.get("candidates", []):
        print(f"  {row['name']:<24} held-out log-loss gain {row['held_out_log_loss_gain']:+.5f}, "
              f"mutual information {row['mutual_information']:.5f}")
    rules = result["rerank_rules"]
    print(f"default business rules (deploy/rerank/rules.toml): nDCG@10 {rules['ndcg@10_without_rules']:.4f} without, "
          f"{rules['ndcg@10_with_rules']:.4f} with; catalogue coverage {rules['coverage_without_rules']:.4f} without, "
          f"{rules['coverage_with_rules']:.4f} with")
    beyond, plain = result["beyond_accuracy"], result["beyond_accuracy"]["without_rerank"]
    print(f"beyond accuracy (served / before rerank): coverage {beyond['coverage']:.4f} / {plain['coverage']:.4f}, "
          f"intra-list genre diversity {beyond['diversity']:.4f} / {plain['diversity']:.4f}, "
          f"novelty {beyond['novelty']:.3f} / {plain['novelty']:.3f} bits")
    print(f"served nDCG@10 minus the best single channel's ({result['best_channel']}): "
          f"{result['fine_lift_over_best_channel']:+.4f}")
    temporal = result["temporal"]
    print(f"temporal split (last 20% of interactions by time): served nDCG@10 {temporal['ndcg@10']:.4f}, "
          f"R@10 {temporal['recall@10']:.4f}; EASE with popularity fallback {temporal['ease_ndcg@10']:.4f} "
          f"(ratio {temporal['ratio_vs_ease']:.3f}); users with history {temporal['warm_user_ndcg@10']:.4f} "
          f"({temporal['warm_users']}, EASE {temporal['ease_warm_user_ndcg@10']:.4f}), without "
          f"{temporal['new_user_ndcg@10']:.4f} ({temporal['new_users']}, popularity {temporal['ease_new_user_ndcg@10']:.4f})")
    cold = result["cold_start"]
    print(f"item cold start ({cold['cold_items']} items without training interactions): recall@10 on them "
          f"{cold['cold_recall@10']:.4f} ({cold['cold_recall@10_machinery_off']:.4f} with the cold-start channel off), "
          f"on warm items {cold['warm_recall@10']:.4f} ({cold['warm_recall@10_machinery_off']:.4f} off; "
          f"drop {cold['warm_recall_drop']:+.4f}); mean Recommend latency {cold['mean_latency_ms']['on']:.2f} ms on, "
          f"{cold['mean_latency_ms']['off']:.2f} ms off (ratio {cold['serving_cost_ratio']:.3f})")
    cost = result["serving_cost"]
    print(f"serving cost of the new request-time models (sequence encoder, cold-start machinery): mean Recommend "
          f"latency {cost['mean_latency_ms']['on']:.2f} ms on, {cost['mean_latency_ms']['off']:.2f} ms off "
          f"(serving_cost_ratio {result['serving_cost_ratio']:.3f})")
    repro = result["reproducibility"]
    print(f"reproducibility: {repro['runs']} runs with seed {repro['seed']}, largest metric difference "
          f"{repro['max_abs_difference']:.4f} (tolerance {REPRODUCIBILITY_TOLERANCE})")


def run(data_dir: Path, work: Path, bin_dir: Path, report: Path, seed: int = 42, runs: int = 2,
        feature_config: str = "") -> dict:
    started = time.monotonic()
    train_dir, relevant = write_split(data_dir, work)
    config = TrainConfig(seed=seed, feature_config=feature_config)
    results = [one_run(work, bin_dir, config, f"eval-run{n + 1}", n == 0, relevant, train_dir) for n in range(max(runs, 1))]
    first = results[0]
    # The item-to-item model's sparse method alone (co-occurrence for every item, no EASE
    # head): what a catalogue too large for EASE gets, measured where EASE is the reference.
    sparse_config = TrainConfig(seed=seed, feature_config=feature_config, item_cf_head_items=0)
    sparse = one_run(work, bin_dir, sparse_config, "eval-sparse-item-to-item", False, relevant, train_dir)
    # The smaller fine models the first run's bundle ships, served in the teacher's place.
    manifest = json.loads((work / "bundles-eval-run1" / "current" / "manifest.json").read_text())["metrics"]
    fine_variants = {"teacher": {"ndcg@10": first["metrics"]["ndcg@10"], "auc": manifest["teacher_onnx_auc"]}}
    for variant in ("int8", "student"):
        answers = serve_and_collect(bin_dir, work / "bundles-eval-run1", train_dir, work / "users.txt",
                                    work / f"predictions-{variant}.jsonl", False, variant)
        served, _ = score(relevant, answers)
        fine_variants[variant] = {"ndcg@10": served["ndcg@10"], "auc": manifest[f"{variant}_auc"],
                                  "ndcg@10_delta": round(served["ndcg@10"] - first["metrics"]["ndcg@10"], 6),
                                  "auc_delta": manifest[f"{variant}_auc_delta"]}
    # What the automated feature crosses add: the same pipeline trained without them.
    without_crosses = one_run(work, bin_dir, TrainConfig(seed=seed, feature_config=feature_config,
                                                         feature_crosses=False),
                              "eval-without-crosses", False, relevant, train_dir)
    feature_crosses = {
        **(first["feature_selection"] or {"kept": []}),
        "ndcg@10_with": first["metrics"]["ndcg@10"], "ndcg@10_without": without_crosses["metrics"]["ndcg@10"],
        "ndcg@10_lift": round(first["metrics"]["ndcg@10"] - without_crosses["metrics"]["ndcg@10"], 6),
        # The pipeline trained without crosses: its fine AUC on held-out candidates.
        "fine_auc_recall_candidates_trained_without": without_crosses["ranker_auc"]["fine_auc_recall_candidates"],
    }
    rerank_rules = rules_effect(work, bin_dir, train_dir, relevant, first["answers"])
    cost = serving_cost(work, bin_dir, train_dir)
    temporal = temporal_protocol(data_dir, work / "temporal", bin_dir, config)
    cold_start = cold_start_protocol(data_dir, work / "cold-start", bin_dir, config)
    # Beyond accuracy, of the served lists and of the same requests' ranked lists before
    # rerank (the ablation's "+fine" step: no MMR, no rules).
    served_lists = [answer["items"] for answer in first["answers"]]
    before_rerank = [answer["ablation"]["+fine"] for answer in first["answers"]]
    beyond = {**beyond_accuracy(served_lists, train_dir),
              "without_rerank": beyond_accuracy(before_rerank, train_dir)}
    channels = [step for step in ABLATION_STEPS if step.startswith("recall:") and step != "recall:fused"]
    best_channel = max(channels, key=lambda step: first["ablation"][step]["ndcg@10"])
    fine_lift = round(first["metrics"]["ndcg@10"] - first["ablation"][best_channel]["ndcg@10"], 6)
    differences = [abs(r["metrics"][k] - first["metrics"][k]) for r in results[1:] for k in METRIC_KEYS]
    max_difference = round(max(differences, default=0.0), 6)
    result = {
        **first["metrics"],
        "users": first["users"],
        "protocol": "python_stratified_split ratio=0.75 filter_by=item seed=42, k=10",
        "ablation": first["ablation"],
        "ranker_auc": first["ranker_auc"],
        "fine_model": first["fine_model"],
        "sparse_item_to_item": {**sparse["metrics"], "ranker_auc": sparse["ranker_auc"]},
        "fine_variants": fine_variants,
        "rerank_rules": rerank_rules,
        "feature_crosses": feature_crosses,
        "beyond_accuracy": beyond,
        "fine_lift_over_best_channel": fine_lift,
        "best_channel": best_channel,
        "temporal": temporal,
        "cold_start": cold_start,
        "serving_cost_ratio": cost["serving_cost_ratio"],
        "serving_cost": cost,
        "reproducibility": {
            "runs": len(results), "seed": seed, "metrics": [r["metrics"] for r in results],
            "max_abs_difference": max_difference, "tolerance": REPRODUCIBILITY_TOLERANCE,
            "within_tolerance": max_difference <= REPRODUCIBILITY_TOLERANCE,
        },
        "targets": {"ndcg@10": 0.45, "recall@10": 0.22},
        "published": PUBLISHED,
        "seconds": round(time.monotonic() - started, 1),
    }
    print_table(result)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    chart = report.with_name(report.stem + "-ablation.png")
    subprocess.run([str(bin_dir / "recsysctl"), "eval-chart", "--report", str(report), "--out", str(chart)], check=True)
    print(f"\n[eval] report written to {report}, ablation chart to {chart}")
    return result
