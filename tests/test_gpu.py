"""GPU placement without a GPU: one device per task process, CPU-only settings only on CPU.

The claim is exercised with real processes and real file locks; CUDA itself is absent here, so the device
counts are given (what `ctranslate2.get_cuda_device_count()` would return on a GPU host).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from babelsynth import gpu
from babelsynth.backends import vllm_offline, vllm_worker

_CLAIM = """
import json, sys, time
from babelsynth import gpu
i = gpu.claim_device(int(sys.argv[2]), directory=sys.argv[1], timeout_s=float(sys.argv[3]), poll_s=0.1)
again = gpu.claim_device(int(sys.argv[2]), directory=sys.argv[1])
print(json.dumps({"device": i, "again": again}), flush=True)
time.sleep(float(sys.argv[4]))
"""


def _claimer(lock_dir: Path, count: int, timeout: float = 5.0, hold: float = 30.0) -> subprocess.Popen:
    src = str(Path(gpu.__file__).parents[1])
    return subprocess.Popen(
        [sys.executable, "-c", _CLAIM, str(lock_dir), str(count), str(timeout), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
    )


def test_task_processes_on_one_host_each_claim_their_own_gpu(tmp_path):
    procs = [_claimer(tmp_path, 3) for _ in range(3)]
    try:
        got = [json.loads(p.stdout.readline()) for p in procs]
        assert sorted(g["device"] for g in got) == [0, 1, 2]
        assert all(g["again"] == g["device"] for g in got)  # one device for the life of the process
        late = _claimer(tmp_path, 3, timeout=0.5, hold=0)  # a 4th task on a 3-GPU host: the pool is too big
        _, err = late.communicate(timeout=60)
        assert late.returncode != 0 and "at most one slot per GPU" in err
    finally:
        for p in procs:
            p.kill()
            p.wait()
    freed = _claimer(tmp_path, 3, hold=0)  # the locks died with their processes
    out, _ = freed.communicate(timeout=60)
    assert json.loads(out)["device"] in (0, 1, 2)


def test_a_process_that_sees_one_gpu_uses_it_without_a_lock(tmp_path):
    assert gpu.claim_device(1, directory=tmp_path / "never-made") == 0
    assert not (tmp_path / "never-made").exists()


def test_the_translator_passes_its_device_index_to_ctranslate2(monkeypatch, models):
    """On a (simulated) 2-GPU host the translator claims a device and opens the engine on it."""
    from babelsynth.backends import nllb_ct2
    from babelsynth.config import CT2NLLBBackend

    opened = {}

    def fake_engine(path, device, compute_type, inter, intra, device_index=0):  # FAULT-FREE STAND-IN: no GPU
        opened.update(device=device, index=device_index, compute=compute_type)
        return object()

    monkeypatch.setattr("ctranslate2.get_cuda_device_count", lambda: 2)
    monkeypatch.setattr(nllb_ct2, "load_engine", fake_engine)
    monkeypatch.setattr(gpu, "claim_device", lambda n: 1 if n == 2 else pytest.fail(f"claimed among {n}"))
    tr = nllb_ct2.NLLBTranslator(CT2NLLBBackend(path=models["nllb_copy_ct2"]))
    assert tr.engine is not None  # opened on first use
    assert opened == {"device": "cuda", "index": 1, "compute": "int8_float16"} and tr.device_index == 1
    pinned = nllb_ct2.NLLBTranslator(CT2NLLBBackend(path=models["nllb_copy_ct2"], device_index=0))
    assert pinned.engine is not None
    assert opened["index"] == 0 and pinned.device_index == 0


def test_cpu_only_vllm_settings_apply_only_on_cpu():
    spec = {"path": "/m", "dtype": "auto", "limit_mm_per_prompt": {"image": 2}, "max_model_len": None}
    cpu, gpu_args = vllm_worker.engine_args(spec, cpu=True), vllm_worker.engine_args(spec, cpu=False)
    assert cpu["enable_chunked_prefill"] is False and "enable_chunked_prefill" not in gpu_args
    assert "max_model_len" not in gpu_args  # unset: the model's own context length
    assert vllm_worker.engine_env(cpu=True) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert vllm_worker.engine_env(cpu=False) == {}
    # the parent process sets none of it (it cannot see the engine's device): the worker decides
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in Path(vllm_offline.__file__).read_text()
