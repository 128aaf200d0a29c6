"""No Docker engine runs here, so the images and the stack are checked the closest honest way:

* Dockerfiles are linted (hadolint) and every path they copy exists;
* the GPU worker image's install steps are REPLAYED in a fresh venv: its COPY lines into a stand-in root,
  its babelsynth install and smoke-check RUN lines verbatim; only the system and dependency steps (apt,
  the CUDA torch and the lock) are stood in for, by lending this environment's packages (tests/installed.py);
* compose and the pod specs are checked for one set of GPUs per service, tensor parallelism that matches
  them, and the volumes each stage reads (models, the HF cache with COMET's encoder files, the request cache)
  at the paths configs/production.yaml and the image use.
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.installed import clean_env, fresh_venv, lend_dependencies, where_is_babelsynth

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_there_are_the_five_images():
    assert {p.name for p in DOCKERFILES} == {
        "airflow.Dockerfile",
        "worker-gpu.Dockerfile",
        "vllm.Dockerfile",
        "worker-cpu.Dockerfile",  # the compose `cpu` profile (tests/test_compose.py)
        "vllm-cpu.Dockerfile",
    }


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [exe, "--config", str(ROOT / ".hadolint.yaml"), str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists(path):
    for line in path.read_text().splitlines():
        m = re.match(r"^COPY\s+(?!--from)(.+)\s+\S+$", line.strip())
        if m:
            for src in m.group(1).split():
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"


def test_airflow_image_has_no_torch():
    reqs = (ROOT / "requirements" / "airflow.txt").read_text()
    assert "torch" not in reqs and "nvidia" not in reqs and "apache-airflow==" in reqs


def test_airflow_image_pins_match_the_tested_freeze():
    """The control-plane image installs the Airflow versions the suite runs (requirements/main.lock.txt)."""
    lock = dict(
        line.split("==", 1)
        for line in (ROOT / "requirements" / "main.lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for line in (ROOT / "requirements" / "airflow.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            assert lock.get(name) == version, (
                f"{name}=={version} in airflow.txt, {lock.get(name)} in main.lock.txt"
            )


def test_compose_builds_existing_images_and_mounts_existing_configs():
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name
        for value in (svc.get("environment") or {}).values():
            if isinstance(value, str) and value.startswith("/opt/babelsynth/"):
                assert (ROOT / value.removeprefix("/opt/babelsynth/")).exists(), f"{name}: {value}"
    init = " ".join(compose["services"]["airflow-init"]["command"])
    assert "pools set gpu" in init and "--include-deferred" in init  # deferrable pods still hold GPU slots


# -------------------------------------------------------------------------------------------- image replay
def dockerfile_steps(path: Path) -> list[tuple[str, str]]:
    """(instruction, argument) per Dockerfile instruction, continuation lines joined, comments dropped."""
    steps, cur = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") and not cur:
            continue
        cur += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if cur.strip():
                word, _, arg = cur.strip().partition(" ")
                steps.append((word.upper(), arg.strip()))
            cur = ""
    return steps


def image_env(path: Path) -> dict[str, str]:
    """The image's ENV (key=value pairs), as later instructions and the running container see it."""
    env: dict[str, str] = {}
    for word, arg in dockerfile_steps(path):
        if word == "ENV":
            for pair in shlex.split(arg):
                k, _, v = pair.partition("=")
                env[k] = v
    return env


WORKER = ROOT / "docker" / "worker-gpu.Dockerfile"
# Every RUN step of the worker image, by what the replay does with it. A new step must be classified here.
STOOD_IN = {  # pattern -> why the replay does not run it
    r"apt-get install .*python3\.11 -m venv /opt/venv": "system python + its venv: a fresh venv",
    r"pip install --no-cache-dir torch==": "CUDA torch + the lock: this environment's packages, lent",
    r"mkdir -p /var/cache/babelsynth /opt/hf-home .*chown -R 50000:0": "checked statically below",
}
REPLAYED = (r"^pip install --no-cache-dir --no-deps \. ", r"^python -c ")


def test_worker_image_install_steps_replayed_in_a_venv(tmp_path):
    """COPY into a stand-in root, then the image's own babelsynth install and smoke check, verbatim."""
    root = tmp_path / "image"
    bin_dir = fresh_venv(tmp_path / "venv")
    env = clean_env()
    workdir = root
    replayed, lent = [], False
    for word, arg in dockerfile_steps(WORKER):
        if word == "WORKDIR":
            workdir = root / arg.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "ENV":
            for k, v in image_env_pairs(arg).items():  # image paths move under the stand-in root
                env[k] = f"{bin_dir}:{env['PATH']}" if k == "PATH" else (str(root) + v if v[:1] == "/" else v)
        elif word == "COPY":
            *srcs, dst = arg.split()
            target = root / dst.lstrip("/") if dst.startswith("/") else workdir / dst
            for src in srcs:
                if (ROOT / src).is_dir():
                    shutil.copytree(
                        ROOT / src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    dest = target / Path(src).name if dst.endswith("/") else target
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / src, dest)
        elif word == "RUN":
            stood = [why for pat, why in STOOD_IN.items() if re.search(pat, arg)]
            if stood:
                continue
            assert any(re.search(p, arg) for p in REPLAYED), f"unclassified RUN step in {WORKER.name}: {arg}"
            if arg.startswith("python -c") and not lent:  # the dependency step's stand-in, after the install
                lend_dependencies(bin_dir)
                lent = True
            out = subprocess.run(
                ["bash", "-c", arg], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
            )
            assert out.returncode == 0, f"RUN {arg}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
            replayed.append(arg.split()[0:3])
    assert [r[0] for r in replayed] == ["pip", "python"], replayed
    # nothing of the source tree is left in the image, and babelsynth still finds its data from elsewhere
    assert (
        not (root / "opt" / "babelsynth" / "src").exists()
        and not (root / "opt" / "babelsynth" / "prompts").exists()
    )
    where = where_is_babelsynth(bin_dir, tmp_path)
    assert where["file"].startswith(str(tmp_path / "venv")) and where["prompts"].startswith(
        str(tmp_path / "venv")
    )


def image_env_pairs(arg: str) -> dict[str, str]:
    return dict(pair.partition("=")[::2] for pair in shlex.split(arg))


def test_worker_image_caches_belong_to_the_task_user():
    """HF_HOME and BABELSYNTH_CACHE_DIR (configs/production.yaml's cache_dir) exist, owned by the USER."""
    env = image_env(WORKER)
    steps = dockerfile_steps(WORKER)
    user = [a for w, a in steps if w == "USER"][-1]
    runs = " ".join(a for w, a in steps if w == "RUN")
    for var in ("HF_HOME", "BABELSYNTH_CACHE_DIR"):
        d = env[var]
        assert "mkdir -p" in runs and d in runs.split("mkdir -p", 1)[1].split("&&")[0], (var, d)
        assert re.search(rf"chown -R {user}:0 [^&]*{re.escape(d)}", runs), (var, d)
    prod = (ROOT / "configs" / "production.yaml").read_text()
    assert "${BABELSYNTH_CACHE_DIR" in prod.split("cache_dir:", 1)[1].splitlines()[0]


def test_worker_image_torch_is_a_build_pytorch_still_publishes():
    """torch 2.13's CUDA build is PyPI's default wheel (CUDA 13.0); the retired cu124 index serves no 2.13."""
    text = WORKER.read_text()
    lock_torch = next(
        ln
        for ln in (ROOT / "requirements" / "main.lock.txt").read_text().splitlines()
        if ln.startswith("torch==")
    )
    version = lock_torch.split("==")[1].split("+")[0]
    assert f"pip install --no-cache-dir torch=={version} " in text
    assert "cu124" not in text and "--index-url" not in text.split("torch==")[0].rsplit("RUN", 1)[-1]


# ------------------------------------------------------------------------------------------------ compose
def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def _gpus(svc: dict) -> list[str] | None:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    if not devices:
        return None
    (dev,) = devices
    assert "count" not in dev, "GPUs are given by explicit device_ids, never a count (all would take GPU 0)"
    return list(dev["device_ids"])


def test_compose_gives_every_gpu_to_exactly_one_service():
    gpus = {name: _gpus(svc) for name, svc in _compose()["services"].items() if _gpus(svc)}
    assert set(gpus) == {"vllm-teacher", "vllm-llm", "airflow-scheduler"}
    seen: dict[str, str] = {}
    for name, ids in gpus.items():
        for i in ids:
            assert i not in seen, f"GPU {i} is given to {seen.get(i)} and {name}"
            seen[i] = name


def test_vllm_servers_shard_over_their_gpus_and_serve_the_names_the_config_sends():
    from babelsynth.config import load_config

    cfg = load_config(
        ROOT / "configs" / "production.yaml",
        {"models.teacher.base_url": "x", "models.judge.base_url": "x", "models.rephraser.base_url": "x"},
    )
    served = {}
    for name in ("vllm-teacher", "vllm-llm"):
        svc = _compose()["services"][name]
        cmd = svc["command"]
        tp = int(cmd[cmd.index("--tensor-parallel-size") + 1])
        assert tp == len(_gpus(svc)) and tp >= 2, name  # the large models shard over their GPUs
        assert svc.get("ipc") == "host", f"{name}: tensor-parallel workers need shared memory"
        served[name] = cmd[cmd.index("--served-model-name") + 1]
        assert any(v.endswith(":/models:ro") for v in svc["volumes"]), name
    assert served["vllm-teacher"] == cfg.models.teacher.model
    assert served["vllm-llm"] == cfg.models.judge.model == cfg.models.rephraser.model
    teacher = _compose()["services"]["vllm-teacher"]["command"]
    assert int(teacher[teacher.index("--max-model-len") + 1]) >= 16384  # 2 images + a long answer


def test_the_gpu_pool_has_one_slot_per_worker_gpu():
    compose = _compose()
    init = " ".join(compose["services"]["airflow-init"]["command"])
    slots = int(re.search(r"pools set gpu (\d+)", init).group(1))
    assert slots == len(_gpus(compose["services"]["airflow-scheduler"]))


def _production_in(env: dict[str, str]):
    """configs/production.yaml as a task loads it with this environment (endpoints need not be reachable)."""
    import os

    from babelsynth.config import load_config

    old = dict(os.environ)
    os.environ.update({"VLLM_TEACHER_URL": "http://t/v1", "VLLM_LLM_URL": "http://l/v1", **env})
    os.environ.pop("BABELSYNTH_CACHE_DIR", None) if "BABELSYNTH_CACHE_DIR" not in env else None
    try:
        return load_config(ROOT / "configs" / "production.yaml")
    finally:
        os.environ.clear()
        os.environ.update(old)


def _under(path: str, mounts: dict[str, bool]) -> tuple[str, bool] | None:
    return next(
        ((m, ro) for m, ro in mounts.items() if path == m or path.startswith(m.rstrip("/") + "/")), None
    )


def test_the_worker_service_mounts_what_translate_and_score_read():
    compose = _compose()
    svc = compose["services"]["airflow-scheduler"]
    assert svc["build"]["dockerfile"] == "docker/worker-gpu.Dockerfile"
    mounts = {}
    for v in svc["volumes"]:  # SOURCE:TARGET[:ro]; SOURCE may be ${VAR:?message}
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(ro|rw))?", v)
        assert m, v
        mounts[m.group(2)] = m.group(3) == "ro"
    env = {**image_env(WORKER), **compose["x-airflow-env"]}
    cfg = _production_in(env)
    for path in (cfg.models.translator.path, cfg.models.comet.path):
        assert _under(path, mounts), f"{path} is on no volume of the worker"
    assert _under(env["HF_HOME"], mounts), "COMET's encoder files (HF cache) are not mounted"
    cache = _under(cfg.cache_dir, mounts)
    assert cache and cache[1] is False, f"the request cache {cfg.cache_dir} needs a writable volume"


def test_pods_get_one_gpu_and_the_volumes_and_endpoints_their_stage_needs(tmp_path, monkeypatch):
    """Translate and score pods of configs/airflow.yaml: 1 GPU, models + HF cache read-only, a writable cache,
    and a config that loads in the pod's environment, the endpoints given on the command line or as env."""
    from operators.placement import load_placement
    from operators.pod import BabelsynthPodStageOperator
    from tests.test_dags import KUBECONFIG

    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    for k in ("AIRFLOW_CONN_BABELSYNTH_TEACHER", "AIRFLOW_CONN_BABELSYNTH_LLM"):
        monkeypatch.delenv(k, raising=False)
    k8s = load_placement(str(ROOT / "configs" / "airflow.yaml")).kubernetes
    pod_env = {**image_env(WORKER), **k8s.env}
    for stage in ("translate", "score"):
        op = BabelsynthPodStageOperator(
            task_id=stage, stage=stage, shard=0, k8s=k8s, config_file=str(tmp_path / "kubeconfig")
        )
        params = {"teacher_url": "http://10.1.2.3:8000/v1", "llm_url": "http://10.1.2.4:8000/v1"}
        op.arguments = argv = op.argv({"params": params, "run_id": "r1"})
        pod = op.build_pod_request_obj(None)
        c = pod.spec.containers[0]
        assert c.resources.limits["nvidia.com/gpu"] == "1"
        mounts = {m.mount_path: bool(m.read_only) for m in c.volume_mounts}
        claims = {v.name: v for v in pod.spec.volumes}
        assert {m.name for m in c.volume_mounts} <= set(claims)
        cfg = _production_in(pod_env)
        assert _under(cfg.models.translator.path, mounts) == ("/models", True)
        assert _under(cfg.models.comet.path, mounts) == ("/models", True)
        assert _under(pod_env["HF_HOME"], mounts) == ("/opt/hf-home", True)
        assert _under(cfg.cache_dir, mounts) == ("/var/cache/babelsynth", False)
        # The argv carries the endpoints (from params here): the pod's config loads with no VLLM_* in its env.
        pod_only = {k: v for k, v in pod_env.items() if not k.startswith("VLLM_") and k != "PATH"}
        sets = argv[argv.index("--shard") + 2 :]
        assert "models.teacher.base_url=" + '"http://10.1.2.3:8000/v1"' in sets
        env = clean_env(**pod_only)
        cmd = [
            sys.executable,
            "-m",
            "babelsynth.cli",
            "check-config",
            "--config",
            ROOT / "configs" / "production.yaml",
            "--no-files",  # /models is the pod's volume, not this machine's
        ]
        out = subprocess.run(
            [*map(str, cmd), *sets], env={**env, "PYTHONPATH": _src_path()}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        bare = subprocess.run(
            [*map(str, cmd)], env={**env, "PYTHONPATH": _src_path()}, capture_output=True, text=True
        )
        assert (
            bare.returncode != 0 and "VLLM_TEACHER_URL" in bare.stderr
        )  # without them: the variable is named


def _src_path() -> str:
    import babelsynth

    return str(Path(babelsynth.__file__).parents[1])
