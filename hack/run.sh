#!/usr/bin/env bash
# `make run`: the demo on a fresh machine.
#  1. uses the cluster of the current kubeconfig context if one answers; otherwise builds
#     (or reuses) and starts the local control plane from hack/;
#  2. installs the CRD and runs the operator (plugins from examples/plugins);
#  3. applies examples/pipeline.yaml, waits for Ready, shows `kubectl get pipelines` and the
#     pipeline's growing output; then waits for Ctrl-C (or SIGTERM, or the terminal closing):
#     the cleanup deletes the pipeline (the operator's finalizer ends its worker), then stops
#     the operator; a control plane it started stays up (make cluster-down stops it).
# RUN_SECONDS=N cleans up the same way after N seconds instead (for unattended runs).
# IN_CLUSTER=1: the operator as users run it instead, installed by Helm as a pod on the local
# real node (hack/run-in-cluster.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STATE=.state
mkdir -p "$STATE"
# kubectl and helm of the pinned versions first on PATH (no version-skew warning).
eval "$($PY hack/cluster.py binaries | grep -E '^(KUBE|HELM)_BIN=')"
export PATH=$KUBE_BIN:$HELM_BIN:$PATH
if [ "${IN_CLUSTER:-0}" = 1 ]; then
  exec bash hack/run-in-cluster.sh
fi

plane_hint="" # what the cleanup says about the cluster it leaves up
if kubectl --request-timeout=3s version >/dev/null 2>&1; then
  echo "== using the cluster of the current kubeconfig context: $(kubectl config current-context)"
else
  line=$($PY hack/cluster.py up --no-node | tail -n 1)
  export "${line?}"
  echo "== local control plane is up: $line   (stop it later with: make cluster-down)"
  plane_hint="; the local control plane stays up (stop it with: make cluster-down)"
fi
kubectl version | sed 's/^/   /'

echo "== installing the CRD"
# Forced: a Helm install (make run IN_CLUSTER=1) may own the CRD's fields.
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established crd/pipelines.juturna.io --timeout=30s >/dev/null

if [ -f "$STATE/operator.pid" ] && kill -0 "$(cat "$STATE/operator.pid")" 2>/dev/null; then
  echo "error: an operator from an earlier 'make run' still runs (PID $(cat "$STATE/operator.pid")); stop it first" >&2
  exit 1
fi
echo "== starting the operator (log: $STATE/operator.log)"
export JUTURNA_OPERATOR_PLUGIN_PATH=$PWD/examples/plugins
export JUTURNA_OPERATOR_WORKDIR=$PWD/$STATE/work
op="" # the operator's PID, once started
cleaned=0
cleanup() {
  # The demo leaves nothing running: delete its pipeline while the operator still runs (its
  # finalizer ends the worker process), then stop the operator. Once only: EXIT follows INT.
  [ "$cleaned" = 0 ] || return 0
  cleaned=1
  set +e                # a closed terminal (SIGHUP) fails the echos: go on regardless
  trap '' INT TERM HUP # a second Ctrl-C must not cut the cleanup short; each step is bounded
  [ -n "$op" ] || return 0
  echo "== deleting the demo pipeline and stopping the operator"
  if kill -0 "$op" 2>/dev/null; then
    # setsid -w: kubectl in a session of its own too, out of reach of another Ctrl-C (a Go
    # program that asks for SIGINT gets it even where it was ignored).
    if ! setsid -w kubectl delete pipeline tones --ignore-not-found --wait=true --timeout=60s \
      </dev/null >/dev/null 2>"$STATE/delete.err"; then
      echo "warning: the pipeline tones was not deleted: $(tail -n 1 "$STATE/delete.err")" >&2
    fi
    kill -TERM "$op" 2>/dev/null
    for _ in $(seq 1 200); do # kopf stops within seconds; 20 s at most, then SIGKILL
      kill -0 "$op" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$op" 2>/dev/null
    wait "$op" 2>/dev/null
  elif kubectl get pipeline tones >/dev/null 2>&1; then
    echo "warning: the operator had already exited; the pipeline tones stays until one runs" >&2
  fi
  rm -f "$STATE/operator.pid" "$STATE/delete.err"
  echo "== done: nothing of the demo runs any more$plane_hint"
}
on_signal() {
  cleanup
  # Die of the same signal, so make reports the interrupt and stops too.
  trap - "$1" EXIT
  kill -"$1" $$
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP
# A session of its own: a Ctrl-C in the terminal signals the whole foreground process group,
# and an operator stopping on that SIGINT would race the cleanup's delete, leaving the
# Pipeline's finalizer undone and its worker running. The cleanup stops it instead, after the
# delete. (Under `&` in a script the child leads no process group, so setsid execs in place
# and $! is the operator itself.)
setsid .venv/bin/juturna-operator run -A </dev/null >"$STATE/operator.log" 2>&1 &
op=$!
echo "$op" >"$STATE/operator.pid"
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
