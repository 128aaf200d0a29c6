"""`babelsynth check-config` and the `plan` task: deployment problems as one line each, never a traceback,
and a configuration error that fails the task without retries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from babelsynth.checks import ConfigError, check_config, validate_config
from babelsynth.vllm_server import free_port
from tests.conftest import ROOT, WORK

DEMO = ROOT / "configs" / "demo.yaml"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "babelsynth.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BABELSYNTH_")}
    return {**env, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", **extra}


@pytest.fixture
def deployed(tmp_path, monkeypatch):
    """BABELSYNTH_WORK and BABELSYNTH_MODELS pointing at an input file and model files that exist."""
    work, models = tmp_path / "work", tmp_path / "models"
    (work / "input").mkdir(parents=True)
    (work / "input" / "samples.parquet").write_bytes(b"PAR1")
    (models / "nllb" / "ct2").mkdir(parents=True)
    for f in ("model.bin", "sentencepiece.bpe.model"):
        (models / "nllb" / "ct2" / f).write_bytes(b"x")
    (models / "comet" / "cometkiwi" / "checkpoints").mkdir(parents=True)
    (models / "comet" / "cometkiwi" / "checkpoints" / "model.ckpt").write_bytes(b"x")
    monkeypatch.setenv("BABELSYNTH_WORK", str(work))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(models))
    return work, models


def test_every_missing_variable_is_named_with_where_the_config_uses_it(monkeypatch):
    monkeypatch.delenv("BABELSYNTH_WORK", raising=False)
    monkeypatch.delenv("BABELSYNTH_MODELS", raising=False)
    problems = [str(p) for p in check_config(DEMO).problems]
    assert problems == [
        "env: BABELSYNTH_MODELS is not set; demo.yaml uses it in models.comet.path, models.translator.path",
        "env: BABELSYNTH_WORK is not set; demo.yaml uses it in cache_dir, input_uri, output_uri",
    ]


def test_missing_input_and_models_name_the_fix(deployed):
    work, models = deployed
    (work / "input" / "samples.parquet").unlink()
    (models / "nllb" / "ct2" / "model.bin").unlink()
    problems = [str(p) for p in check_config(DEMO).problems]
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"file: input_uri {work}/input/samples.parquet does not exist")
    assert f"babelsynth samples --out {work}/input/samples.parquet" in problems[0]
    assert (
        problems[1]
        == f"file: models.translator.path {models}/nllb/ct2 is not a CTranslate2 model dir (no model.bin)"
    )


def test_invalid_values_are_one_line_each_with_the_field_path(deployed):
    problems = check_config(DEMO, {"run.limit": 0, "run.languages": ["german"]}).problems
    lines = [str(p) for p in problems]
    assert any(line.startswith("config: run.limit: ") for line in lines), lines
    assert any(line.startswith("config: run.languages: ") and "german" in line for line in lines), lines
    assert all("\n" not in line for line in lines)
    with pytest.raises(ConfigError) as e:
        validate_config(DEMO, {"run.limit": 0})
    assert str(e.value).startswith(f"{DEMO}: config: run.limit:")


def test_a_valid_deployment_has_no_problem(deployed):
    checked = check_config(DEMO)
    assert checked.problems == [] and checked.config is not None


def test_probe_reports_an_unreachable_endpoint(deployed):
    port = free_port()  # nothing listens there
    checked = check_config(
        DEMO, {"models.teacher.base_url": f"http://127.0.0.1:{port}/v1"}, probe=True, timeout=2
    )
    teacher = [str(p) for p in checked.problems if "models.teacher" in str(p)]
    assert teacher and teacher[0].startswith(
        f"endpoint: models.teacher.base_url http://127.0.0.1:{port}/v1 is unreachable"
    )


@pytest.mark.slow
def test_probe_checks_the_model_is_served(deployed, vllm_servers):
    over = {
        "models.teacher.base_url": vllm_servers["teacher"].url,
        "models.judge.base_url": vllm_servers["llm"].url,
        "models.rephraser.base_url": vllm_servers["llm"].url,
    }
    assert check_config(DEMO, over, probe=True).problems == []
    wrong = check_config(DEMO, {**over, "models.judge.model": "not-served"}, probe=True).problems
    url = vllm_servers["llm"].url
    assert [str(p) for p in wrong] == [
        f"endpoint: models.judge.model 'not-served' is not served at {url} (it serves ['tiny-llm'])"
    ]


def test_the_cli_prints_one_line_per_problem_and_no_traceback(tmp_path):
    r = cli("check-config", "--config", str(DEMO), env=base_env())
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{DEMO}: env: BABELSYNTH_") for line in lines), r.stderr
    assert "Traceback" not in r.stderr
    # every other command that loads a config says the same, with exit code 2
    r = cli("plan", "--config", str(DEMO), "--run-id", "x", env=base_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr and "BABELSYNTH_WORK is not set" in r.stderr


def test_the_cli_says_ok_on_a_good_config(tmp_path):
    work = tmp_path / "w"
    (work / "input").mkdir(parents=True)
    (work / "input" / "samples.parquet").write_bytes(b"PAR1")
    env = base_env(BABELSYNTH_WORK=str(work), BABELSYNTH_MODELS=str(WORK / "models"))
    r = cli("check-config", "--config", str(DEMO), "--set", "models.translator.path=/nonexistent", env=env)
    assert r.returncode == 1 and "models.translator.path /nonexistent" in r.stderr
    r = cli(
        "check-config",
        "--config",
        str(DEMO),
        "--set",
        "models.translator.path=/",
        "--set",
        "run.limit=3",
        env=env,
    )
    assert r.returncode == 1  # "/" has no model.bin
    (work / "m").mkdir()
    for f in ("model.bin", "sentencepiece.bpe.model"):
        (work / "m" / f).write_bytes(b"x")
    (work / "c.ckpt").write_bytes(b"x")
    r = cli(
        "check-config",
        "--config",
        str(DEMO),
        "--set",
        f"models.translator.path={work / 'm'}",
        "--set",
        f"models.comet.path={work / 'c.ckpt'}",
        env=env,
    )
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {DEMO}: input {work}/input/samples.parquet"), (
        r.stderr
    )


def test_plan_fails_without_retry_on_a_configuration_error(monkeypatch):
    """The operators turn a ConfigError into AirflowFailException: Airflow fails the task, no retry."""
    from airflow.sdk.exceptions import AirflowFailException

    from operators import tasks

    monkeypatch.delenv("BABELSYNTH_WORK", raising=False)
    monkeypatch.setenv("BABELSYNTH_MODELS", "/tmp/m")
    with pytest.raises(AirflowFailException) as e:
        tasks.plan({"config_path": str(DEMO)}, "r1")
    msg = str(e.value)
    assert msg.startswith(f"configuration error, not retried: config {DEMO}")
    assert "BABELSYNTH_WORK is not set" in msg and "Traceback" not in msg


def test_a_stage_task_with_a_configuration_error_fails_without_retry_too(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from operators import params, tasks

    monkeypatch.setenv("BABELSYNTH_WORK", "/tmp/w")
    monkeypatch.setenv("BABELSYNTH_MODELS", "/tmp/m")
    monkeypatch.setenv("BABELSYNTH_CONFIG", str(DEMO))
    with pytest.raises(AirflowFailException, match=r"from \$BABELSYNTH_CONFIG.*\n.*run.shard_size"):
        tasks.run_stage("translate", 0, {"shard_size": 0}, "r1")
    assert params.load({}).run.shard_size == 16  # files are not checked outside plan


def test_config_file_not_found_is_one_line():
    problems = check_config(Path("/nonexistent/run.yaml")).problems
    assert [str(p) for p in problems] == ["file: config file not found: /nonexistent/run.yaml"]


def test_probe_lines_never_print_a_url_password(deployed):
    """An unreachable endpoint is named, but the password in its URL is masked on the printed line."""
    work, models = deployed
    password = "pw-" + "s3cr3t-value-for-the-test"
    url = f"http://bob:{password}@127.0.0.1:{free_port()}/v1"
    env = base_env(BABELSYNTH_WORK=str(work), BABELSYNTH_MODELS=str(models), BABELSYNTH_TEACHER_URL=url)
    r = cli("check-config", "--config", str(DEMO), "--probe", env=env)
    assert r.returncode == 1 and "models.teacher.base_url http://bob:***@127.0.0.1:" in r.stderr, r.stderr
    assert password not in r.stdout + r.stderr and "Traceback" not in r.stderr
