# GPU worker: CUDA, CTranslate2, COMET, torch (CUDA build), babelsynth. A Kubernetes pod runs
# `babelsynth run-stage --config ... --run-id ... --stage ... --shard ...` (the entrypoint is the CLI); the
# same image with `--entrypoint airflow` is a LocalExecutor/Celery worker in docker/compose.yaml.
# Models are mounted at /models, the Hugging Face cache (COMET's encoder config + tokenizer) at /opt/hf-home and
# the request cache at /var/cache/babelsynth; nothing is fetched from a model hub at run time.
# CUDA: CTranslate2 4.x loads cuBLAS 12 (libcublas.so.12, from this base image); torch 2.13's CUDA build is the
# PyPI wheel, which brings CUDA 13.0 as pip packages (cuda-toolkit 13.0.3). Host driver >= 580.
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/opt/hf-home BABELSYNTH_CACHE_DIR=/var/cache/babelsynth \
    PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/babelsynth AIRFLOW__CORE__DAGS_FOLDER=/opt/babelsynth/dags
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow
# The caches the stages write (babelsynth's request cache, the HF cache) belong to the user the tasks run as.
RUN mkdir -p /var/cache/babelsynth /opt/hf-home \
 && chown -R 50000:0 /var/cache/babelsynth /opt/hf-home \
 && chmod -R g+rwX /var/cache/babelsynth /opt/hf-home
WORKDIR /opt/babelsynth
COPY requirements/main.lock.txt requirements/main.lock.txt
# The lock pins the CPU torch build the tests run; here torch is PyPI's CUDA 13.0 build of the same version.
RUN grep -v '^torch==' requirements/main.lock.txt > /tmp/lock-no-torch.txt \
 && pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir -r /tmp/lock-no-torch.txt \
 && rm /tmp/lock-no-torch.txt
COPY pyproject.toml README.md ./
COPY src/ src/
COPY prompts/ prompts/
COPY schemas/ schemas/
# A regular (non-editable) install: prompts/ and schemas/ go into the wheel as package data, so the source
# folders are removed and nothing at run time reads a checkout.
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build src prompts schemas
COPY configs/ configs/
COPY dags/ dags/
COPY operators/ operators/
# Smoke check in the image as it will run: babelsynth imports and loads a prompt and a schema with no source
# tree left (tests/test_docker.py replays these install steps in a fresh venv).
RUN python -c "import babelsynth.cli, babelsynth.runner, ctranslate2, comet, torch; \
from babelsynth.prompts import load_prompt; from babelsynth.schema import arrow_schema; \
load_prompt('recaption', 'captioning'); arrow_schema('samples')"
USER 50000
ENTRYPOINT ["babelsynth"]
CMD ["--help"]
