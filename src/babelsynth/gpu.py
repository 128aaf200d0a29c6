"""One GPU per task: which CUDA device this process's translator and COMET use.

A Kubernetes pod or a compose service is given one GPU (`nvidia.com/gpu: 1`, `device_ids`): the process sees
one device, index 0. A LocalExecutor or Celery worker on a host with N GPUs runs up to N model tasks at once
(the Airflow pool has N slots) and every process sees all N: each claims a free device with an exclusive lock
file, held until the process exits, so no two tasks share cuda:0. A config's `device_index` wins over both.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from pathlib import Path

LOCK_DIR_ENV = "BABELSYNTH_GPU_LOCK_DIR"
_claimed: dict[str, tuple[int, object]] = {}  # lock dir -> (device, open lock file kept for the process life)
_lock = threading.Lock()


def cuda_device_count() -> int:
    """CUDA devices this process sees (after CUDA_VISIBLE_DEVICES), through CTranslate2 or torch."""
    try:
        import ctranslate2

        return int(ctranslate2.get_cuda_device_count())
    except ImportError:
        import torch

        return torch.cuda.device_count()


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "babelsynth-gpu-locks")


def claim_device(
    count: int, directory: Path | None = None, timeout_s: float = 600.0, poll_s: float = 1.0
) -> int:
    """A CUDA device index for this process: 0 when it sees one device, else a free one of `count`, locked.

    The same index on every call in a process. Waits up to `timeout_s` when all are taken (a pool larger than
    the host's GPU count), then raises with the fix."""
    if count <= 1:
        return 0
    d = Path(directory or lock_dir())
    key = str(d.resolve()) if d.exists() else str(d)
    with _lock:
        if key in _claimed:
            return _claimed[key][0]
        d.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while True:
            for i in range(count):
                fh = open(d / f"gpu-{i}.lock", "a+")  # held open: the lock lasts the process
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.close()
                    continue
                fh.seek(0)
                fh.truncate()
                fh.write(f"{os.getpid()}\n")
                fh.flush()
                _claimed[key] = (i, fh)
                return i
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"all {count} GPUs of this host are claimed by other babelsynth tasks (locks in {d}) for "
                    f"{timeout_s:.0f}s: give the Airflow pool of model stages at most one slot per GPU"
                )
            time.sleep(poll_s)


def release_all() -> None:
    """Give back every claim of this process (tests; a finished process releases by exiting)."""
    with _lock:
        for _, fh in _claimed.values():
            fh.close()
        _claimed.clear()
