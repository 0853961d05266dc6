# Two commands for a fresh clone: `make demo` (install + run the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
DEMO_N ?= 2000
HOST ?= 127.0.0.1
PORT ?= 8000
REDIS_PORT ?= 6379

.PHONY: install demo eval bench test lint redis browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision resolve from this machine's local wheels (see README)
	$(PY) -m pip install --quiet --editable '.[dev]'
	# the Compose Specification's JSON schema (shipped inside docker-compose 1.29's wheel) for the deploy test
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/share/compose 'docker-compose==1.29.2'
	touch $@

install: $(STAMP)

# a few thousand captioned scenes (with their hard twins), indexed, then served with the web page
demo: install
	test -f $(DEMO_DIR)/images/captions.jsonl || $(BIN)/imsearch scenes $(DEMO_DIR)/images --n $(DEMO_N) --twins
	$(BIN)/imsearch index build $(DEMO_DIR)/images/captions.jsonl --out $(DEMO_DIR)/index
	$(BIN)/imsearch serve --index demo=$(DEMO_DIR)/index --host $(HOST) --port $(PORT)

# the quality figures of the committed checkpoints (encoder recall, the speed/depth table)
eval: install
	$(BIN)/imsearch eval encoder
	$(BIN)/imsearch eval tradeoff --errors

# every benchmark at bounded sizes (about 18 min on 2 cores), then BENCHMARKS.md and bench/tradeoff.png
bench: install redis
	$(PY) -m pip install --quiet --editable '.[bench]'
	$(PY) bench/report.py --run

redis:
	@$(PY) -c "import redis; redis.Redis(host='127.0.0.1', port=$(REDIS_PORT)).ping()" 2>/dev/null \
	  || redis-server --daemonize yes --port $(REDIS_PORT) --save "" --appendonly no
	@for i in 1 2 3 4 5 6 7 8 9 10; do \
	  $(PY) -c "import redis; redis.Redis(host='127.0.0.1', port=$(REDIS_PORT)).ping()" 2>/dev/null && exit 0; sleep 0.5; \
	done; echo "redis did not start on 127.0.0.1:$(REDIS_PORT)"; exit 1

lint: install
	$(BIN)/ruff check indexer reranker service tests bench
	$(BIN)/mypy

# Debian's Chromium and ChromeDriver for the web page's browser test
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

test: install redis browser lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
