# GPU worker: CUDA, CTranslate2, COMET, torch (CUDA build), babelsynth. A Kubernetes pod runs
# `babelsynth run-stage --config ... --run-id ... --stage ... --shard ...` (the entrypoint is the CLI); the
# same image with `--entrypoint airflow` is a LocalExecutor/Celery worker in docker/compose.yaml.
# Models are mounted at /models; nothing is fetched from a model hub at run time.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH PYTHONPATH=/opt/babelsynth AIRFLOW__CORE__DAGS_FOLDER=/opt/babelsynth/dags
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow
WORKDIR /opt/babelsynth
COPY requirements/main.lock.txt requirements/main.lock.txt
# The lock pins the CPU torch build the tests run; here torch comes from the CUDA index instead.
RUN grep -v '^torch==' requirements/main.lock.txt > /tmp/lock-no-torch.txt \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
 && pip install --no-cache-dir -r /tmp/lock-no-torch.txt \
 && rm /tmp/lock-no-torch.txt
COPY pyproject.toml README.md ./
COPY src/ src/
COPY prompts/ prompts/
COPY schemas/ schemas/
COPY configs/ configs/
COPY dags/ dags/
COPY operators/ operators/
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import babelsynth.cli, babelsynth.runner, ctranslate2, comet, torch"
USER 50000
ENTRYPOINT ["babelsynth"]
CMD ["--help"]
