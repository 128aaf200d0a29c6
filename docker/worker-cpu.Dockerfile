# CPU worker: babelsynth with CTranslate2, COMET and torch (CPU build), plus tinymodels/ to build the tiny
# random models of the demo. docker/compose.yaml's `cpu` profile runs the init job and the LocalExecutor
# scheduler (which runs the tasks) from this image. Nothing is fetched from a model hub.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    AIRFLOW_HOME=/opt/airflow PYTHONPATH=/opt/babelsynth AIRFLOW__CORE__DAGS_FOLDER=/opt/babelsynth/dags
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow \
 && mkdir -p /models /work && chown 50000:0 /models /work
WORKDIR /opt/babelsynth
COPY requirements/main.lock.txt requirements/main.lock.txt
# The lock is the tested freeze, torch==2.13.0+cpu included: the CPU wheel index provides that build.
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -r requirements/main.lock.txt
COPY pyproject.toml README.md ./
COPY src/ src/
COPY prompts/ prompts/
COPY schemas/ schemas/
COPY configs/ configs/
COPY dags/ dags/
COPY operators/ operators/
COPY tinymodels/ tinymodels/
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import babelsynth.cli, babelsynth.runner, ctranslate2, comet, torch, tinymodels.build"
USER 50000
ENTRYPOINT ["babelsynth"]
CMD ["--help"]
