# The two commands a newcomer needs: `make run` and `make test`. Both set themselves up.
comma := ,
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# One stamp per profile and version of the package metadata. A profile's install also stamps the
# profiles it contains (test contains bench and run; bench contains run), so switching between
# `make run` and `make test` in one checkout installs only what is missing, once.
SUM := $(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
STAMP_RUN := $(VENV)/.installed-run-$(SUM)
STAMP_BENCH := $(VENV)/.installed-bench-$(SUM)
STAMP_TEST := $(VENV)/.installed-test-$(SUM)

.PHONY: run test test-cluster lint format bench install redis-server chromium clean

# Running needs the package and the embedded extra only (no test, browser or plotting packages).
run: $(STAMP_RUN)
	$(BIN)/sluice up

# Lint first: it takes seconds and fails before anything is installed or started for the tests.
# The suite runs on TEST_WORKERS pytest-xdist workers (its integration tests mostly wait on the
# processes they start, so more workers than cores pays). --dist loadfile keeps each test module on
# one worker, in order, so a module's shared stack starts once, as in a serial run. (loadgroup, which
# could spread the other modules test by test, does not group under pytest 9.2 with xdist 3.8: xdist
# renames node ids through an attribute pytest 9 no longer reads.) `make test TEST_WORKERS=0` runs
# the suite in one process.
TEST_WORKERS ?= 4
test: lint redis-server chromium
	$(BIN)/pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
	$(CLUSTER_SWITCH) $(BIN)/pytest -q $(CLUSTER_IN_TEST)

# The end-to-end modules (the OpenAI SDK against a whole stack) with every stack that does not ask
# for a single Redis on a local Redis Cluster (3 masters, a replica each), plus the cluster's own
# tests; tests marked single_redis skip themselves under the switch. About 2 minutes on 2 cores.
# `make test` runs the suite (test_cluster_e2e.py and test_redis_cluster.py included) and then
# CLUSTER_IN_TEST, the SDK's end-to-end module, under the switch: one more cluster, ~30 s.
CLUSTER_SWITCH := SLUICE_TEST_REDIS=cluster
CLUSTER_E2E ?= tests/integration/test_end_to_end.py tests/integration/test_files.py \
	tests/integration/test_pagination.py tests/integration/test_cancel.py tests/integration/test_api_errors.py
CLUSTER_IN_TEST ?= tests/integration/test_end_to_end.py
CLUSTER_TESTS ?= tests/integration/test_cluster_e2e.py tests/test_redis_cluster.py
test-cluster: $(STAMP_TEST) redis-server
	$(CLUSTER_SWITCH) $(BIN)/pytest -n 2 --dist loadfile $(CLUSTER_E2E) $(CLUSTER_TESTS)

# ruff, then mypy (configured in setup.cfg's [mypy] sections; it takes no paths here).
# ruff's options live here, since ruff reads no setup.cfg and pyproject.toml holds only the build
# table; --isolated keeps a user's own ruff.toml out of it. The rules, each earning its place:
#   E4 E7 E9 F  pyflakes and pycodestyle's error classes: undefined or unused names, bad imports,
#               statements that are bugs (== None, bare except, lambda assigned), syntax errors
#   I           import order (one canonical order, so parallel branches merge imports cleanly)
#   B           bugbear: mutable defaults, closures over loop variables, raise without from
#   ASYNC       blocking calls (open, pathlib, sleep loops) inside async functions
#   PGH RUF100  every noqa and type: ignore names its code, and none is left unused
#   T10         no debugger breakpoints left behind
# Not enforced, on purpose:
#   B905      zip() without strict=: some zips truncate on purpose (a usage read with one more
#             field than it zips, pairwise windows); the rest zip pipeline replies with the
#             commands queued, equal by construction. strict= everywhere would change behaviour.
#   ASYNC109  a `timeout` parameter on an async function: a trio/anyio idiom; our helpers
#             (Recorder.settle, the tests' polling waits) compute with the bound they are given.
#   E1 E2 E3 E5 W and UP: layout is the formatter's job (`ruff format --check` below); UP would only
#             churn lines other branches edit.
LINT_PATHS := service workers tests bench
RUFF_RULES := E4,E7,E9,F,I,B,ASYNC,PGH,RUF100,T10
RUFF_IGNORE := B905,ASYNC109
RUFF_OPTS := --isolated --target-version py311 --line-length 120
# Paths whose formatting `ruff format --check` enforces (the tree was formatted in one commit,
# listed in .git-blame-ignore-revs); `make format` rewrites them.
FORMAT_PATHS ?= $(LINT_PATHS)

lint: $(STAMP_TEST)
	$(BIN)/ruff check $(RUFF_OPTS) --select $(RUFF_RULES) --ignore $(RUFF_IGNORE) $(LINT_PATHS)
	$(if $(strip $(FORMAT_PATHS)),$(BIN)/ruff format --check $(RUFF_OPTS) $(FORMAT_PATHS))
	$(BIN)/mypy

format: $(STAMP_TEST)
	$(BIN)/ruff format $(RUFF_OPTS) $(FORMAT_PATHS)

# Every benchmark scenario on a fresh local stack (the cluster scenario on a local 3-master Redis
# Cluster); BENCH_ARGS passes options (e.g. --smoke, --scenario cluster).
bench: $(STAMP_BENCH) redis-server
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# What a developer needs: everything the tests (the bench smoke test included) use.
install: $(STAMP_TEST)

# install-profile EXTRAS STAMPS: pip install the package with EXTRAS, drop the stamps of older
# package metadata, then touch STAMPS.
define install-profile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(1)]'
	find $(VENV) -maxdepth 1 -name '.installed-*' ! -name '.installed-*-$(SUM)' -delete
	touch $(2)
endef

$(STAMP_RUN): setup.cfg pyproject.toml
	$(call install-profile,embedded,$(STAMP_RUN))

$(STAMP_BENCH): setup.cfg pyproject.toml
	$(call install-profile,embedded$(comma)bench,$(STAMP_BENCH) $(STAMP_RUN))

$(STAMP_TEST): setup.cfg pyproject.toml
	$(call install-profile,embedded$(comma)bench$(comma)test,$(STAMP_TEST) $(STAMP_BENCH) $(STAMP_RUN))

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
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
