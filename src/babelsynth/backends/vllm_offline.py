"""vLLM offline backend: an in-process `vllm.LLM` for GPU workers that own their GPU.

vLLM cannot be imported in the main venv (it needs numpy 2 and transformers 5; COMET needs the opposite), so
the engine lives in a worker process started with the vLLM venv's python, running this very file as a script::

    <vllm python> vllm_offline.py --spec '{"path": DIR, "max_model_len": 4096, ...}'

It speaks JSON lines on its pipes. stdin: {"op": "chat", "requests": [<OpenAI chat bodies>]} or
{"op": "tokenize", "texts": [...]}; stdout: one {"i": n, "result": {...}} (or {"i": n, "error": "..."}) per
request as each engine call of `batch_size` requests finishes, then {"done": true}. Requests are the same
bodies the HTTP client posts (multimodal messages with image data URLs, seed, structured outputs) and go
through the same cache keys, so a request answered by either backend is never asked again.

The top of this file imports only the standard library: the worker side runs without babelsynth installed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from babelsynth.backends.chat_http import ChatRequest, ChatResult
    from babelsynth.cache import Cache
    from babelsynth.config import VLLMOfflineBackend

_HERE = Path(__file__).resolve()
_SAMPLING_FIELDS = ("model", "messages", "max_tokens", "temperature", "top_p", "seed", "structured_outputs")


# ====================================================================== worker side (runs in the vLLM venv)
def _sampling(body: dict):
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


def _chat(llm, bodies: list[dict]) -> list[dict]:
    """One engine call over many conversations; when it fails, retry one by one so only bad requests fail."""
    try:
        outs = llm.chat([b["messages"] for b in bodies], [_sampling(b) for b in bodies], use_tqdm=False)
        return [{"result": _result(o)} for o in outs]
    except Exception as e:  # noqa: BLE001 - a per-request refusal becomes that row's outcome
        if len(bodies) == 1:
            return [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]
    return [_chat(llm, [b])[0] for b in bodies]


def serve(spec: dict) -> None:
    """Worker loop: load the engine once, answer JSON-line requests until stdin closes."""
    out = os.fdopen(
        os.dup(1), "w", buffering=1
    )  # private stdout for the protocol; vLLM's prints go to stderr
    os.dup2(2, 1)

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    import torch

    cpu = not torch.cuda.is_available()
    args = {
        "model": spec["path"],
        "max_model_len": spec["max_model_len"],
        "dtype": spec["dtype"],
        "limit_mm_per_prompt": spec["limit_mm_per_prompt"],
        "seed": 0,
    }
    if spec.get("kv_cache_memory_bytes"):
        args["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
    if cpu:  # CPU vLLM: a seeded request hit by a partial prefill kills the engine (see vllm_server.py)
        args["enable_chunked_prefill"] = False
    args.update(spec.get("engine_args") or {})
    from vllm import LLM

    llm = LLM(**args)
    emit({"ready": True})
    batch = int(spec.get("batch_size", 256))
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "chat":
            bodies = msg["requests"]
            for start in range(0, len(bodies), batch):
                for j, r in enumerate(_chat(llm, bodies[start : start + batch])):
                    emit({"i": start + j, **r})
        elif msg["op"] == "tokenize":
            tok = llm.get_tokenizer()
            emit({"counts": [len(tok.encode(t, add_special_tokens=False)) for t in msg["texts"]]})
        else:
            emit({"error": f"unknown op {msg['op']!r}"})
        emit({"done": True})


# ====================================================================== client side (runs in the main venv)
class _Worker:
    """One engine process (shared by every client of the same spec in this process)."""

    def __init__(self, python: str, spec: dict, startup_timeout: float):
        self.python, self.spec, self.startup_timeout = python, spec, startup_timeout
        self.log_path = Path(tempfile.mkdtemp(prefix="babelsynth-vllm-offline-")) / "worker.log"
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"vLLM offline worker for {self.spec['path']} (pid {pid}, log {self.log_path})"

    def _env(self) -> dict:
        env = dict(os.environ)
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE"):
            env.pop(k, None)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: less RAM, faster start
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> None:
        from babelsynth.backends.chat_http import BackendError

        if not Path(self.python).exists():
            raise BackendError(
                f"vLLM python not found: {self.python} (set BABELSYNTH_VLLM_PYTHON or run `make setup`)"
            )
        self._lines = queue.Queue()  # fresh: a dead worker's end-of-stream marker must not leak into this one
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, str(_HERE), "--spec", json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self._env(),
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        log.close()
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        msg = self._next(self.startup_timeout)
        if not msg.get("ready"):
            raise BackendError(f"{self.label} did not start: {msg}")

    def _pump(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float | None = None) -> dict:
        from babelsynth.backends.chat_http import BackendError

        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise BackendError(
                f"{self.label} gave no answer within {timeout:.0f}s:\n{self.log_tail()}"
            ) from None
        if line is None:
            rc = self.proc.wait() if self.proc else None
            raise BackendError(f"{self.label} exited with code {rc}:\n{self.log_tail()}")
        return json.loads(line)

    def call(self, msg: dict, on_item=None) -> dict:
        """Send one op; items ({"i": ...}) go to on_item as they arrive; returns the last non-item message."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            try:
                self.proc.stdin.write(json.dumps(msg, ensure_ascii=False) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass  # the reader reports the exit with the log tail
            last: dict = {}
            while True:
                m = self._next()
                if m.get("done"):
                    return last
                if "i" in m and on_item is not None:
                    on_item(m)
                else:
                    last = m

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def close(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # EOF: the worker leaves its loop
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


_WORKERS: dict[str, _Worker] = {}
_WLOCK = threading.Lock()


def _worker_for(cfg: VLLMOfflineBackend) -> _Worker:
    from babelsynth.vllm_server import default_vllm_python

    spec = {
        "path": str(Path(cfg.path).resolve()),
        "max_model_len": cfg.max_model_len,
        "dtype": cfg.dtype,
        "kv_cache_memory_bytes": cfg.kv_cache_memory_bytes,
        "limit_mm_per_prompt": cfg.limit_mm_per_prompt,
        "batch_size": cfg.batch_size,
        "engine_args": cfg.engine_args,
    }
    python = cfg.python or str(default_vllm_python())
    key = json.dumps([python, spec], sort_keys=True)
    with _WLOCK:
        if key not in _WORKERS:
            _WORKERS[key] = _Worker(python, spec, cfg.startup_timeout_s)
        return _WORKERS[key]


@atexit.register
def close_all() -> None:
    """Stop every engine worker of this process (they also exit when this process's pipes close)."""
    for w in list(_WORKERS.values()):
        with contextlib.suppress(Exception):
            w.close(grace=5)
    _WORKERS.clear()


class VLLMOfflineClient:
    """Same interface as ChatClient (chat_many, count_tokens, ...), engine in a vLLM-venv worker."""

    def __init__(self, cfg: VLLMOfflineBackend, cache: Cache | None = None):
        self.cfg = cfg
        self.cache = cache
        self.sent = 0  # requests handed to the engine
        self.completed = 0
        self.tokenize_sent = 0

    def __repr__(self) -> str:
        return f"VLLMOfflineClient(path={self.cfg.path!r}, model={self.cfg.model!r})"

    @property
    def model_id(self) -> str:
        return self.cfg.model

    def key(self, req: ChatRequest) -> str:
        from babelsynth.backends.chat_http import request_key

        return request_key(self.cfg.model, req)

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        from babelsynth.backends.chat_http import ChatResult

        keys = [self.key(r) for r in requests]
        hits = self.cache.get_many(keys) if self.cache else {}
        out: list[ChatResult | None] = [
            ChatResult(**hits[k], cached=True) if k in hits else None for k in keys
        ]
        todo = [i for i, r in enumerate(out) if r is None]
        # the same request twice in one call (identical body) is computed once
        uniq = list(dict.fromkeys(keys[i] for i in todo))
        body_of = {keys[i]: requests[i].payload(self.cfg.model) for i in todo}
        fresh: dict[str, ChatResult] = {}

        def on_item(m: dict) -> None:
            k = uniq[m["i"]]
            res = ChatResult(**m["result"]) if "result" in m else ChatResult("", None, 0, 0, error=m["error"])
            if self.cache and res.error is None:
                self.cache.put(k, res.record())
            self.completed += 1
            fresh[k] = res

        if uniq:
            self.sent += len(uniq)
            _worker_for(self.cfg).call({"op": "chat", "requests": [body_of[k] for k in uniq]}, on_item)
        for i in todo:
            out[i] = fresh[keys[i]]
        return out  # type: ignore[return-value]

    def count_tokens(self, texts: list[str]) -> list[int | None]:
        from babelsynth.backends.chat_http import tokenize_key

        keys = [tokenize_key(self.cfg.model, t) for t in texts]
        hits = self.cache.get_many(keys) if self.cache else {}
        todo = list(dict.fromkeys(k for k in keys if k not in hits))
        if todo:
            text_of = dict(zip(keys, texts))
            self.tokenize_sent += len(todo)
            counts = _worker_for(self.cfg).call({"op": "tokenize", "texts": [text_of[k] for k in todo]})[
                "counts"
            ]
            new = {k: {"n": n} for k, n in zip(todo, counts)}
            if self.cache:
                self.cache.put_many(new)
            hits.update(new)
        return [hits[k]["n"] for k in keys]


def main() -> None:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE.parent]  # never shadow vllm
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="engine spec as JSON")
    serve(json.loads(ap.parse_args().spec))


if __name__ == "__main__":
    main()
