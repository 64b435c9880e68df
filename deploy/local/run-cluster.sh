#!/usr/bin/env bash
# Starts the five services on loopback with the embedded defaults, waits until each is
# SERVING, prints a sample recommendation and stays up until Ctrl-C, then stops them all.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck disable=SC1091
source target/recsys.env
bin=${RECSYS_BIN:-target/debug}
logs=target/cluster-logs
mkdir -p "$logs"
services=(feature-svc recall-svc rank-svc rerank-svc orchestrator)
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
"$bin/recsysctl" recommend --user 196 --top-k 10
cat <<TXT

The cluster is up: orchestrator 127.0.0.1:50051, feature 50052, recall 50053, rank 50054, rerank 50055.
Try:
  $GRPCURL -plaintext 127.0.0.1:50051 list
  $GRPCURL -plaintext -d '{"user_id":"196","top_k":10}' 127.0.0.1:50051 recsys.v1.Recommender/Recommend
  $bin/recsysctl recommend --user 196 --debug
Press Ctrl-C to stop.
TXT
wait
