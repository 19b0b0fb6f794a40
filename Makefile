# The two commands of the README:
#   make serve   set everything up and run `cbgrpc serve` (ARGS="--port 7700" to pass flags)
#   make test    set everything up and run every check and the whole test suite (CI runs this)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
BUF := tools/buf/node_modules/.bin/buf
TS_DEPS := sdk/typescript/node_modules/.installed
ARGS ?=

.PHONY: setup serve test check lint typecheck protos-lint protos-check unit integration e2e consul valkey
.PHONY: clients clients-check clients-lint

setup: $(VENV)/.installed

# Both distributions editable: the root (server) and the SDK in sdk/python, which the root
# depends on by path. pip installs that dependency as a copy, so the SDK is installed
# editable again afterwards (one command cannot ask for both forms of one package).
$(VENV)/.installed: pyproject.toml sdk/python/pyproject.toml tools/constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet -c tools/constraints.txt -e . --group dev
	$(PY) -m pip install --quiet --no-deps -e ./sdk/python
	touch $@

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	npm ci --prefix tools/buf --no-audit --no-fund --loglevel=error
	touch $@

$(TS_DEPS): sdk/typescript/package.json sdk/typescript/package-lock.json
	npm ci --prefix sdk/typescript --no-audit --no-fund --loglevel=error
	touch $@

serve: setup
	$(VENV)/bin/cbgrpc serve $(ARGS)

# Lint the contract, check the generated code is current, lint and type-check, build the clients
# and the tools the tests run, then test. Valkey comes first (apt-get, which cloud-init's install
# may also run). Then the rest runs side by side (make -j): on a fresh machine building the tools
# takes most of the time, and each build is independent of the others and of the checks, which
# stay in their order (they regenerate code the others read). --output-sync prints each job's
# output as one block when it ends; a failed job fails `make test` before the suite starts.
PREPARE_JOBS ?= 6
test: valkey
	@$(MAKE) --no-print-directory -j$(PREPARE_JOBS) --output-sync=target test-prerequisites
	$(PY) -m pytest -q -p no:cacheprovider

.PHONY: test-prerequisites checks-and-clients
test-prerequisites: checks-and-clients consul terraform-tools

# These run one after the other: a make of its own, given this make's flags but not its jobs.
checks-and-clients:
	+@MAKEFLAGS="$(filter-out -j% --jobserver%,$(MAKEFLAGS))" $(MAKE) --no-print-directory check clients

# A real Consul for the cluster tests, built from the Go module proxy and cached outside the
# repository by version (a cold build takes a few minutes; later runs reuse it).
consul:
	bash tools/consul/build.sh >/dev/null

# A real Valkey server for the KVS's Valkey engine and its tests, from Debian's packages
# (bookworm-backports; Redis 7 from bookworm main if Valkey is missing). Skips when installed.
valkey:
	bash tools/valkey/install.sh

check: protos-lint protos-check clients-check lint typecheck clients-lint

protos-lint: $(BUF)
	$(BUF) lint protos

protos-check: setup
	$(PY) tools/gen_protos.py
	git diff --exit-code -- sdk/python/cloudburst/v1 cloudburst_grpc/cloudburst_v1.binpb \
	  'cloudburst_grpc/security/consul_connectca_pb2*' || \
	  (echo "sdk/python/cloudburst/v1 is out of date: run '$(PY) tools/gen_protos.py' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- sdk/python/cloudburst/v1 cloudburst_grpc/cloudburst_v1.binpb \
	  'cloudburst_grpc/security/consul_connectca_pb2*')" || \
	  (echo "untracked generated files in sdk/python/cloudburst/v1: commit them" && exit 1)

# The Go and TypeScript clients: generated code current (buf with the plugins pinned in
# tools/codegen/go.mod and sdk/typescript/package.json), `go vet` and `tsc --strict` clean.
clients-check: $(BUF) $(TS_DEPS)
	bash tools/gen_clients.sh
	git diff --exit-code -- sdk/go sdk/typescript/src/gen || \
	  (echo "the generated Go/TypeScript code is out of date: run 'tools/gen_clients.sh' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- sdk/go sdk/typescript/src/gen)" || \
	  (echo "untracked generated files in sdk/go or sdk/typescript/src/gen: commit them" && exit 1)

clients-lint: $(TS_DEPS)
	@test -z "$$(cd sdk/go && gofmt -l .)" || (cd sdk/go && gofmt -l . && echo "run gofmt -w sdk/go" && exit 1)
	cd sdk/go && go vet ./...
	sdk/typescript/node_modules/.bin/tsc -p sdk/typescript --noEmit --strict

# Build what the client tests run (the Go programs, the compiled TypeScript) and run each
# client's own unit tests. The TypeScript client's TLS tests read certificates that `cbgrpc certs`
# makes in a temporary directory (no openssl needed).
clients: setup $(TS_DEPS)
	cd sdk/go && go build ./... && go test ./...
	sdk/typescript/node_modules/.bin/tsc -p sdk/typescript
	certs=$$(mktemp -d) && trap 'rm -rf "$$certs"' EXIT && \
	  $(PY) -m cloudburst_grpc certs "$$certs/certs" --client admin >/dev/null && \
	  CLOUDBURST_TEST_CERTS="$$certs/certs" node --test \
	    sdk/typescript/dist/test/unit.test.js sdk/typescript/dist/test/transport.test.js \
	    sdk/typescript/dist/test/opstream.test.js sdk/typescript/dist/test/chunks.test.js \
	    sdk/typescript/dist/test/writes.test.js sdk/typescript/dist/test/deadlines.test.js

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup valkey
	$(PY) -m pytest -q tests/integration

e2e: setup consul
	$(PY) -m pytest -q tests/e2e

# Benchmarks: latency and throughput against the gRPC floor and Ray, in one run
# (bench/README.md), then the KVS over Valkey against the bare engine (bench/valkey.py).
# Reports in bench/results/; `make bench ARGS=--quick` for a smoke run.
.PHONY: bench
bench: setup
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) -m pip install --quiet -r bench/requirements-ray.txt || \
	  echo "bench: Ray could not be installed; it is optional and the report will say so"
	$(PY) -m bench.run $(ARGS)
	bash tools/valkey/install.sh
	$(PY) -m bench.valkey $(ARGS)

# deploy/terraform's checks (tests/deploy): OpenTofu, tflint and its AWS ruleset from the Go
# module proxy, checkov from PyPI, and cloud-init's schema from Debian's package (unpacked,
# not installed), each cached outside the repository by version: only a fresh machine pays.
.PHONY: terraform-tools terraform-e2e tofu tflint checkov cloud-init
terraform-tools: tofu tflint checkov cloud-init
tofu:
	bash tools/tofu/build.sh >/dev/null
tflint:
	bash tools/tflint/build.sh >/dev/null
checkov:
	bash tools/checkov/install.sh >/dev/null
cloud-init:
	bash tools/cloud-init/install.sh >/dev/null

# Optional, never in CI (deploy/terraform/README.md): builds the AWS provider from the Go
# module proxy (~25 minutes and ~10 GB of memory when cold), then validates and tests the
# whole tree with it, and plans, applies and destroys the example against a moto server.
terraform-e2e: setup terraform-tools
	bash deploy/terraform/e2e/run.sh
