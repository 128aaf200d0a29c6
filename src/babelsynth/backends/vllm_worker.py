"""The vLLM engine process of the `vllm_offline` backend: runs in the vLLM venv, without babelsynth.

vLLM cannot be imported in the main venv (it needs numpy 2 and transformers 5; COMET needs the opposite), so
backends/vllm_offline.py starts this file as a script with the vLLM venv's python::

    <vllm python> vllm_worker.py --spec '{"path": DIR, "max_model_len": 4096, ...}'

It speaks JSON lines on its pipes. stdin: {"op": "chat", "requests": [<OpenAI chat bodies>]} or
{"op": "tokenize", "texts": [...]}; stdout: {"ready": true} once the engine is loaded, then per op one
{"i": n, "result": {...}} (or {"i": n, "error": "..."}) per request as each engine call of `batch_size`
requests finishes, or {"counts": [...]}, then {"done": true}. An "error" is only ever an error about that
request's content (vLLM's client errors, input validation); any other exception (engine death, OOM, a
CUDA error) is the engine's: the worker writes {"fatal": "..."} and exits, and the caller fails the task.

This file imports only the standard library (vLLM inside functions): babelsynth is not installed there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve()
_SAMPLING_FIELDS = ("model", "messages", "max_tokens", "temperature", "top_p", "seed", "structured_outputs")


def sampling_params(body: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    unknown = sorted(set(body) - set(_SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"request fields not supported by the vllm_offline backend: {unknown}")
    so = body.get("structured_outputs")
    return SamplingParams(
        max_tokens=body["max_tokens"],
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        seed=body.get("seed"),
        structured_outputs=StructuredOutputsParams(**so) if so else None,
    )


def _result(out) -> dict:
    c = out.outputs[0]
    return {
        "text": c.text,
        "finish_reason": c.finish_reason,
        "prompt_tokens": len(out.prompt_token_ids or []),
        "completion_tokens": len(c.token_ids),
    }


def request_error(e: BaseException) -> bool:
    """Whether an exception is about one request's content (that row's outcome) rather than the engine."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"VLLMServerError", "EngineDeadError", "OutOfMemoryError", "MemoryError"}:
        return False
    return bool(names & {"VLLMClientError", "ValueError", "TypeError"})


def chat_batch(llm, bodies: list[dict]) -> list[dict]:
    """One engine call over many conversations; when a request is refused, retry one by one so only the
    refused requests fail. An engine failure propagates (the worker reports it and exits)."""
    try:
        outs = llm.chat([b["messages"] for b in bodies], [sampling_params(b) for b in bodies], use_tqdm=False)
        return [{"result": _result(o)} for o in outs]
    except Exception as e:
        if not request_error(e):
            raise
        if len(bodies) == 1:
            return [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]
    return [chat_batch(llm, [b])[0] for b in bodies]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_env(cpu: bool) -> dict[str, str]:
    """Environment for the engine: on CPU it runs in this process (~3x less RAM, much faster start); on a GPU
    vLLM keeps its own (multiprocess) default."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if cpu else {}


def engine_args(spec: dict, cpu: bool) -> dict:
    """vllm.LLM keyword arguments; the CPU-only workarounds only when the engine runs on CPU."""
    args = {
        "model": spec["path"],
        "dtype": spec["dtype"],
        "limit_mm_per_prompt": spec["limit_mm_per_prompt"],
        "seed": 0,
    }
    if spec.get("max_model_len"):  # else the model's own context length
        args["max_model_len"] = spec["max_model_len"]
    if spec.get("kv_cache_memory_bytes"):
        args["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
    if cpu:  # CPU vLLM: a seeded request hit by a partial prefill kills the engine (see vllm_server.py)
        args["enable_chunked_prefill"] = False
    args.update(spec.get("engine_args") or {})
    return args


def serve(spec: dict) -> None:
    """Worker loop: load the engine once, answer JSON-line requests until stdin closes."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own stdout
    os.dup2(2, 1)  # vLLM's prints go to stderr (the worker log)

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    cpu = not _cuda_available()
    args = engine_args(spec, cpu)
    for k, v in engine_env(cpu).items():  # before vllm is imported
        os.environ.setdefault(k, v)
    from vllm import LLM

    llm = LLM(**args)
    emit({"ready": True})
    batch = int(spec.get("batch_size", 256))
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            answer(llm, msg, batch, emit)
        except Exception as e:  # the engine's failure: report it, then exit (never a row outcome)
            emit({"fatal": f"{type(e).__name__}: {str(e)[:500]}"})
            raise SystemExit(3) from e
        emit({"done": True})


def answer(llm, msg: dict, batch: int, emit) -> None:
    """One op: chat answers per request as each engine call finishes, or token counts."""
    if msg["op"] == "chat":
        bodies = msg["requests"]
        for start in range(0, len(bodies), batch):
            for j, r in enumerate(chat_batch(llm, bodies[start : start + batch])):
                emit({"i": start + j, **r})
    elif msg["op"] == "tokenize":
        tok = llm.get_tokenizer()
        emit({"counts": [len(tok.encode(t, add_special_tokens=False)) for t in msg["texts"]]})
    else:
        emit({"error": f"unknown op {msg['op']!r}"})


def main() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE.parent]  # never shadow vllm
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="engine spec as JSON")
    serve(json.loads(ap.parse_args().spec))


if __name__ == "__main__":
    main()
