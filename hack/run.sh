#!/usr/bin/env bash
# `make run`: the demo on a fresh machine.
# Uses the cluster of the current kubeconfig context if one answers; otherwise builds
# (or reuses) and starts the local control plane from hack/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

if kubectl --request-timeout=3s version >/dev/null 2>&1; then
  echo "using the cluster of the current kubeconfig context: $(kubectl config current-context)"
else
  line=$($PY hack/controlplane.py up | tail -n 1)
  export "${line?}"
  echo "local control plane is up: $line"
  echo "(stop it with: make cluster-down)"
fi
kubectl version
