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

.PHONY: setup demo test rehearsal test-fast models clean lint ruff postgres chromium stack stack-down stack-status

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

# A real local Airflow 3 on this machine (no GPU, no Docker): PostgreSQL, api-server, scheduler, dag-processor,
# triggerer and the tiny vLLM servers, all long-lived on 127.0.0.1 (localstack/). PYTHONWARNINGS is not
# passed on: the services' logs keep the warnings that matter. Override ports with STACK_ARGS="--api-port 8081".
stack: setup postgres
	$(VENV)/bin/python -m localstack up $(STACK_ARGS)

stack-down:
	$(VENV)/bin/python -m localstack down $(STACK_ARGS)

stack-status:
	$(VENV)/bin/python -m localstack status $(STACK_ARGS)

# The real-scheduler test starts a private PostgreSQL cluster from the Debian package (installed once).
postgres:
	@test -d /usr/lib/postgresql || { apt-get update && apt-get install -y --no-install-recommends postgresql; }

# The report test renders report.html in a real headless browser: Debian's chromium (installed once).
chromium:
	@command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; }

# Formatting and lint first: CI runs `make test`, so a file ruff would change fails CI.
ruff: $(STAMP_MAIN)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: setup postgres chromium ruff
	$(VENV)/bin/python -m pytest -q tests

# configs/production.yaml end to end on CPU with tiny trained models (part of `test`; this runs it alone)
rehearsal: setup
	$(VENV)/bin/python -m pytest -q -m rehearsal tests/test_production.py

test-fast: $(STAMP_MAIN)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

lint: ruff
	$(VENV)/bin/hadolint docker/*.Dockerfile

clean:
	rm -rf .work
