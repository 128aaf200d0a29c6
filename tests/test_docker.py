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
    out = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(path)], capture_output=True, text=True)
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
