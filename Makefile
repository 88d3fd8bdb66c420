# edged — `make serve` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps, each named by pyproject.toml's checksum (a changed pyproject.toml reinstalls):
# RUNTIME_STAMP when edged and its runtime dependencies are installed (all `make serve`
# needs), STAMP when the dev/test extras and pynq are too (everything else). Installing the
# dev stack also satisfies the runtime stamp; the runtime install never satisfies STAMP.
CHECKSUM      := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUNTIME_STAMP := $(VENV)/.runtime-$(CHECKSUM)
STAMP         := $(VENV)/.installed-$(CHECKSUM)
GRPC_ADDRESS ?= 127.0.0.1:8001

.PHONY: install federated-env serve test test-tools protos protos-check models lint typecheck bench bench-paired bench-native clean deb fuzz lock

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,pynq]'
	# pynq pins numpy<2 and an old grpcio; its code runs beside numpy 2 (docs/adr/0002)
	$(BIN)/python -m pip install -q --no-deps pynq==4.0.0 pynqutils==0.1.3
	rm -f $(VENV)/.installed-* $(VENV)/.runtime-* && touch $@ $(RUNTIME_STAMP)

# The runtime only: what `edged serve` imports, no test, build or lint tools.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	rm -f $(VENV)/.runtime-* && touch $@

# The federated environment (docs/adr/0012): Flower (protobuf<7) and NumPy beside edged's own
# code (--no-deps), apart from .venv (protobuf 7). The daemon's Flower clients and
# `edged-fleet federate` run in it; the federated tests skip, saying why, without it.
FED_VENV  := $(VENV)-federated
FED_STAMP := $(FED_VENV)/.installed-$(shell cat pyproject.toml packaging/federated/requirements.txt | cksum | cut -d' ' -f1)

$(FED_STAMP): pyproject.toml packaging/federated/requirements.txt
	test -x $(FED_VENV)/bin/python || $(PYTHON) -m venv $(FED_VENV)
	$(FED_VENV)/bin/python -m pip install -q -r packaging/federated/requirements.txt
	$(FED_VENV)/bin/python -m pip install -q --no-deps -e .
	rm -f $(FED_VENV)/.installed-* && touch $@

federated-env: $(FED_STAMP)

install: $(STAMP) $(FED_STAMP)

serve: $(RUNTIME_STAMP)
	@echo "edged: serving ./models on $(GRPC_ADDRESS) (Ctrl-C stops it)."
	@echo "edged: in another shell, send a request:"
	@echo "    $(BIN)/edged infer digits --address $(GRPC_ADDRESS) --input input=models/digits/sample.npy"
	@echo "edged: ZeroMQ on tcp://127.0.0.1:5555 (from Python: edged.client.ZmqClient)."
	$(BIN)/edged serve --models models --grpc-address $(GRPC_ADDRESS)

# perf_analyzer (inside the tritonclient wheel) links libb64 from Debian; the .deb tests need
# debhelper, lintian and pip (building), debootstrap (the Debian 12/13 root filesystems, cached
# in /var/cache/edged-test) and qemu-user-static + binfmt-support (arm64 under emulation);
# buildah builds Dockerfile.arm64. Tests say why they skip or fail where one is missing.
TEST_DEBS := libb64-0d debhelper lintian python3-pip debootstrap qemu-user-static \
	binfmt-support buildah
test-tools:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing$$missing (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	    >/dev/null 2>&1 || echo "make: could not install$$missing; tests needing them say so"; \
	fi

test: $(STAMP) $(FED_STAMP) test-tools lint typecheck
	$(BIN)/python -m pytest

# Long fuzzing runs of the harnesses in tests/fuzz/ (`make test` runs them briefly): atheris
# for FUZZ_SECONDS (60) per harness where it installs (x86-64 wheels), else hypothesis.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install -q atheris \
	  || echo "make: atheris did not install; fuzzing with hypothesis instead"
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m tests.fuzz.run

# Throughput/latency against in-process ONNX Runtime, the cost of TLS and mutual TLS, then
# start-up time and idle memory; JSON on stdout (also written to bench-*.json), tables on stderr.
bench: $(STAMP) test-tools
	$(BIN)/python benchmarks/serving.py --out bench-serving.json > /dev/null
	$(BIN)/python benchmarks/tls.py --out bench-tls.json > /dev/null
	$(BIN)/python benchmarks/startup.py | tee bench-startup.json

# The paired table of docs/performance.md: the limit (best in-process layout) measured beside
# every server window; edged and the minimal prototypes over gRPC and ZeroMQ at concurrency
# 1/4/16; 3 interleaved repeats, every server freshly started (~6 min on 2 cores). Table on
# stderr (markdown), JSON in bench-paired.json.
bench-paired: $(STAMP)
	$(BIN)/python benchmarks/serving.py --models cls --repeats 3 --seconds 3 \
	  --servers edged,proto-zmq,proto-grpc-sync,proto-grpc-aio --transports grpc,zmq,zmq-sync,zmq-client \
	  --out bench-paired.json > /dev/null

# What a native gRPC frontend would cost per call: grpc++ echo against Python echoes (needs
# g++ pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc).
bench-native: $(STAMP)
	benchmarks/native_grpc/build.sh
	$(BIN)/python benchmarks/native_grpc/compare.py --out bench-native.json > /dev/null
	$(BIN)/python benchmarks/native_grpc/compare.py --payload digits --out bench-native-digits.json > /dev/null

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

protos-check: $(STAMP)
	$(BIN)/python tools/gen_protos.py --check

models: $(STAMP)
	$(BIN)/python models/build.py
	$(BIN)/python models/build_tflite.py
	$(BIN)/python models/build_trainable.py

# edged_<version>-1~deb12_<arch>.deb and edged-learn_... in dist/ (packaging/build-deb.sh, with
# debhelper; DEB_ARCH=arm64 for gateways, DEB_SUITE=trixie for Debian 13), then lintian.
DEB_ARCH ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB_SUITE ?= bookworm
deb: $(STAMP) test-tools
	PYTHON=$(BIN)/python packaging/build-deb.sh --arch $(DEB_ARCH) --suite $(DEB_SUITE) --out dist --lintian

# The .deb's lock files (packaging/requirements/SUITE.txt: every wheel's sha256), after a change
# to [project] dependencies or to pick up new releases. onnx (edged[learn]) goes to edged-learn.
lock: $(STAMP)
	cd packaging/requirements && for target in bookworm:3.11 trixie:3.13; do \
	  ../../$(BIN)/uv pip compile ../../pyproject.toml --extra learn -c constraints.txt \
	    --generate-hashes --python-version $${target#*:} --python-platform linux \
	    --only-binary :all: --custom-compile-command "make lock" --quiet -o $${target%:*}.txt || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
