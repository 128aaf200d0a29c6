"""No Docker engine runs here: Dockerfiles are linted with hadolint and every path they copy must exist."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_there_are_the_three_images():
    assert {p.name for p in DOCKERFILES} == {"airflow.Dockerfile", "worker-gpu.Dockerfile", "vllm.Dockerfile"}


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
