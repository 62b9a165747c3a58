# Two commands: `make demo` (the main job) and `make test` (the tests).
# Each creates or refreshes .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REFSTAMP := $(VENV)/.refs-installed
ZOOSTAMP := $(VENV)/.zoo-installed
PIP := $(BIN)/python -m pip
# One thread per process: on a 2-core machine that is busy (CI runners, other jobs) two
# threads oversubscribe it (measured: `make test` 12 min with 2 threads under load vs 70 s
# with 1). Override with `make test OMP_NUM_THREADS=2` on an idle machine.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= $(OMP_NUM_THREADS)
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-all lint bench venv clean docs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,examples,docs]"
	touch $(STAMP)

# Reference libraries for side-by-side tests and benchmarks; installed without their
# extra dependencies so that torch stays the pinned CPU build (no torchvision).
$(REFSTAMP): $(STAMP)
	$(PIP) install -c constraints.txt einops opt-einsum unfoldNd einconv
	$(PIP) install -c constraints.txt --no-deps laplace-torch==0.3 curvlinops-for-pytorch==3.0.1 \
		backpack-for-pytorch==1.7.1 asdfghjkl torchmetrics lightning-utilities laplace-bayesopt
	$(PIP) install -c constraints.txt --no-deps neuraloperator==2.0.0 tensorly tensorly-torch
	touch $(REFSTAMP)

# Model zoos for the zoo test matrix and docs/zoo.md (never imported by the library itself):
# --no-deps so torch stays the pinned CPU build. The torchvision built for torch 2.13 on the
# index is a CUDA build whose compiled operators cannot load beside the CPU torch;
# tools/patch_torchvision.py guards its two unconditional fake-kernel registrations so that
# `import torchvision` (and timm, and Hugging Face's vision probes) works; models are pure
# Python and unaffected (only detection ops such as nms stay unavailable).
$(ZOOSTAMP): $(REFSTAMP)
	$(PIP) install -c constraints.txt --no-deps torchvision==0.28.0 timm==1.0.31 \
		transformers==5.25.0 peft==0.22.0 accelerate==1.16.0
	$(PIP) install -c constraints.txt huggingface-hub safetensors tokenizers regex pyyaml \
		packaging psutil
	# influence functions' peer (benchmarks/influence.py, notebooks/influence_mislabeled.ipynb):
	# its dependencies (accelerate, einops, einconv, opt-einsum, safetensors, tqdm) are above
	$(PIP) install -c constraints.txt --no-deps kronfluence==1.0.1
	$(BIN)/python tools/patch_torchvision.py
	$(BIN)/python -c "import torchvision, timm, transformers, peft, kronfluence.analyzer"
	touch $(ZOOSTAMP)

venv: $(ZOOSTAMP)

demo: $(STAMP)
	$(BIN)/bayescurv demo

# the documentation site, strictly: a broken page, link or API reference fails the build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet
	@echo "documentation site written to build/site/index.html (open it in a browser)"

test: $(ZOOSTAMP) docs
	$(BIN)/python -m pytest -q -m "not slow" tests
	$(BIN)/python -m pytest -q --nbmake notebooks

test-all: $(ZOOSTAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check bayescurv tests benchmarks examples

bench: $(REFSTAMP)
	$(BIN)/python benchmarks/curvature.py

clean:
	rm -rf $(VENV) build *.egg-info
