"""babelsynth works installed: a wheel built from the repo, installed non-editably into a fresh venv, run from
a directory outside the repo, finds its prompts and schemas (package data) and runs the CLI.

Slow (a wheel build, a venv, the CLI importing pyarrow/pydantic from the lent environment): about a minute.
"""

from __future__ import annotations

import json
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.installed import (
    ROOT,
    build_wheel,
    clean_env,
    fresh_venv,
    lend_dependencies,
    run,
    where_is_babelsynth,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(work)
    venv = work / "venv"
    bin_dir = fresh_venv(venv)
    run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], work)
    lend_dependencies(bin_dir)
    outside = tmp_path_factory.mktemp("elsewhere")  # cwd for every command: not the repo, no prompts/ here
    return {"wheel": wheel, "venv": venv, "bin": bin_dir, "cwd": outside}


def test_the_wheel_carries_every_prompt_and_schema():
    """pyproject's package list and package data cover every prompt family and schema file in the repo."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    families = {p.name for p in (ROOT / "prompts").iterdir() if p.is_dir()}
    assert {f"babelsynth._data.prompts.{f}" for f in families} <= set(cfg["packages"])
    code = {
        str(p.parent.relative_to(ROOT / "src")).replace("/", ".") for p in (ROOT / "src").rglob("__init__.py")
    }
    assert code <= set(cfg["packages"]), f"subpackages missing from pyproject: {code - set(cfg['packages'])}"


def test_installed_package_reads_its_data_from_site_packages_not_the_repo(installed):
    where = where_is_babelsynth(installed["bin"], installed["cwd"])
    venv = str(installed["venv"])
    assert where["file"].startswith(venv), where  # the installed copy, not the editable checkout
    assert where["prompts"].startswith(venv) and where["schemas"].startswith(venv), where
    assert where["prompt_id"] == "recaption/captioning.v1" and where["columns"] > 10
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for p in (ROOT / "prompts").rglob("*"):
        if p.is_file():
            assert f"babelsynth/_data/prompts/{p.relative_to(ROOT / 'prompts')}" in names, p
    for p in (ROOT / "schemas").glob("*.yaml"):
        assert f"babelsynth/_data/schemas/{p.name}" in names, p
    # the released prompt hashes hold for the installed copies too
    released = json.loads(Path(where["prompts"], "RELEASED.json").read_text())
    assert released == json.loads((ROOT / "prompts" / "RELEASED.json").read_text())


def test_installed_cli_validates_production_config_and_runs_a_stage(installed, tmp_path):
    cli, cwd = installed["bin"] / "babelsynth", installed["cwd"]
    env = clean_env(VLLM_TEACHER_URL="http://vllm-teacher:8000/v1", VLLM_LLM_URL="http://vllm-llm:8000/v1")
    cfg = json.loads(
        run(
            [cli, "check-config", "--config", ROOT / "configs" / "production.yaml", "--show", "--no-files"],
            cwd,
            env,
        )
    )
    assert cfg["recaption"]["mode"] == cfg["judge"]["mode"] == cfg["translate"]["mode"] == "enforce"
    assert {g["mode"] for g in cfg["score"]["gates"].values()} == {"enforce"}

    data = tmp_path / "in.parquet"
    run([cli, "samples", "--out", data, "--per-task", "2"], cwd, env)
    sets = [
        *("--set", f"input_uri={data}"),
        *("--set", f"output_uri={tmp_path / 'out'}"),
        *("--set", f"cache_dir={tmp_path / 'cache'}"),
    ]
    common = ["--config", ROOT / "configs" / "production.yaml", "--run-id", "installed", *sets]
    assert json.loads(run([cli, "plan", *common], cwd, env)) == [0]
    stats = json.loads(run([cli, "run-stage", *common, "--stage", "ingest", "--shard", "0"], cwd, env))
    assert stats["in"] == 11 and stats["out"] == 8 and stats["rejected"] == 3  # the 3 bad samples
    assert (tmp_path / "out" / "installed" / "_stages" / "ingest").is_dir()
