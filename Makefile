# babelsynth: `make demo` runs the pipeline end to end, `make test` runs the suite. Both set up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VVENV := .venv-vllm
STAMP_MAIN := $(VENV)/.installed
STAMP_VLLM := $(VVENV)/.installed
export BABELSYNTH_VLLM_PYTHON := $(abspath $(VVENV))/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONWARNINGS := ignore

.PHONY: setup demo test test-fast models clean lint ruff postgres

setup: $(STAMP_MAIN) $(STAMP_VLLM)

# Main env: Airflow 3 + CPU ML stack, installed from the committed freeze (no resolve at install time).
$(STAMP_MAIN): requirements/main.lock.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade 'pip==26.3'
	$(VENV)/bin/pip install -q -r requirements/main.lock.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

# vLLM env: exact freeze, --no-deps so torchaudio/torchcodec/triton (broken or unused on CPU) never install.
$(STAMP_VLLM): requirements/vllm.lock.txt scripts/patch_torchvision.py
	test -x $(VVENV)/bin/python || $(PY) -m venv $(VVENV)
	$(VVENV)/bin/pip install -q --upgrade 'pip==26.3'
	$(VVENV)/bin/pip install -q --no-deps -r requirements/vllm.lock.txt
	$(VVENV)/bin/python scripts/patch_torchvision.py
	$(VVENV)/bin/python -c "import vllm, torchvision" 
	touch $@

models: $(STAMP_MAIN)
	$(VENV)/bin/python -m tinymodels build --root .work/models

demo: setup
	$(VENV)/bin/python scripts/demo.py

# The real-scheduler test starts a private PostgreSQL cluster from the Debian package (installed once).
postgres:
	@test -d /usr/lib/postgresql || { apt-get update && apt-get install -y --no-install-recommends postgresql; }

# Formatting and lint first: CI runs `make test`, so a file ruff would change fails CI.
ruff: $(STAMP_MAIN)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: setup postgres ruff
	$(VENV)/bin/python -m pytest -q tests

test-fast: $(STAMP_MAIN)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

lint: ruff
	$(VENV)/bin/hadolint docker/*.Dockerfile

clean:
	rm -rf .work
