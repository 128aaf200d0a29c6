"""Run a vLLM OpenAI-compatible server as a managed subprocess (tests, demo, single-box runs).

vLLM lives in its own virtualenv (it cannot share one with unbabel-comet), so the server is started with that
venv's python::

    with VLLMServer("models/aya_vision/vlm", served_model_name="aya", work_dir=tmp) as srv:
        httpx.post(f"{srv.url}/chat/completions", json={"model": "aya", "messages": [...]})

Command line (see ``VLLMServer.command``)::

    <python> -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME --host 127.0.0.1
        --port PORT --max-model-len N --enforce-eager --dtype bfloat16 --kv-cache-memory-bytes B --seed 0
        [--limit-mm-per-prompt '{"image": 2}']            # for vision-language models
        --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'   # default,
        optional

Environment given to the child: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine in-process: ~3x less RAM and much
faster start on CPU), ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``, ``VLLM_CACHE_ROOT`` /
``XDG_CACHE_HOME``
under ``work_dir``, no usage stats; ``VLLM_CPU_KVCACHE_SPACE`` is removed because it silently overrides
``--kv-cache-memory-bytes``. The child runs in its own session (process group); :meth:`stop` SIGTERMs the
group and
SIGKILLs it after a grace period, :meth:`kill` SIGKILLs at once (fault injection).

Structured output in vLLM 0.32 is requested with ``{"structured_outputs": {"choice": [...]}}`` (or ``"json":
schema``, ``"regex"``, ``"grammar"``) in the request body, or with OpenAI's ``response_format``; the old
``guided_choice``/``guided_json`` fields are ignored (HTTP 200, unconstrained output, only a log warning).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from babelsynth.paths import source_checkout

DEFAULT_KV_CACHE_BYTES = 64 << 20
# Compact JSON for structured outputs. vLLM 0.32 reads disable_any_whitespace ONLY from the server config (the
# request-level field is ignored); without it a tiny random model loops on "\n" inside JSON until max_tokens.
# The option requires an explicit xgrammar/guidance backend.
DEFAULT_STRUCTURED_OUTPUTS_CONFIG: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}
_LIVE: weakref.WeakSet[VLLMServer] = weakref.WeakSet()


class VLLMServerError(RuntimeError):
    """The server process died, failed to become healthy in time, or could not be started."""


def default_vllm_python() -> Path:
    """``$BABELSYNTH_VLLM_PYTHON`` if set, else ``.venv-vllm/bin/python`` of the source checkout (or of the
    working directory for an installed package)."""
    env = os.environ.get("BABELSYNTH_VLLM_PYTHON")
    if env:
        return Path(env)
    return (source_checkout() or Path.cwd()) / ".venv-vllm" / "bin" / "python"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def is_multimodal_model(model_dir: str | os.PathLike[str]) -> bool:
    """True when the model's config.json has a vision tower (``vision_config``)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "vision_config" in cfg


class VLLMServer:
    """A vLLM OpenAI-compatible server in a child process group. Use as a context manager or start()/stop().

    Args:
        model_dir: local HF model directory (never a hub id: the child runs with ``HF_HUB_OFFLINE=1``).
        served_model_name: the ``model`` name clients send; defaults to the directory name.
        port: TCP port on 127.0.0.1; ``None`` picks a free one (and retries with a new one if it was taken).
        max_model_len, kv_cache_memory_bytes, dtype, seed: passed to vLLM.
        multimodal: add ``--limit-mm-per-prompt``; ``None`` auto-detects from config.json.
        limit_mm_per_prompt: e.g. ``{"image": 2}``.
        structured_outputs_config: ``--structured-outputs-config`` JSON; ``None`` leaves vLLM's default
            (which lets JSON outputs contain arbitrary whitespace).
        python: interpreter of the vLLM venv; default :func:`default_vllm_python`.
        work_dir: holds the log and the vLLM / XDG caches; default a fresh temp dir.
        log_path: server log file; default ``work_dir/vllm-server-<port>.log``.
        startup_timeout: seconds to wait for ``GET /health`` == 200.
        stop_grace: seconds between SIGTERM and SIGKILL in :meth:`stop`.
        extra_args: appended to the command line.
        env: extra environment variables for the child (applied last).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        served_model_name: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_model_len: int = 2048,
        kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES,
        dtype: str = "bfloat16",
        seed: int = 0,
        multimodal: bool | None = None,
        limit_mm_per_prompt: Mapping[str, int] | None = None,
        structured_outputs_config: Mapping[str, Any] | None = DEFAULT_STRUCTURED_OUTPUTS_CONFIG,
        python: str | os.PathLike[str] | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 300.0,
        stop_grace: float = 15.0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.served_model_name = served_model_name or self.model_dir.name
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else free_port(host)
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.dtype = dtype
        self.seed = seed
        self.multimodal = is_multimodal_model(self.model_dir) if multimodal is None else multimodal
        self.limit_mm_per_prompt = dict(limit_mm_per_prompt or {"image": 2})
        self.structured_outputs_config = (
            dict(structured_outputs_config) if structured_outputs_config else None
        )
        self.python = Path(python) if python is not None else default_vllm_python()
        self.work_dir = (
            Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="vllm-server-"))
        )
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log_fh: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------
    # properties
    @property
    def url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8011/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._log_path_arg or self.work_dir / f"vllm-server-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--dtype",
            self.dtype,
            "--kv-cache-memory-bytes",
            str(self.kv_cache_memory_bytes),
            "--seed",
            str(self.seed),
            # CPU vLLM 0.32: a seeded request hit by a partial prefill kills the engine
            # ("RuntimeError: CPU Generator does not use offset"); whole prefills avoid that path.
            "--no-enable-chunked-prefill",
        ]
        if self.multimodal:
            cmd += ["--limit-mm-per-prompt", json.dumps(self.limit_mm_per_prompt)]
        if self.structured_outputs_config:
            cmd += ["--structured-outputs-config", json.dumps(self.structured_outputs_config)]
        return cmd + self.extra_args

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(k, None)
        cache = self.work_dir / "cache"
        env.update(
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_CACHE_ROOT=str(cache / "vllm"),
            XDG_CACHE_HOME=str(cache / "xdg"),
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------------------------------------
    # lifecycle
    def start(self) -> VLLMServer:
        """Start the server and block until ``/health`` answers 200 (raises :class:`VLLMServerError`)."""
        if not self.python.exists():
            raise VLLMServerError(
                f"vLLM python not found: {self.python} (set BABELSYNTH_VLLM_PYTHON or run `make setup`)"
            )
        if not (self.model_dir / "config.json").exists():
            raise VLLMServerError(f"not a model directory (no config.json): {self.model_dir}")
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                self.wait_ready()
                return self
            except VLLMServerError as exc:
                taken = "address already in use" in self.log_tail(80).lower()
                self.stop()
                if taken and attempt + 1 < attempts:
                    self.port = free_port(self.host)
                    continue
                raise exc
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                raise VLLMServerError(f"server already running (pid {self.proc.pid})")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_path, "ab")
            self._log_fh.write(f"\n=== babelsynth: {' '.join(self.command())}\n".encode())
            self._log_fh.flush()
            self._t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                env=self.child_env(),
                cwd=str(self.work_dir),
                start_new_session=True,
            )
            _LIVE.add(self)

    def health(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None:
                raise VLLMServerError("server not started")
            rc = self.proc.poll()
            if rc is not None:
                raise VLLMServerError(
                    f"vLLM server exited with code {rc} before becoming healthy; log {self.log_path}:\n"
                    + self.log_tail()
                )
            if self.health():
                self.startup_seconds = time.monotonic() - self._t0
                return
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM server not healthy after {timeout:.0f}s on {self.root_url}; log {self.log_path}:\n"
                    + self.log_tail()
                )
            time.sleep(0.5)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # start_new_session=True: pgid == pid

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` s; the exit code (None if never started)."""
        grace = self.stop_grace if grace is None else grace
        with self._lock:
            if self.proc is None:
                return None
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(timeout=30)
            # Stragglers in the group (if any) go too; the group id stays valid while members live.
            self._signal_group(signal.SIGKILL)
            self._close_log()
            _LIVE.discard(self)
            return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (fault injection); return the exit code."""
        with self._lock:
            if self.proc is None:
                return None
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
            self._close_log()
            _LIVE.discard(self)
            return self.proc.returncode

    def _close_log(self) -> None:
        if self._log_fh is not None:
            try:
                self._log_fh.close()
            finally:
                self._log_fh = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()[-200_000:]
        except OSError:
            return "<no log>"
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"VLLMServer({self.model_dir.name!r}, url={self.url!r}, pid={self.pid}, {state})"


@atexit.register
def _stop_all() -> None:  # never leave an orphaned server behind a crashed test run
    for srv in list(_LIVE):
        try:
            srv.stop(grace=5)
        except Exception as exc:  # noqa: BLE001
            print(f"babelsynth: failed to stop {srv!r}: {exc}", file=sys.stderr)
