#!/usr/bin/env bash
# `make run`: the demo on a fresh machine.
#  1. uses the cluster of the current kubeconfig context if one answers; otherwise builds
#     (or reuses) and starts the local control plane from hack/;
#  2. installs the CRD and runs the operator (plugins from examples/plugins);
#  3. applies examples/pipeline.yaml, waits for Ready, shows `kubectl get pipelines` and the
#     pipeline's growing output; then keeps the operator in the foreground until Ctrl-C.
# RUN_SECONDS=N stops the operator after N seconds instead (for unattended runs).
# IN_CLUSTER=1: the operator as users run it instead, installed by Helm as a pod on the local
# real node (hack/run-in-cluster.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STATE=.state
mkdir -p "$STATE"
# kubectl and helm of the pinned versions first on PATH (no version-skew warning).
eval "$($PY hack/controlplane.py binaries | grep -E '^(KUBE|HELM)_BIN=')"
export PATH=$KUBE_BIN:$HELM_BIN:$PATH
if [ "${IN_CLUSTER:-0}" = 1 ]; then
  exec bash hack/run-in-cluster.sh
fi

if kubectl --request-timeout=3s version >/dev/null 2>&1; then
  echo "== using the cluster of the current kubeconfig context: $(kubectl config current-context)"
else
  line=$($PY hack/controlplane.py up --no-node | tail -n 1)
  export "${line?}"
  echo "== local control plane is up: $line   (stop it later with: make cluster-down)"
fi
kubectl version | sed 's/^/   /'

echo "== installing the CRD"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/pipelines.juturna.io --timeout=30s >/dev/null

if [ -f "$STATE/operator.pid" ] && kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null; then
  echo "error: an operator from an earlier 'make run' still runs (PID $(cat "$STATE/operator.pid")); stop it first" >&2
  exit 1
fi
echo "== starting the operator (log: $STATE/operator.log)"
export JUTURNA_OPERATOR_PLUGIN_PATH=$PWD/examples/plugins
export JUTURNA_OPERATOR_WORKDIR=$PWD/$STATE/work
.venv/bin/juturna-operator run -A >"$STATE/operator.log" 2>&1 &
op=$!
echo "$op" >"$STATE/operator.pid"
stop_operator() {
  # The demo leaves nothing running: delete its pipeline (its worker process ends with it)
  # while the operator still runs, then stop the operator.
  echo "== deleting the demo pipeline and stopping the operator"
  kubectl delete pipeline tones --ignore-not-found --timeout=30s >/dev/null 2>&1 || true
  kill "$op" 2>/dev/null && wait "$op" 2>/dev/null
  rm -f "$STATE/operator.pid"
}
trap stop_operator EXIT
for _ in $(seq 1 100); do
  grep -q "Initial authentication has finished" "$STATE/operator.log" 2>/dev/null && break
  kill -0 "$op" 2>/dev/null || { echo "error: the operator exited; its log:" >&2; tail -n 30 "$STATE/operator.log" >&2; exit 1; }
  sleep 0.2
done

echo "== kubectl apply -f examples/pipeline.yaml"
kubectl delete pipeline tones --ignore-not-found --wait=true >/dev/null
kubectl apply -f examples/pipeline.yaml
kubectl wait --for=condition=Ready pipeline/tones --timeout=60s
kubectl get pipelines
pid=$(kubectl get pipeline tones -o jsonpath='{.status.pipelineId}')
out=$(ls "$STATE"/work/*_"$pid"/out/output.jsonl)
echo "== the pipeline's output ($out) grows:"
for _ in 1 2 3; do
  sleep 1
  printf '   %4d lines, last: %s\n' "$(wc -l <"$out")" "$(tail -n 1 "$out")"
done
if [ -n "${RUN_SECONDS:-}" ]; then
  sleep "$RUN_SECONDS"
  exit 0
fi
echo "== the operator keeps running; Ctrl-C deletes the demo pipeline and stops it"
wait "$op"
