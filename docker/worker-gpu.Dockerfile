# GPU worker: CUDA, CTranslate2, COMET, torch, babelsynth. Runs `babelsynth run-stage ...` in a pod.
# Models are mounted at /models (no hub access at run time).
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    BABELSYNTH_PROMPTS_DIR=/opt/babelsynth/prompts BABELSYNTH_SCHEMAS_DIR=/opt/babelsynth/schemas
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/babelsynth
COPY requirements/main.lock.txt requirements/main.lock.txt
RUN python3.11 -m pip install --no-cache-dir -r requirements/main.lock.txt
COPY pyproject.toml README.md ./
COPY src/ src/
COPY prompts/ prompts/
COPY schemas/ schemas/
COPY configs/ configs/
RUN python3.11 -m pip install --no-cache-dir --no-deps .
ENTRYPOINT ["babelsynth"]
