# juturna-operator: `make run` (the demo) and `make test` (everything CI runs).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help venv binaries argocd packages image package chart-readme cluster-up cluster-down run test reliability bench bench-pods bench-live bench-swap bench-shard crds docs kubernetes-schemas lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@py=$$(hack/find-python.sh) || exit 1; \
	  [ -x $(PY) ] || $$py -m venv $(VENV) || { echo "error: '$$py -m venv' failed; install the venv module (apt-get install python3.12-venv)" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP) ## create .venv with Python 3.12 and install the project

binaries: venv ## build or reuse kube-apiserver, kube-controller-manager, etcd and helm
	@$(PY) hack/cluster.py binaries

argocd: venv ## build or reuse Argo CD for the GitOps test (cold ~6 min); says why where it cannot
	@$(PY) hack/argocd.py build

packages: ## install podman, containerd, runc, CNI plugins and more if missing (root Debian only)
	@hack/install-packages.sh

# BASE_IMAGE: python:3.12-slim for real builds; `make image BASE_IMAGE=$$(hack/make-base-image.sh)`
# where no registry is reachable.
BASE_IMAGE ?= python:3.12-slim
CONTAINER  ?= podman
image: ## build the operator image juturna-operator:dev (CONTAINER=docker works too)
	$(CONTAINER) build --build-arg BASE_IMAGE=$(BASE_IMAGE) -t juturna-operator:dev .

# One version (pyproject.toml's) for all three; refused when Chart.yaml or CHANGELOG.md differ.
package: venv binaries ## build dist/juturna-operator-<v>.tgz, the wheel and the image juturna-operator:<v>
	$(PY) hack/package.py --container "$(CONTAINER)" --base-image "$(BASE_IMAGE)"

chart-readme: venv ## regenerate charts/juturna-operator/README.md from its values.yaml
	$(PY) hack/chart_readme.py

cluster-up: venv packages ## start the local control plane and a real node (NODE=0: plane only); prints KUBECONFIG=<path>
	@$(PY) hack/cluster.py up $(if $(filter 0,$(NODE)),--no-node,--node)

cluster-down: venv ## stop the node and the plane that cluster-up started; says if anything is left
	@$(PY) hack/cluster.py down

run: venv ## the demo: plane (unless a cluster answers), operator, example; IN_CLUSTER=1: Helm, a pod on a real node
	@IN_CLUSTER=$(IN_CLUSTER) bash hack/run.sh

test: venv binaries packages argocd lint ## lint, then the whole test suite against a real control plane
	$(PY) -m pytest

reliability: venv binaries packages ## fault injection, fuzzing, security checks at full counts (~35 min): docs/reliability.md
	@mkdir -p .state
	RELIABILITY=full FUZZ_CASES=1000 RELIABILITY_REPEAT=5 RELIABILITY_RESULTS=docs/reliability.json \
	  $(PY) -m pytest -m reliability --junitxml=.state/reliability.xml; status=$$?; \
	  $(PY) hack/reliability_report.py docs/reliability.json .state/reliability.xml \
	    --notes hack/reliability_findings.md > docs/reliability.md; \
	  exit $$status

MODE ?= quick
bench: venv binaries ## benchmark (MODE=quick: N <= 100, ~12 min, into .state/bench; MODE=full: N = 1000 too)
	cd bench && ../$(PY) harness.py --mode $(MODE)

bench-pods: venv binaries packages ## the pod engine against bare pods on the real node (N = 1, 20, 100; 5 repetitions; ~30 min): docs/benchmarks-pods.md
	$(PY) bench/pods.py --out docs

bench-live: venv binaries packages ## live pipelines on the real node: address, first result, idle RSS: docs/benchmarks-live.md
	$(PY) bench/live.py --out docs

bench-swap: venv binaries packages ## the longest output gap across a change, WarmSwap against Recreate, on the real node: docs/benchmarks-swap.md
	$(PY) bench/swap.py --out docs

bench-shard: venv ## a long-lived shard's (engine process, many pipelines per process) memory over 2000 deploy/delete cycles (~2 min, no cluster): docs/benchmarks-shard.md
	$(PY) bench/shard_growth.py --out docs

crds: venv ## regenerate crds/ from the pydantic models in operator/juturna_operator/api.py
	$(VENV)/bin/juturna-operator crd crds charts/juturna-operator/crds

docs: venv ## regenerate the generated parts of docs/ (API reference, settings) from the code
	$(PY) hack/gen_docs.py

kubernetes-schemas: venv binaries ## rewrite the Pod fields' Kubernetes schemas (operator/juturna_operator/kubernetes.json) from the pinned plane's /openapi/v3; starts the plane, not the node
	$(PY) hack/kubernetes_schemas.py

lint: venv ## ruff, mypy --strict on the package, and the layers' import contract (pyproject.toml)
	$(VENV)/bin/ruff check operator tests hack bench examples charts
	$(VENV)/bin/ruff format --check operator tests hack bench examples charts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean: ## remove the venv and local state (not the binary cache)
	rm -rf $(VENV) .state .pytest_cache .ruff_cache
