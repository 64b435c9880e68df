# The two commands of the README: `make run` and `make test`. Everything they need is
# fetched from the package registries on first use and cached under ~/.cache/recsys.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
ENV := source target/recsys.env

.PHONY: run test bootstrap build bundle test-rust test-python test-scale-parity test-cross-parity eval-scale synthetic-seed lint fmt clean-state chaos durability bench-observability eval bench-recall bench-rank bench-features bench-rerank synthetic-bundle fuzz bench synthetic-population-seed

# Bootstrap (Python, data, bundle) and the Rust build are independent: run them side by side.
# DATASET=synthetic runs the cluster on the catalogue-scale synthetic bundle instead (a
# million items by default, see SYNTH_ITEMS; trained on first use, about half an hour),
# with the feature store seeded with the histories of 1,000 held-out users.
# TLS=1 runs it over mutual TLS with a development CA (`recsysctl certs`, target/dev/certs).
DATASET ?= ml-100k
TLS ?= 0
export RECSYS_CLUSTER_TLS := $(TLS)
run:
ifeq ($(DATASET),synthetic)
	@$(MAKE) --no-print-directory -j2 synthetic-seed build
	@RECSYS_CLUSTER_BUNDLES=$(SYNTH_BUNDLES) RECSYS_CLUSTER_SEED=$(SYNTH_DIR)/seed \
	  RECSYS_CLUSTER_STATE=data/state-synthetic-$(SYNTH_ITEMS) \
	  RECSYS_CLUSTER_SAMPLE_USER=$$(head -n 1 $(SYNTH_DIR)/seed/users.txt) deploy/local/run-cluster.sh
else
	@$(MAKE) --no-print-directory -j2 bootstrap build
	@deploy/local/run-cluster.sh
endif

test: bootstrap test-rust test-python test-scale-parity test-cross-parity lint

bootstrap:
	@deploy/local/bootstrap.sh

build:
	@echo "==> building the workspace (first build takes a few minutes)"
	cargo build --workspace --bins

test-rust:
	@echo "==> Rust unit and cluster tests"
	$(ENV) && cargo test --workspace

test-python:
	@echo "==> training pipeline tests"
	$(ENV) && cd training && "$$RECSYS_PYTHON" -m pytest -q
	@echo "==> deployment checks (helm lint and template, kubernetes-validate, Gateway API schema, promtool)"
	$(ENV) && "$$RECSYS_PYTHON" -m pytest -q deploy/tests

# Train/serve parity at catalogue scale: a small synthetic bundle from the columnar
# pipeline (scale.py), whose recorded inputs and scores rank-svc must reproduce.
SCALE_PARITY := target/scale-parity
test-scale-parity: bootstrap
	@echo "==> rank-svc reproduces a catalogue-scale bundle's features and scores"
	$(ENV) && rm -rf $(SCALE_PARITY) && "$$RECSYS_PYTHON" -m recsys_training synthesize --out $(SCALE_PARITY)/data \
	    --items 5000 --users 4000 --interactions 100000 --clusters 30 && \
	  "$$RECSYS_PYTHON" -m recsys_training train-scale --data $(SCALE_PARITY)/data --out $(SCALE_PARITY)/bundles \
	    --ann-min-items 1000 --ranker-users 2000
	$(ENV) && RECSYS_TEST_BUNDLE=$(CURDIR)/$(SCALE_PARITY)/bundles cargo test -p rank-svc --test bundle_ranker -- serving_builds_training_tensors live_item_counts_are_read

# Every automated feature cross candidate forced into a quick bundle (no probe threshold,
# no fine-model check), so that rank-svc's computation of each is compared with training's
# on real tables, whatever the default selection ships.
CROSS_PARITY := target/cross-parity
test-cross-parity: bootstrap
	@echo "==> rank-svc computes every automated feature cross as training does"
	rm -rf $(CROSS_PARITY) && mkdir -p $(CROSS_PARITY)
	sed -e 's/^min_gain = .*/min_gain = -1.0/' -e 's/^min_z = .*/min_z = -1e9/' -e 's/^max_kept = .*/max_kept = 100/' \
	    -e 's/^fine_check = .*/fine_check = false/' training/feature_config.toml > $(CROSS_PARITY)/features.toml
	$(ENV) && "$$RECSYS_PYTHON" -m recsys_training train --data data/ml-100k --out $(CROSS_PARITY)/bundles --quick \
	    --feature-config $(CURDIR)/$(CROSS_PARITY)/features.toml && \
	  "$$RECSYS_PYTHON" -c 'import json, sys; crosses = json.load(open(sys.argv[1]))["feature_config"]["attribute_crosses"]; \
	    assert len(crosses) == 10, [c["name"] for c in crosses]' $(CROSS_PARITY)/bundles/current/manifest.json
	$(ENV) && RECSYS_TEST_BUNDLE=$(CURDIR)/$(CROSS_PARITY)/bundles cargo test -p rank-svc --test bundle_ranker -- serving_builds_training_tensors

lint:
	@echo "==> rustfmt and clippy"
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Chaos suite: faults under steady load, then overload; writes target/reports/chaos.json.
chaos: bootstrap build
	@echo "==> chaos suite (about two minutes)"
	$(ENV) && target/debug/recsys-chaos --bin-dir target/debug

# Acknowledged events survive SIGKILL: 20 kill/restart cycles of feature-svc under four
# appending clients; writes target/reports/durability.json.
durability: bootstrap build
	@echo "==> durability of acknowledged events (about a minute)"
	$(ENV) && target/debug/recsys-durability --bin-dir target/debug

# Telemetry overhead: export on vs off in one run; writes target/reports/bench-observability.json.
bench-observability: bootstrap build
	@echo "==> observability overhead benchmark (about a minute)"
	$(ENV) && target/debug/bench-observability --bin-dir target/debug

# The served pipeline on the published MovieLens-100k protocol; writes target/reports/eval-ml100k.json.
eval: bootstrap build
	@echo "==> offline evaluation of the served pipeline"
	$(ENV) && "$$RECSYS_PYTHON" -m recsys_training eval --data data/ml-100k --work target/eval --bin-dir target/debug

# Recall at catalogue scale (a million items by default; SYNTH_ITEMS etc. to change it):
# synthetic data and its bundle are made once and reused, then our HNSW index,
# hnswlib's and faiss's are queried on the same vectors, and recall-svc is started on the
# bundle and measured over gRPC. Writes target/reports/bench-recall.json.
SYNTH_ITEMS ?= 1000000
SYNTH_USERS ?= 2000000
SYNTH_INTERACTIONS ?= 20000000
SYNTH_DIR ?= data/synthetic-$(SYNTH_ITEMS)
SYNTH_BUNDLES ?= models/synthetic-$(SYNTH_ITEMS)
bench-recall: bootstrap synthetic-bundle
	@echo "==> release build of recall-svc and the benchmark"
	cargo build --release -p recall-svc -p recsys-chaos --bin recall-svc --bin bench-recall
	@echo "==> ANN baselines (hnswlib, faiss-cpu) on the bundle's vectors"
	bench_python=$$(deploy/local/python-env.sh crates/chaos/scripts/requirements-bench.txt)/bin/python && \
	  "$$bench_python" crates/chaos/scripts/ann_baselines.py --bundle $(SYNTH_BUNDLES)/current \
	    --data $(SYNTH_DIR) --out target/bench-recall
	$(ENV) && target/release/bench-recall --bundle $(SYNTH_BUNDLES)/current --work target/bench-recall \
	  --bin-dir target/release

# rank-svc against the raw model (onnxruntime's Python session on the same inputs), DIN and
# DeepFM at 200 and 1000 candidates, the million-item bundle against ML-100k, micro-batching,
# INT8 and the student. Writes target/reports/bench-rank.json (about ten minutes).
BENCH_RANK := target/bench-rank
bench-rank: bootstrap synthetic-bundle
	@echo "==> release build of rank-svc and the benchmark"
	cargo build --release -p rank-svc -p recsys-chaos --bin rank-svc --bin bench-rank
	@echo "==> the default bundle's DeepFM twin (same data and seed)"
	mkdir -p $(BENCH_RANK)
	sed 's/^fine = "din"/fine = "deepfm"/' training/feature_config.toml > $(BENCH_RANK)/features-deepfm.toml
	$(ENV) && "$$RECSYS_PYTHON" -m recsys_training train --data data/ml-100k --out $(BENCH_RANK)/deepfm \
	  --feature-config $(BENCH_RANK)/features-deepfm.toml > $(BENCH_RANK)/train-deepfm.log
	$(ENV) && target/release/bench-rank --din models/bundles --deepfm $(BENCH_RANK)/deepfm \
	  --catalogue $(SYNTH_BUNDLES) --python "$$RECSYS_PYTHON" --work $(BENCH_RANK) --bin-dir target/release

# rerank-svc at catalogue scale: the shipped rules and 10,000 run-time catalogue records,
# on ML-100k and on the million-item synthetic bundle, release build, over gRPC. Writes
# target/reports/bench-rerank.json.
# Fuzzing on stable Rust (tests/support/fuzz): 100,000 cases of each of 11 targets against an
# in-process cluster, then the TLS, admin and idle-connection checks; about ten minutes.
# Writes target/reports/fuzz.json; crash inputs go to target/fuzz/crashes/. FUZZ_CASES sets
# the cases per target. Scratch files and the cluster's store live in /dev/shm.
FUZZ_CASES ?= 100000
fuzz: bootstrap
	@echo "==> fuzz targets (dev profile)"
	cargo build -p cluster-tests --bin recsys-fuzz
	$(ENV) && TMPDIR=$$( [ -d /dev/shm ] && echo /dev/shm || echo /tmp ) target/debug/recsys-fuzz --cases $(FUZZ_CASES)

bench-rerank: bootstrap synthetic-bundle
	@echo "==> release build of feature-svc, rerank-svc and the benchmark"
	cargo build --release -p feature-svc -p rerank-svc -p recsys-chaos --bin feature-svc --bin rerank-svc --bin bench-rerank
	$(ENV) && target/release/bench-rerank --catalogue $(SYNTH_BUNDLES)

# The feature store at scale, both backends (embedded redb, Redis with appendfsync always):
# reads of one user + 1000 items, durable ingestion, click-to-visible, 20 kill -9 cycles
# each, and start-up with the synthetic set's 2M users. Seeds are cut from the synthetic
# data once (FEATURE_USERS users for the read/ingest phases); the 2M-user store is built
# on the first run (minutes) and reused. Writes target/reports/bench-features.json.
BENCH_FEATURES := target/bench-features
FEATURE_USERS ?= 200000
bench-features: bootstrap synthetic-population-seed
	$(ENV) && if [ ! -f $(BENCH_FEATURES)/seed-$(FEATURE_USERS)/interactions.csv ]; then \
	  "$$RECSYS_PYTHON" crates/chaos/scripts/feature_seed.py --data $(SYNTH_DIR) \
	    --out $(BENCH_FEATURES)/seed-$(FEATURE_USERS) --users $(FEATURE_USERS); fi
	@echo "==> release build of feature-svc and the benchmark"
	cargo build --release -p feature-svc -p recsys-chaos --bin feature-svc --bin bench-features
	$(ENV) && target/release/bench-features --seed $(BENCH_FEATURES)/seed-$(FEATURE_USERS) \
	  --large-seed $(BENCH_FEATURES)/seed-all --bundle $(SYNTH_BUNDLES) --work $(BENCH_FEATURES) \
	  --bin-dir target/release

# The whole request path at a million items against its own compute floor (the same
# requests' stages in-process, no gRPC), and on ML-100k for comparison: closed-loop
# latency, peak sustainable open-loop rate and half of it, per-hop overhead from traces,
# CPU efficiency. Release build; the feature store is seeded with the whole synthetic
# population once (minutes) and kept in target/bench. Writes target/reports/bench.json,
# bench-details.json and bench-latency.png (about fifteen minutes once the data exist).
BENCH_PATH := target/bench
bench: bootstrap synthetic-bundle synthetic-population-seed
	@echo "==> release build of the five services and the benchmark"
	cargo build --release -p feature-svc -p recall-svc -p rank-svc -p rerank-svc -p orchestrator -p recsys-chaos \
	  --bin feature-svc --bin recall-svc --bin rank-svc --bin rerank-svc --bin orchestrator --bin bench-path
	$(ENV) && target/release/bench-path run --catalogue $(SYNTH_BUNDLES) --catalogue-seed $(BENCH_FEATURES)/seed-all \
	  --work $(BENCH_PATH) --bin-dir target/release
	bench_python=$$(deploy/local/python-env.sh crates/chaos/scripts/requirements-bench.txt)/bin/python && \
	  "$$bench_python" crates/chaos/scripts/latency_chart.py --latencies $(BENCH_PATH)/latencies.json \
	    --out target/reports/bench-latency.png

# Every user of the synthetic set as a feature-store seed (shared by bench-features).
synthetic-population-seed: synthetic-bundle
	$(ENV) && if [ ! -f $(BENCH_FEATURES)/seed-all/interactions.csv ]; then \
	  "$$RECSYS_PYTHON" crates/chaos/scripts/feature_seed.py --data $(SYNTH_DIR) --out $(BENCH_FEATURES)/seed-all; fi

# The served pipeline's hit rate@100 on the synthetic set's held-out engagements, against
# popularity; writes target/reports/eval-scale.json.
eval-scale: synthetic-bundle build
	@echo "==> served hit rate@100 at catalogue scale"
	$(ENV) && "$$RECSYS_PYTHON" -m recsys_training eval-scale --data $(SYNTH_DIR) --bundles $(SYNTH_BUNDLES) \
	  --bin-dir target/debug

synthetic-seed: synthetic-bundle
	$(ENV) && "$$RECSYS_PYTHON" -m recsys_training seed-sample --data $(SYNTH_DIR) --out $(SYNTH_DIR)/seed

# Synthetic data and its bundle (each made only when absent, or for the bundle, in a
# format the services no longer read).
synthetic-bundle: bootstrap
	$(ENV) && if [ ! -f $(SYNTH_DIR)/interactions.parquet ]; then \
	  "$$RECSYS_PYTHON" -m recsys_training synthesize --out $(SYNTH_DIR) --items $(SYNTH_ITEMS) \
	    --users $(SYNTH_USERS) --interactions $(SYNTH_INTERACTIONS); fi
	$(ENV) && if ! "$$RECSYS_PYTHON" -m recsys_training up-to-date --format-only $(SYNTH_BUNDLES)/current; then \
	  "$$RECSYS_PYTHON" -m recsys_training train-scale --data $(SYNTH_DIR) --out $(SYNTH_BUNDLES); fi

# Train a new bundle from data/ml-100k and make it current.
bundle: bootstrap
	$(ENV) && "$$RECSYS_PYTHON" -m recsys_training train --data data/ml-100k --out models/bundles

# Forget the feature store's event log (user behaviour logged since the seed data).
clean-state:
	rm -rf data/state
