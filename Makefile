# InferenceFleet: every target has a one-line description; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= builtin:resnet18

.PHONY: help setup cluster-build node-deps test-deps demo test lint typecheck unit proto bench-server bench-tune gpu-check bench-local bench-client bench-operator bench-chaos-operator clean chart-sync-crd

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: ## create .venv/ with everything installed (torch, grpc, kopf, dev tools)
	@scripts/setup-venv.sh

cluster-build: ## build the pinned test-cluster binaries (etcd, kube-*, kwok, helm) into ~/.cache
	@e2e/build.sh

demo: setup ## run the main job: a local fleet from examples/fleet.yaml, served and benchmarked
	@scripts/demo.sh

node-deps: ## install the Debian packages of the test cluster's real node (containerd, runc, CNI, buildah, ...)
	@e2e/install-node-deps.sh

test: ## set everything up and run every test: lint, types, unit, integration, e2e
	@# the cluster's Go build (CPU) beside the Debian packages and the venv (mostly downloads)
	@$(MAKE) --no-print-directory -j2 cluster-build test-deps
	@$(MAKE) --no-print-directory lint typecheck
	@scripts/test-all.sh

test-deps: ## node-deps, setup, then the real node's images (one after the other: apt-get, buildah)
	@e2e/install-node-deps.sh
	@scripts/setup-venv.sh
	@# built now, beside the cluster's Go build, rather than inside the real node's tests
	@e2e/images.sh operator worker >/dev/null \
		|| echo "images: not built here; the real node's tests build them or skip, saying why"

lint: ## ruff
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

typecheck: ## mypy --strict
	@$(VENV)/bin/mypy server/inferencefleet server/fleet_proto server/fleet_server server/fleet_client server/fleet_tune operator/fleet_spec operator/fleet_operator operator/fleet_local

unit: setup ## only the tests that need no process, network or cluster
	@$(PY) -m pytest -m "not integration and not e2e"

proto: ## regenerate the protobuf/gRPC code next to server/fleet_proto/inference.proto
	@$(PY) -m grpc_tools.protoc -I server --python_out=server --pyi_out=server --grpc_python_out=server server/fleet_proto/inference.proto

bench-server: setup ## raw model vs served frames/s and added latency (MODEL=builtin:resnet18)
	@$(PY) bench/bench_server.py --model $(MODEL)

bench-tune: setup ## inferencefleet tune vs an exhaustive sweep of the same grid (tune/sweep and time ratios)
	@$(PY) bench/bench_tune.py

gpu-check: setup ## on a machine with an NVIDIA GPU (<= 8 min): CUDA tests, resnet18 raw/served, 1/2/4 workers, tune
	@$(PY) bench/gpu_check.py

bench-local: setup ## 1 worker at batch 1 vs the example fleet's best configuration
	@$(PY) bench/bench_local.py

bench-client: setup ## inferencefleet bench vs perf_analyzer, same worker and concurrency (needs libb64-0d)
	@$(PY) bench/bench_vs_perf_analyzer.py

bench-operator: setup cluster-build ## apply→Ready for 100 replicas, scale latency p50/p99, on the test cluster
	@$(PY) bench/bench_operator.py

bench-chaos-operator: setup cluster-build ## operator SIGKILLed mid-reconcile (20 rounds), apiserver restart, node deletion: convergence, orphans
	@$(PY) bench/bench_operator_chaos.py --json chaos-operator.json

chart-sync-crd: ## copy crds/inferencefleet.yaml into the Helm chart (after every CRD change; a test checks they match)
	@mkdir -p charts/inferencefleet/crds
	@cp crds/inferencefleet.yaml charts/inferencefleet/crds/inferencefleet.yaml
	@echo "charts/inferencefleet/crds/inferencefleet.yaml updated from crds/inferencefleet.yaml"

clean: ## remove build outputs (keeps .venv and the cluster cache)
	rm -rf build *.egg-info .mypy_cache .ruff_cache .pytest_cache
