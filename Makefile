# The two commands a newcomer needs: `make run` and `make test`. Both set themselves up.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test bench install redis-server chromium clean

run: $(STAMP)
	$(BIN)/sluice up

test: $(STAMP) redis-server chromium
	$(BIN)/pytest

# Every benchmark scenario on a fresh local stack; BENCH_ARGS passes options (e.g. --smoke).
bench: $(STAMP) redis-server
	$(BIN)/python -m bench.run $(BENCH_ARGS)

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

# Integration tests start their own redis-server; install it where it is missing and we can.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
		else \
			echo "redis-server is missing: install it (e.g. sudo apt-get install redis-server)" >&2; exit 1; \
		fi; }

# The dashboard's browser test drives Debian's Chromium (Playwright's own browser download cannot
# work offline); install it where it is missing and we can, else that test skips and says why.
chromium:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium is missing (sudo apt-get install chromium): the dashboard browser test will skip" >&2; \
		fi; }

clean:
	rm -rf $(VENV) var .pytest_cache
