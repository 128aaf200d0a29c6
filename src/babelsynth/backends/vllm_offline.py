"""vLLM offline backend: an in-process `vllm.LLM` for GPU workers that own their GPU; the fetch only.

vLLM cannot be imported in the main venv (it needs numpy 2 and transformers 5; COMET needs the opposite), so
the engine runs in a child process of the vLLM venv's python (backends/vllm_worker.py, JSON lines on its
pipes), one per engine spec, shared by every client of that spec in this process. Requests are the same
OpenAI bodies the HTTP backend posts (multimodal messages with image data URLs, seed, structured outputs)
under the same cache keys (the base client's, backends/chat.py), so a request answered by either backend
is never asked again. Answers arrive per engine call of `batch_size` requests and are cached at once.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from babelsynth.backends.chat import BackendError, CachedChatClient, ChatRequest, ChatResult, Deliver
from babelsynth.config import VLLMOfflineBackend

_WORKER = Path(__file__).resolve().with_name("vllm_worker.py")
log = logging.getLogger(__name__)


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
        # CPU-only engine settings (in-process engine, whole prefills) are decided in the worker, which sees
        # the device: on a GPU vLLM keeps its defaults.
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> None:
        if not Path(self.python).exists():
            raise BackendError(
                f"vLLM python not found: {self.python} (set BABELSYNTH_VLLM_PYTHON or run `make setup`)"
            )
        self._lines = queue.Queue()  # fresh: a dead worker's end-of-stream marker must not leak into this one
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, str(_WORKER), "--spec", json.dumps(self.spec)],
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
                if m.get("fatal"):  # the engine failed (died, OOM): the worker exits; the next call restarts
                    self.close()
                    raise BackendError(f"{self.label} failed: {m['fatal']}\n{self.log_tail()}")
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


def worker_for(cfg: VLLMOfflineBackend) -> _Worker:
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


def running_workers() -> list[_Worker]:
    """The engine processes this process started (one per distinct model spec)."""
    return list(_WORKERS.values())


@atexit.register
def close_all() -> None:
    """Stop every engine worker of this process (they also exit when this process's pipes close)."""
    for w in list(_WORKERS.values()):
        with contextlib.suppress(Exception):
            w.close(grace=5)
    _WORKERS.clear()


class VLLMOfflineClient(CachedChatClient):
    """Chat and token counts from the engine worker of this config's spec."""

    cfg: VLLMOfflineBackend
    restarts = 0  # engine restarts this client caused (for stats and tests)

    def __repr__(self) -> str:
        return f"VLLMOfflineClient(path={self.cfg.path!r}, model={self.cfg.model!r})"

    def _fetch(self, requests: list[ChatRequest], deliver: Deliver) -> None:
        """Every request, through the engine worker; when the engine dies (or reports a failure) it is
        restarted up to max_restarts times for the requests not yet answered (answers already delivered
        are cached), then BackendError fails the task."""
        delivered: set[int] = set()
        failure: BackendError | None = None
        for attempt in range(self.cfg.max_restarts + 1):
            todo = [i for i in range(len(requests)) if i not in delivered]
            if not todo:
                return

            def on_item(m: dict, todo: list[int] = todo) -> None:
                i = todo[m["i"]]
                ok = "result" in m
                deliver(i, ChatResult(**m["result"]) if ok else ChatResult("", None, 0, 0, error=m["error"]))
                delivered.add(i)

            self.sent += len(todo)
            bodies = [requests[i].payload(self.cfg.model) for i in todo]
            try:
                worker_for(self.cfg).call({"op": "chat", "requests": bodies}, on_item)
                return
            except BackendError as e:
                failure = e
                self.restarts += attempt < self.cfg.max_restarts
                log.warning(
                    "vLLM engine failed (%s of %s restarts used): %s", attempt, self.cfg.max_restarts, e
                )
        raise BackendError(
            f"vLLM engine for {self.cfg.path} failed {self.cfg.max_restarts + 1} time(s) "
            f"(models.<role>.max_restarts={self.cfg.max_restarts}): {failure}"
        )

    def _fetch_token_counts(self, texts: list[str]) -> list[int | None]:
        self.tokenize_sent += len(texts)
        return worker_for(self.cfg).call({"op": "tokenize", "texts": texts})["counts"]
