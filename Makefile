# Two commands for a fresh clone: `make demo` (install + run the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
DEV := $(VENV)/.dev
DEMO_DIR ?= data/demo
DEMO_N ?= 2000
HOST ?= 127.0.0.1
PORT ?= 8000
REDIS_PORT ?= 6379

.PHONY: install dev demo eval bench test lint redis browser clean

# the service's own dependencies only (torch and torchvision resolve from this machine's local wheels)
$(RUNTIME): pyproject.toml
	@echo "==> [install] creating $(VENV) and installing imsearch with its runtime dependencies (about 2 min)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet --editable .
	@touch $@

# what the tests and linters need on top: pytest, ruff, mypy, selenium, Ray, transformers, ...
$(DEV): $(RUNTIME) pyproject.toml
	@echo "==> [install] adding the development tools to $(VENV)"
	@$(PY) -m pip install --quiet --editable '.[dev]'
	@# the Compose Specification's JSON schema (shipped inside docker-compose 1.29's wheel) for the deploy test
	@$(PY) -m pip download --quiet --no-deps --dest $(VENV)/share/compose 'docker-compose==1.29.2'
	@touch $@

install: $(RUNTIME)
dev: $(DEV)

# a few thousand captioned scenes (with their hard twins), indexed, then served with the web page;
# a rerun reuses both (rm -r $(DEMO_DIR) to start over)
demo: $(RUNTIME)
	@if test -f $(DEMO_DIR)/images/captions.jsonl; then echo "==> [scenes] reusing $(DEMO_DIR)/images"; \
	else echo "==> [scenes] drawing $(DEMO_N) captioned scenes and their hard twins into $(DEMO_DIR)/images"; \
	  $(BIN)/imsearch scenes $(DEMO_DIR)/images --n $(DEMO_N) --twins || exit 1; fi
	@if test -f $(DEMO_DIR)/index/CURRENT; then echo "==> [index] reusing the index in $(DEMO_DIR)/index"; \
	else echo "==> [index] encoding the scenes with the embedded model into $(DEMO_DIR)/index"; \
	  $(BIN)/imsearch index build $(DEMO_DIR)/images/captions.jsonl --index $(DEMO_DIR)/index || exit 1; fi
	@echo "==> [serve] open http://$(HOST):$(PORT) (another port: make demo PORT=8080; Ctrl-C stops)"
	@$(BIN)/imsearch serve --index demo=$(DEMO_DIR)/index --host $(HOST) --port $(PORT)

# the quality figures of the committed checkpoints (encoder recall, the speed/depth table)
eval: install
	$(BIN)/imsearch eval encoder
	$(BIN)/imsearch eval tradeoff --errors

# every benchmark at bounded sizes (about 30 min on 2 cores), then BENCHMARKS.md and bench/tradeoff.png
bench: dev redis
	$(PY) -m pip install --quiet --editable '.[bench]'
	$(PY) bench/report.py --run

redis: $(RUNTIME)
	@$(PY) -c "import redis; redis.Redis(host='127.0.0.1', port=$(REDIS_PORT)).ping()" 2>/dev/null \
	  || redis-server --daemonize yes --port $(REDIS_PORT) --save "" --appendonly no
	@for i in 1 2 3 4 5 6 7 8 9 10; do \
	  $(PY) -c "import redis; redis.Redis(host='127.0.0.1', port=$(REDIS_PORT)).ping()" 2>/dev/null && exit 0; sleep 0.5; \
	done; echo "redis did not start on 127.0.0.1:$(REDIS_PORT)"; exit 1

lint: dev
	$(BIN)/ruff check imsearch indexer reranker service training tests bench
	$(BIN)/mypy

# Debian's Chromium and ChromeDriver for the web page's browser test
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

test: dev redis browser lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
