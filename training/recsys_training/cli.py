"""Command line of the training pipeline: ``python -m recsys_training <command>``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .bundle import verify
from .data import DataError, convert_movielens, fetch_movielens
from .train import TrainConfig, train_bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys_training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-movielens", help="download MovieLens-100k and convert it to the project's format")
    prepare.add_argument("--out", type=Path, required=True)
    prepare.add_argument("--cache", type=Path, default=Path(os.environ.get("RECSYS_CACHE", Path.home() / ".cache/recsys")))

    train = commands.add_parser("train", help="train every model and publish a bundle")
    train.add_argument("--data", type=Path, required=True)
    train.add_argument("--out", type=Path, required=True, help="bundle root; the bundle lands in OUT/<version> and OUT/current")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--version", help="bundle version (default: timestamp and data hash)")
    train.add_argument("--quick", action="store_true", help="few epochs, for tests")
    train.add_argument("--feature-config", type=Path, help="feature configuration (default: training/feature_config.toml)")

    retrieval = commands.add_parser(
        "train-scale", help="train every model at catalogue scale (columnar, sparse) and publish a bundle")
    retrieval.add_argument("--data", type=Path, required=True)
    retrieval.add_argument("--out", type=Path, required=True)
    retrieval.add_argument("--seed", type=int, default=42)
    retrieval.add_argument("--version")
    retrieval.add_argument("--epochs", type=int, default=1)
    retrieval.add_argument("--ann-min-items", type=int, default=50_000,
                           help="catalogues at least this large get an HNSW index")
    retrieval.add_argument("--ann-connectivity", type=int, default=32, help="HNSW M")
    retrieval.add_argument("--ann-expansion-add", type=int, default=200, help="HNSW efConstruction")
    retrieval.add_argument("--retrieval-only", action="store_true",
                           help="no rankers: a bundle recall-svc serves and rank-svc refuses")
    retrieval.add_argument("--ranker-users", type=int, default=30_000, help="users whose held-out item trains the rankers")
    retrieval.add_argument("--feature-config", type=Path, help="feature configuration (default: training/feature_config.toml)")

    evaluate = commands.add_parser("eval", help="score the served pipeline on the published MovieLens-100k protocol")
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--work", type=Path, default=Path("target/eval"))
    evaluate.add_argument("--bin-dir", type=Path, default=Path("target/debug"))
    evaluate.add_argument("--report", type=Path, default=Path("target/reports/eval-ml100k.json"))
    evaluate.add_argument("--feature-config", type=Path, help="feature configuration (default: training/feature_config.toml)")
    evaluate.add_argument("--runs", type=int, default=2, help="seeded runs (the second checks reproducibility)")

    synth = commands.add_parser("synthesize", help="write synthetic data of any size in the project's format (Parquet)")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--items", type=int, default=100_000)
    synth.add_argument("--users", type=int, default=200_000)
    synth.add_argument("--interactions", type=int, default=2_000_000)
    synth.add_argument("--clusters", type=int, default=200, help="taste clusters of items and users")
    synth.add_argument("--seed", type=int, default=42)

    scale_eval = commands.add_parser(
        "eval-scale", help="hit rate@100 of the served pipeline on a catalogue-scale bundle's held-out engagements")
    scale_eval.add_argument("--data", type=Path, required=True)
    scale_eval.add_argument("--bundles", type=Path, required=True)
    scale_eval.add_argument("--bin-dir", type=Path, default=Path("target/debug"))
    scale_eval.add_argument("--work", type=Path, default=Path("target/eval-scale"))
    scale_eval.add_argument("--users", type=int, default=2_000)
    scale_eval.add_argument("--report", type=Path, default=Path("target/reports/eval-scale.json"))

    seed_sample = commands.add_parser(
        "seed-sample", help="a feature-store seed of held-out users of a catalogue-scale data set (make run DATASET=synthetic)")
    seed_sample.add_argument("--data", type=Path, required=True)
    seed_sample.add_argument("--out", type=Path, required=True)
    seed_sample.add_argument("--users", type=int, default=1_000)

    merge = commands.add_parser(
        "merge-events", help="seed data plus feature-svc's event log, as a data directory to train the next bundle from")
    merge.add_argument("--data", type=Path, required=True, help="the seed data directory (CSV)")
    merge.add_argument("--events", type=Path, required=True, help="feature-svc's event log (feature-events.jsonl)")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--include-impressions", action="store_true")

    fresh = commands.add_parser("up-to-date", help="exit 0 when BUNDLE was trained by this pipeline code and feature configuration")
    fresh.add_argument("bundle", type=Path)
    fresh.add_argument("--format-only", action="store_true",
                       help="only ask that the bundle be in the format the services read (for bundles that take long to train)")

    check = commands.add_parser("verify", help="check a bundle's files against its manifest")
    check.add_argument("bundle", type=Path)

    args = parser.parse_args(argv)
    try:
        if args.command == "prepare-movielens":
            if (args.out / "interactions.csv").is_file():
                print(f"[data] {args.out} already prepared")
                return 0
            raw = fetch_movielens(args.cache)
            convert_movielens(raw, args.out)
            print(f"[data] MovieLens-100k written to {args.out}")
        elif args.command == "merge-events":
            from .feedback import merge_events
            merged = merge_events(args.data, args.events, args.out, args.include_impressions)
            print(f"[feedback] {args.out}: {merged.seed_interactions} seed interactions + {merged.logged_events} logged "
                  f"events ({merged.unknown_items} for unknown items, {merged.impressions} impressions, "
                  f"{merged.duplicates} repeated ids, {merged.unreadable_lines} torn lines left out)")
        elif args.command == "train":
            config = TrainConfig(seed=args.seed, feature_config=str(args.feature_config or ""))
            if args.quick:
                config.bpr_epochs, config.graph_epochs, config.ranker_epochs = 3, 3, 1
                config.sequence_epochs = config.student_epochs = config.ranker_folds = 1
            train_bundle(args.data, args.out, config, args.version)
        elif args.command == "train-scale":
            from .scale import ScaleConfig, train_scale_bundle
            from .scale_rankers import RankerScaleConfig

            rankers = None if args.retrieval_only else RankerScaleConfig(training_users=args.ranker_users)
            config = ScaleConfig(seed=args.seed, epochs=args.epochs, ann_min_items=args.ann_min_items,
                                 ann_connectivity=args.ann_connectivity, ann_expansion_add=args.ann_expansion_add,
                                 rankers=rankers, feature_config=str(args.feature_config or ""))
            train_scale_bundle(args.data, args.out, config, args.version)
        elif args.command == "synthesize":
            from .synthetic import SyntheticConfig, generate

            config = SyntheticConfig(
                items=args.items, users=args.users, interactions=args.interactions, clusters=args.clusters, seed=args.seed
            )
            try:
                config.validate()
            except ValueError as error:  # sizes that cannot make a data set
                print(f"error: {error}", file=sys.stderr)
                return 2
            summary = generate(config, args.out)
            print(f"[synth] {summary['interactions']:,} interactions of {summary['users']:,} users over "
                  f"{summary['items']:,} items written to {args.out} in {summary['seconds']} s")
        elif args.command == "eval":
            from .serving_eval import run
            run(args.data, args.work, args.bin_dir, args.report, runs=args.runs,
                feature_config=str(args.feature_config or ""))
        elif args.command == "eval-scale":
            from .scale_eval import run as run_scale_eval
            run_scale_eval(args.data, args.bundles, args.bin_dir, args.work, args.report, users=args.users)
        elif args.command == "seed-sample":
            from .scale_eval import seed_evaluation_users
            if (args.out / "users.txt").is_file():
                print(f"[data] {args.out} already seeded")
                return 0
            seed_evaluation_users(args.data, args.out, args.users)
            print(f"[data] {args.users} users' histories written to {args.out}")
        elif args.command == "up-to-date":
            import json

            from .bundle import FORMAT_VERSION, pipeline_fingerprint
            manifest = args.bundle / "manifest.json"
            if not manifest.is_file():
                return 1
            written = json.loads(manifest.read_text())
            if written.get("format") != FORMAT_VERSION:
                print(f"    {args.bundle} is in bundle format {written.get('format')}, not {FORMAT_VERSION}: retraining")
                return 1
            if not args.format_only and written.get("pipeline_sha256") != pipeline_fingerprint():
                print(f"    {args.bundle} was trained by other pipeline code: retraining")
                return 1
        elif args.command == "verify":
            problems = verify(args.bundle)
            for problem in problems:
                print(problem)
            return 1 if problems else 0
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
