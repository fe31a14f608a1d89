# scenecast: the two commands a newcomer needs are `make run` and `make test`.
# Both install what is missing (Debian packages, a Python venv for the model tools), fetch and
# verify the models into the cache, and build. Everything heavy lives in the cache, outside the
# repository, so a second run is fast: models, the venv and the cargo target directory.

SHELL := /bin/bash
CACHE ?= $(or $(SCENECAST_CACHE),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME)/scenecast,$(HOME)/.cache/scenecast))
export SCENECAST_CACHE := $(CACHE)
export CARGO_TARGET_DIR ?= $(CACHE)/target
VENV := $(CACHE)/venv
PY := $(VENV)/bin/python
CARGO ?= cargo
# Build tools for llama.cpp (cmake, clang for bindgen), Python for the model tools, the fetch clients,
# for the tests a real MQTT broker and openssl (TLS certificates), and mosquitto_pub/_sub for the
# README's examples.
APT_PACKAGES := cmake clang libclang-dev python3 python3-venv python3-pip dpkg-dev ca-certificates mosquitto mosquitto-clients openssl systemd

.PHONY: run test lint deps venv models build bench fuzz bench-fleet bench-peer check check-unit deb check-deb cross deb-arm64 train-venv projector eval generator generator-eval generator-models tiny-vlm check-ort-arm64 check-arm64

## run: set up everything, then run the main job on the embedded default (Ctrl-C stops it)
run: deps models build
	$(CARGO) run --release --quiet -- run --demo

## test: set up everything, then run every test (the tests use Gemma-3 as a second architecture)
test: FETCH_ARGS += --gemma
test: deps models lint
	$(CARGO) test --release
	$(CARGO) build --release --benches
	$(MAKE) --no-print-directory check-unit check-deb

## lint: rustfmt and clippy (warnings are errors); part of `make test`
lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets --quiet -- -D warnings

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "error: need root (or sudo) to install:$$missing" >&2; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found. Install a Rust toolchain >= 1.92 (rustup) and retry." >&2; exit 1; }
	@if ! $(CARGO) fmt --version >/dev/null 2>&1 || ! $(CARGO) clippy --version >/dev/null 2>&1; then \
	  command -v rustup >/dev/null || { echo "error: cargo fmt and cargo clippy are needed (rustup component add rustfmt clippy)" >&2; exit 1; }; \
	  rustup component add rustfmt clippy; \
	fi

$(PY): models/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r models/requirements.txt
	touch $(PY)

venv: $(PY)

## models: fetch and verify the reference models into $(CACHE)/models
models: venv
	$(PY) models/fetch.py --cache $(CACHE) $(FETCH_ARGS)

build: deps
	$(CARGO) build --release

# Training tools (not needed to run or test): torch, transformers, diffusers in their own venv.
TRAIN_VENV := $(CACHE)/train-venv
TRAIN_PY := $(TRAIN_VENV)/bin/python

$(TRAIN_PY): models/requirements-train.txt
	python3 -m venv $(TRAIN_VENV)
	$(TRAIN_PY) -m pip install --quiet -r models/requirements-train.txt
	touch $(TRAIN_PY)

train-venv: $(TRAIN_PY)

# The projector's training configuration (models/projector/train-v15.toml: the shipped one, 82
# categories, patch features with the COCO detector's and the ImageNet classifier's scores fused in
# per cell, the adapter on the scene prefix only; train-v7.toml the same with the COCO detector
# alone, the reference before it; train-v5.toml an earlier one (adapter on every token), train-v6.toml
# v5 without the frame maximum, train-v3.toml without the detector, train-v4.toml with it as three
# more tokens; train.toml is v1's 15, train-v2.toml the first 80-category run; train-v8.toml (CIFAR-10),
# train-v9.toml (the adapter on each question too), train-v10.toml (on questions, not captions),
# train-v11.toml (v7 in 640 LLM steps, the 60-minute budget), train-v12.toml (v11 with the
# encoder's CLS as a 65th image token), train-v13.toml (v7 with that token), train-v14.toml (v11
# with an ImageNet classifier beside the detector), train-v16.toml (v15 with feature dropout and a
# bfloat16 LLM), train-v17.toml (v15 with the bfloat16 LLM alone) and train-v18.toml (v16 with
# another training seed) runs that were not shipped; models/README.md).
PROJECTOR_CONFIG ?= models/projector/train-v15.toml
PROJECTOR_NAME = $(shell sed -n 's/^name = "\(.*\)"/\1/p' $(PROJECTOR_CONFIG) | head -n 1)
CANDIDATE = $(CACHE)/train/$(PROJECTOR_NAME)/candidate.toml

## projector: train the input projector from scratch (v15: about 95 min on 2 cores; models/README.md)
projector: FETCH_ARGS += --train
projector: deps models train-venv
	$(TRAIN_PY) models/train_projector.py --cache $(CACHE) --config $(PROJECTOR_CONFIG)

## eval: evaluate through the Rust pipeline on the held-out set: the projector `make projector` just
## trained when there is one (its candidate.toml, whose caption check is calibrated first on the set's
## scenes of training objects), else the shipped one (models/README.md)
EVAL_SET = $(CACHE)/train/$(PROJECTOR_NAME)/eval/eval.json
# A candidate's check is calibrated as the reference's (the classifier's threshold on the whole
# photos, set against the photos of unknown things the projector trained on when the set has them),
# and its captions and answers are guided as the reference's are (`grounding.guide_threshold`,
# `positions`); `make eval GUIDE=` judges it without guides.
GUIDE ?= 0.99
eval: FETCH_ARGS += --train
eval: deps models build
	$(PY) models/train_projector.py --cache $(CACHE) --config $(PROJECTOR_CONFIG) --eval-set-only
	$(if $(wildcard $(CANDIDATE)),$(CARGO) run --release --quiet -- --config $(CANDIDATE) calibrate $(EVAL_SET) --classifier-kind photo $$(grep -q '"kind": "unknown-photo"' $(EVAL_SET) && echo --unknown-kind unknown-photo) $(if $(GUIDE),--guide $(GUIDE) --place) --write $(CACHE)/train/$(PROJECTOR_NAME)/candidate-manifest.toml)
	$(CARGO) run --release --quiet -- $(if $(wildcard $(CANDIDATE)),--config $(CANDIDATE)) eval $(EVAL_SET) --report models/projector/$(PROJECTOR_NAME).eval.md

## generator: train and distil the generator, then its output projector (about 60 min on 2 cores; models/generator/README.md)
GENERATOR_CONFIG ?= models/generator/train.toml
GENERATOR_NAME = $(shell sed -n 's/^name = "\(.*\)"/\1/p' $(GENERATOR_CONFIG) | head -n 1)
GENERATOR_CANDIDATE = $(CACHE)/train/$(GENERATOR_NAME)/candidate.toml
generator: FETCH_ARGS += --train
generator: deps models train-venv
	$(CARGO) build --release --example signal_states
	$(TRAIN_PY) models/train_generator.py --cache $(CACHE) --config $(GENERATOR_CONFIG) --signal-states $(CARGO_TARGET_DIR)/release/examples/signal_states

## generator-eval: the round trip: render prompts, caption them with scenecast (about 15 min): the run
## `make generator` just made when there is one (its candidate.toml), else the shipped generator
generator-eval: FETCH_ARGS += --train
generator-eval: deps models build train-venv
	$(TRAIN_PY) models/eval_generator.py --cache $(CACHE) --config $(GENERATOR_CONFIG) --scenecast $(CARGO_TARGET_DIR)/release/scenecast $(if $(wildcard $(GENERATOR_CANDIDATE)),--candidate $(GENERATOR_CANDIDATE))

## generator-models: rewrite the tiny generator test models and sampler fixtures (models/generator)
generator-models: train-venv
	$(TRAIN_PY) models/make_generator.py

## tiny-vlm: rewrite the tiny random SmolVLM-layout test model (models/tiny-vlm; make_tiny_vlm.py)
# llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py) comes from the llama-cpp-python
# sdist on PyPI, verified by sha256; nothing of it is built.
LLAMA_CPP_SDIST := llama_cpp_python-0.3.36.tar.gz
LLAMA_CPP_SDIST_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_SRC := $(CACHE)/tools/llama_cpp_python-0.3.36/vendor/llama.cpp
tiny-vlm: train-venv models
	mkdir -p $(CACHE)/tools
	test -f $(CACHE)/tools/$(LLAMA_CPP_SDIST) || $(TRAIN_PY) -m pip download --quiet --no-deps --no-binary=:all: \
	  llama-cpp-python==0.3.36 -d $(CACHE)/tools
	echo "$(LLAMA_CPP_SDIST_SHA256)  $(CACHE)/tools/$(LLAMA_CPP_SDIST)" | sha256sum --check --quiet
	tar -xzf $(CACHE)/tools/$(LLAMA_CPP_SDIST) -C $(CACHE)/tools llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-0.3.36/vendor/llama.cpp/conversion llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
	$(TRAIN_PY) models/make_tiny_vlm.py --cache $(CACHE) --llama-cpp $(LLAMA_CPP_SRC) --out models/tiny-vlm

## fuzz: every parser of outside input (MQTT requests, offloaded jobs, the config file) under 1,000,000 property-test cases per property (a few minutes; `make test` runs 3,000 and the kept corpus)
FUZZ_CASES ?= 1000000
fuzz: deps
	SCENECAST_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --release --test wire_fuzz

## bench-fleet: load on the MQTT side: 20 clients x 50 questions against one daemon, and renders offloaded to 3 workers with one killed (real Mosquitto; a few minutes)
bench-fleet: deps models
	$(CARGO) bench --bench fleet

# The Python peer of bench-peer (onnxruntime + llama-cpp-python, built from its sdist: minutes).
# Its llama.cpp is built with the CPU flags llama-cpp-sys-2 builds scenecast's with (AVX2, FMA, F16C,
# BMI2; no -march=native, AVX-512, AMX or OpenMP), so the race compares the wrappers, not compilers.
# (A native build, with AMX and OpenMP, crashed on its first decode on this kind of machine.)
PEER_VENV := $(CACHE)/peer-venv
PEER_PY := $(PEER_VENV)/bin/python
PEER_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

$(PEER_PY): benches/peer/requirements.txt
	python3 -m venv $(PEER_VENV)
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" $(PEER_PY) -m pip install --quiet --no-cache-dir -r benches/peer/requirements.txt
	touch $(PEER_PY)

## bench-peer: scenecast against the same caption written in Python (onnxruntime + llama-cpp-python): latency, memory, cold start, same text; then the daemon's footprint (a few minutes after the peer's venv)
bench-peer: deps models build $(PEER_PY)
	$(CARGO) build --release --example preprocess_dump
	$(PEER_PY) benches/peer/run.py --cache $(CACHE) --scenecast $(CARGO_TARGET_DIR)/release/scenecast \
	  --preprocess-dump $(CARGO_TARGET_DIR)/release/examples/preprocess_dump

## bench: the benchmarks (ratios against baselines measured in the same process)
bench: deps models
	$(CARGO) bench

check: build
	$(CARGO) run --release --quiet -- models check

## check-unit: systemd-analyze verify and security (exposure <= 2.0) on systemd/scenecast.service and scenecast-worker.service
check-unit: build
	bash systemd/check.sh $(CARGO_TARGET_DIR)/release/scenecast
	bash systemd/check.sh $(CARGO_TARGET_DIR)/release/scenecast systemd/scenecast-worker.service

## deb: the Debian package of this machine's architecture (cargo-deb is installed if missing)
deb: build
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	$(CARGO) deb --no-build --strip

## check-deb: install the package into a fresh dpkg root; upgrade and removal keep the config
check-deb: deb
	bash cross/check-deb.sh $$(ls -t $(CARGO_TARGET_DIR)/debian/scenecast_*.deb | head -n 1)

## cross: build for aarch64 and run the unit tests under qemu (see cross/README.md)
cross:
	bash cross/build-aarch64.sh

## check-ort-arm64: load ONNX Runtime's aarch64 library under qemu-user on four CPU models (about a minute)
check-ort-arm64: FETCH_ARGS += --arch all
check-ort-arm64: models
	bash cross/check-ort-arm64.sh

## check-arm64: both cross builds under qemu (dotprod as a Cortex-A76, armv8.0 as a Cortex-A72) next to x86-64: models check, two captions, one answer (~6 min + the cross builds)
check-arm64: FETCH_ARGS += --arch all
check-arm64: models build
	bash cross/check-arm64.sh

## deb-arm64: the arm64 .deb from the cross build
deb-arm64:
	bash cross/build-aarch64.sh --no-test
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	$(CARGO) deb --no-build --strip --target aarch64-unknown-linux-gnu
