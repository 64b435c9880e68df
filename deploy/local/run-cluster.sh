#!/usr/bin/env bash
# Starts the five services on loopback with the embedded defaults, waits until each is
# SERVING, prints a sample recommendation and stays up until Ctrl-C, then stops them all.
#
# Another data set (`make run DATASET=synthetic` sets these):
#   RECSYS_CLUSTER_BUNDLES      bundle root of every service (default models/bundles)
#   RECSYS_CLUSTER_SEED         the feature store's seed data (default data/ml-100k)
#   RECSYS_CLUSTER_STATE        directory of the feature store's event log (default data/state)
#   RECSYS_CLUSTER_SAMPLE_USER  whose recommendation is printed (default 196)
#   RECSYS_CLUSTER_TLS=1        mutual TLS everywhere (`make run TLS=1`), with a development CA
#                               from `recsysctl certs` in target/dev/certs
#
# Admin ports (orchestrator 50061, feature 50062, recall 50063, rank 50064, rerank 50065)
# accept the operator token in target/dev/admin-tokens, created on first use.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck disable=SC1091
source target/recsys.env
bin=${RECSYS_BIN:-target/debug}
logs=target/cluster-logs
mkdir -p "$logs"
services=(feature-svc recall-svc rank-svc rerank-svc orchestrator)
if [ -n "${RECSYS_CLUSTER_BUNDLES:-}" ]; then
  export RECSYS_RECALL__BUNDLE=$RECSYS_CLUSTER_BUNDLES RECSYS_RANK__BUNDLE=$RECSYS_CLUSTER_BUNDLES \
    RECSYS_RERANK__BUNDLE=$RECSYS_CLUSTER_BUNDLES RECSYS_ORCHESTRATOR__FALLBACK_BUNDLE=$RECSYS_CLUSTER_BUNDLES
fi
if [ -n "${RECSYS_CLUSTER_SEED:-}" ]; then export RECSYS_FEATURE__SEED_DIR=$RECSYS_CLUSTER_SEED; fi
if [ -n "${RECSYS_CLUSTER_STATE:-}" ]; then
  export RECSYS_FEATURE__STORE__PATH=$RECSYS_CLUSTER_STATE/features.redb
fi
sample_user=${RECSYS_CLUSTER_SAMPLE_USER:-196}
# Each service's environment prefix, in the order of `services`.
prefixes=(RECSYS_FEATURE RECSYS_RECALL RECSYS_RANK RECSYS_RERANK RECSYS_ORCHESTRATOR)

# The admin ports' token file (a Kubernetes Secret in production); recsysctl reads it too.
export RECSYS_ADMIN_TOKEN_FILE=${RECSYS_ADMIN_TOKEN_FILE:-target/dev/admin-tokens}
if [ ! -s "$RECSYS_ADMIN_TOKEN_FILE" ]; then
  mkdir -p "$(dirname "$RECSYS_ADMIN_TOKEN_FILE")"
  (umask 077 && echo "operator:$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$RECSYS_ADMIN_TOKEN_FILE")
fi
for prefix in "${prefixes[@]}"; do export "${prefix}__SERVER__ADMIN__TOKEN_FILE=$root/$RECSYS_ADMIN_TOKEN_FILE"; done

grpcurl_tls=(-plaintext)
if [ "${RECSYS_CLUSTER_TLS:-0}" = 1 ]; then
  certs=target/dev/certs
  [ -s "$certs/ca.pem" ] || "$bin/recsysctl" certs --out "$certs"
  for i in "${!services[@]}"; do
    service=${services[$i]} prefix=${prefixes[$i]}
    export "${prefix}__SERVER__TLS__ENABLED=true" "${prefix}__SERVER__TLS__CA_FILE=$root/$certs/ca.pem" \
      "${prefix}__SERVER__TLS__CERT_FILE=$root/$certs/$service.pem" "${prefix}__SERVER__TLS__KEY_FILE=$root/$certs/$service-key.pem"
  done
  # recsysctl (and so this script) presents the operator's certificate.
  export RECSYS_TLS_CA=$certs/ca.pem RECSYS_TLS_CERT=$certs/operator.pem RECSYS_TLS_KEY=$certs/operator-key.pem
  grpcurl_tls=(-cacert "$certs/ca.pem" -cert "$certs/operator.pem" -key "$certs/operator-key.pem")
fi
pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping the cluster"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

echo "==> starting services (logs in $logs/)"
for service in "${services[@]}"; do
  "$bin/$service" >"$logs/$service.log" 2>&1 &
  pids+=($!)
  echo "    $service (pid $!)"
done
if ! "$bin/recsysctl" wait-ready --timeout-s 120 \
    127.0.0.1:50052 127.0.0.1:50053 127.0.0.1:50054 127.0.0.1:50055 127.0.0.1:50051; then
  echo "a service did not become ready; last log lines:" >&2
  tail -n 5 "$logs"/*.log >&2
  exit 1
fi
echo
"$bin/recsysctl" recommend --user "$sample_user" --top-k 10 --bundle "${RECSYS_CLUSTER_BUNDLES:-models/bundles}"
cat <<TXT

The cluster is up: orchestrator 127.0.0.1:50051, feature 50052, recall 50053, rank 50054, rerank 50055;
admin ports 50061-50065 (token in $RECSYS_ADMIN_TOKEN_FILE${RECSYS_TLS_CA:+, or the operator certificate}).
Try:
  $GRPCURL ${grpcurl_tls[*]} 127.0.0.1:50051 list
  $GRPCURL ${grpcurl_tls[*]} -d '{"user_id":"$sample_user","top_k":10}' 127.0.0.1:50051 recsys.v1.Recommender/Recommend
  $bin/recsysctl recommend --user $sample_user --debug
  $bin/recsysctl canary status
Press Ctrl-C to stop.
TXT
wait
