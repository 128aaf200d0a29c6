"""Session fixtures: tiny models built once (and cached across sessions), real vLLM servers, Airflow env.

The Airflow environment is set before anything imports airflow. No warning is silenced here: a safety
warning (PIL's DecompressionBombWarning) must stay visible; pyproject.toml filters named noisy warnings only.
The test deployment allows path params under the temp dir, the test work dir and configs/
(operators/boundary.py); tests of the boundary itself use their own roots.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BABELSYNTH_TEST_WORK", ROOT / ".work" / "test"))
WORK.mkdir(parents=True, exist_ok=True)
_AF_HOME = tempfile.mkdtemp(prefix="af_home_", dir=WORK)
os.environ.update(
    AIRFLOW_HOME=_AF_HOME,
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
    AIRFLOW__CORE__UNIT_TEST_MODE="False",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)
os.environ.setdefault("BABELSYNTH_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
# COMET checkpoints name their encoder by hub id; like a production worker, the tests find its config and
# tokenizer in a Hugging Face cache (the tiny one the `models` fixture builds), offline. Set before any import
# of huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_CACHE", str(WORK / "models" / "comet" / "hf_home" / "hub"))
TEST_ROOTS = [tempfile.gettempdir(), str(WORK), str(ROOT / "configs"), "s3://babelsynth"]  # + the moto bucket
_DEPLOYMENT = Path(_AF_HOME) / "babelsynth-deployment.yaml"
_DEPLOYMENT.write_text(
    json.dumps({"allowed_roots": dict.fromkeys(("config", "input", "output", "models"), TEST_ROOTS)})
)
os.environ.setdefault("BABELSYNTH_AIRFLOW_CONFIG", str(_DEPLOYMENT))
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def models() -> dict[str, str]:
    """Every tiny model, built from configs with fixed seeds; each rebuilt only when its builder changes."""
    from tinymodels.build import build_all

    return build_all(WORK / "models")


def _vllm_python() -> str:
    py = os.environ["BABELSYNTH_VLLM_PYTHON"]
    if not Path(py).exists():
        pytest.fail(f"vLLM python {py} missing: run `make setup` (tests never skip the real engine)")
    return py


@pytest.fixture(scope="session")
def vllm_servers(models):
    """A real `vllm serve` of the tiny Aya Vision (teacher) and of its text LLM (judge/rephraser)."""
    from babelsynth.vllm_server import VLLMServer

    py = _vllm_python()
    servers = {
        "teacher": VLLMServer(
            models["vlm"], served_model_name="tiny-aya-vision", python=py, work_dir=WORK / "vllm"
        ),
        "llm": VLLMServer(models["llm"], served_model_name="tiny-llm", python=py, work_dir=WORK / "vllm"),
    }
    try:
        start_all(servers.values())
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def start_all(servers) -> None:
    """Start servers concurrently (each start blocks until /health answers)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(s.start) for s in servers]:
            f.result()


@pytest.fixture(scope="session")
def sample_input(tmp_path_factory) -> str:
    from babelsynth.sample_data import write_samples

    uri = str(tmp_path_factory.mktemp("input") / "samples.parquet")
    write_samples(uri, n_per_task=12)
    return uri


def make_config(models: dict, servers: dict, input_uri: str, output_uri: str, cache_dir: str, **over):
    """The demo config pointed at this session's models and servers, with dotted overrides."""
    from babelsynth.config import load_config

    env = {"BABELSYNTH_WORK": str(WORK), "BABELSYNTH_MODELS": str(Path(models["nllb_ct2"]).parents[1])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        base = {
            "input_uri": input_uri,
            "output_uri": output_uri,
            "cache_dir": cache_dir,
            "models.teacher.base_url": servers["teacher"].url,
            "models.judge.base_url": servers["llm"].url,
            "models.rephraser.base_url": servers["llm"].url,
            "models.translator.path": models["nllb_ct2"],
            "models.comet.path": models["comet"],
        }
        return load_config(ROOT / "configs" / "demo.yaml", {**base, **over})
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
