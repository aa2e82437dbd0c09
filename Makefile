# The project's interface. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch on this disk for dev and CI; users get a normal range from pyproject.toml.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo-out

.PHONY: install demo test test-engines lint format suite fuzz mutate bench docs clean test-trainers test-peers

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	bash scripts/demo.sh $(DEMO_DIR)

lint: install
	$(BIN)/ruff check llamapro_cli tests bench scripts
	$(BIN)/ruff format --check llamapro_cli tests bench scripts
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix llamapro_cli tests bench scripts
	$(BIN)/ruff format llamapro_cli tests bench scripts

suite: install
	$(BIN)/pytest -n 2 -q

test: lint suite

fuzz: install
	LLAMAPRO_FUZZ_EXAMPLES=20000 $(BIN)/pytest -q tests/test_fuzz.py

# Opt-in (not in `test`): plant each curated bug in the verifiers, expect the tests to catch it.
mutate: install
	$(BIN)/python scripts/mutate.py

# make bench FS=xfs (or btrfs, ext4): on a loop-mounted image of that filesystem (root); BENCH_ARGS
# passes more options, e.g. BENCH_ARGS="--sizes 1b --runs 1".
bench: install
	$(BIN)/python bench/run.py $(if $(FS),--fs $(FS)) $(BENCH_ARGS)

docs: install
	$(BIN)/python -m mkdocs build --strict

# Opt-in (not part of `test`): LLaMA-Factory's own code against llamapro's port of its rule, in a venv
# of its own (torch pinned by the constraint file; its CUDA-linked torchvision/torchaudio removed).
TRAINERS_VENV := .venv-trainers
TRAINERS_STAMP := $(TRAINERS_VENV)/.installed
TRAINERS_PIP := $(TRAINERS_VENV)/bin/pip install --quiet -c scripts/trainers-constraints.txt

$(TRAINERS_STAMP): pyproject.toml scripts/trainers-constraints.txt
	$(PYTHON) -m venv $(TRAINERS_VENV)
	$(TRAINERS_PIP) --upgrade pip
	$(TRAINERS_PIP) "$(TORCH_PIN)"
	$(TRAINERS_PIP) llamafactory pytest
	$(TRAINERS_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio
	$(TRAINERS_PIP) -e .
	touch $(TRAINERS_STAMP)

test-trainers: $(TRAINERS_STAMP)
	$(TRAINERS_VENV)/bin/pytest -q -p no:randomly -m trainers tests/test_trainer_ports.py

# Opt-in (not part of `test`): `llamapro relayer` against mergekit's passthrough on tiny Qwen2, Gemma 2 and
# Llama models, by logits against the source layers run by hand; mergekit runs as a subprocess from its own
# venv under bench/.work (created once, CPU torch pinned; the same one `make bench` uses).
test-peers: install
	$(BIN)/python bench/peers.py setup-mergekit
	$(BIN)/pytest -q -p no:randomly -p no:xdist tests/test_mergekit_peer.py

clean:
	rm -rf $(VENV) $(TRAINERS_VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache site

# Opt-in (not part of `test`): verify-identity in vLLM, llama.cpp and MLX, each in the environment
# `llamapro engines install` creates under ~/.cache/llamapro/engines (~15 min and ~5 GB the first time).
test-engines: install
	$(BIN)/llamapro engines install mlx
	$(BIN)/llamapro engines install vllm
	$(BIN)/llamapro engines install llama.cpp
	LLAMAPRO_ENGINE_TESTS=1 $(BIN)/pytest -q -p no:randomly -p no:xdist tests/engines
