#!/usr/bin/env bash
# `make run IN_CLUSTER=1`: the demo as a user runs it, on the local real node.
#  1. starts (or reuses) the local control plane and node (make cluster-up);
#  2. builds the operator's image with podman (on a locally made base) and copies it into the
#     node's containerd: no registry anywhere, the pod never pulls;
#  3. helm install, operator pod Ready; kubectl apply examples/pipeline.yaml, Ready;
#  4. shows `kubectl get pipelines`, the pipeline's own pod (the chart's engine: pod) with its
#     output growing, and the operator's log.
# Ctrl-C (or RUN_SECONDS=N) deletes the pipeline and uninstalls the chart; the cluster stays
# up for another run (stop it with make cluster-down). Called by hack/run.sh, PATH set there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NS=juturna-system
IMAGE=localhost/juturna-operator:dev
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

line=$($PY hack/cluster.py up --node | tail -n 1)
export "${line?}"
echo "== local control plane and node are up: $line   (stop them later with: make cluster-down)"
kubectl get nodes -o wide | sed 's/^/   /'

echo "== building $IMAGE (podman; the base image is made locally the first time)"
base=$(hack/make-base-image.sh)
"${PODMAN[@]}" build --quiet --network=host "${LIMITS[@]}" --build-arg "BASE_IMAGE=$base" -t "$IMAGE" . >/dev/null
$PY hack/cluster.py load-image "$IMAGE"

echo "== helm install juturna-operator (namespace $NS, image $IMAGE, never pulled)"
helm upgrade --install juturna-operator charts/juturna-operator -n "$NS" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --wait --timeout 180s >/dev/null
uninstall() {
  echo "== deleting the demo pipeline and uninstalling the chart"
  kubectl delete pipeline tones --ignore-not-found --timeout=60s >/dev/null 2>&1 || true
  helm uninstall juturna-operator -n "$NS" --wait --timeout 60s >/dev/null 2>&1 || true
}
trap uninstall EXIT
kubectl get pods -n "$NS" -o wide | sed 's/^/   /'
pod=$(kubectl get pods -n "$NS" -l app.kubernetes.io/name=juturna-operator -o jsonpath='{.items[0].metadata.name}')

echo "== kubectl apply -f examples/pipeline.yaml"
kubectl apply -f examples/pipeline.yaml
kubectl wait --for=condition=Ready pipeline/tones --timeout=90s
kubectl get pipelines -o wide
pid=$(kubectl get pipeline tones -o jsonpath='{.status.pipelineId}')
runtime=$(kubectl get pipeline tones -o jsonpath='{.status.pod.name}')
out="/var/lib/juturna/*_$pid/out/output.jsonl"
echo "== the pipeline runs in a pod of its own, $runtime; its output grows there ($out):"
for _ in 1 2 3; do
  sleep 1
  kubectl exec "$runtime" -- sh -c "printf '   %4d lines, last: %s\n' \$(cat $out | wc -l) \"\$(tail -n 1 $out)\""
done
echo "== kubectl logs -n $NS $pod (last lines)"
kubectl logs -n "$NS" "$pod" --tail=5 | sed 's/^/   /'
if [ -n "${RUN_SECONDS:-}" ]; then
  sleep "$RUN_SECONDS"
  exit 0
fi
echo "== the operator keeps running in its pod; Ctrl-C deletes the pipeline and uninstalls it"
kubectl logs -n "$NS" "$pod" -f --tail=0
