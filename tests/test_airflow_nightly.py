"""The nightly tasks under real Airflow (dag.test): the plan task logs the estimate, a `fail` alarm fails
publish (no retry, no asset event, `latest` unmoved) and reaches the notifiers through on_failure_callback;
a `warn` alarm publishes and notifies; retention runs after either."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, WORK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(models, vllm_servers, sample_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("af_nightly")
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    configs = {}
    for action in ("fail", "warn"):  # an alarm every run trips: the run's kept share can never reach 1.01
        cfg = {
            **demo,
            "nightly": {"alarms": [{"metric": "kept_share", "lang": "all", "min": 1.01, "action": action}]},
        }
        configs[action] = out / f"{action}.yaml"
        configs[action].write_text(yaml.safe_dump(cfg))
    env = {
        "BABELSYNTH_CONFIG": str(ROOT / "configs" / "demo.yaml"),
        "BABELSYNTH_WORK": str(out),
        "BABELSYNTH_MODELS": str(WORK / "models"),
        "BABELSYNTH_TEACHER_URL": vllm_servers["teacher"].url,
        "BABELSYNTH_LLM_URL": vllm_servers["llm"].url,
        "BABELSYNTH_NOTIFIER": "tests.notifier_probe:probe",
        "BABELSYNTH_PROBE_FILE": str(out / "notified.jsonl"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from airflow.models import DagBag
    from airflow.utils import db

    db.resetdb()
    bag = DagBag(dag_folder=str(ROOT / "dags"))  # parsed with the notifier configured
    yield {"out": out, "input": sample_input, "configs": configs, "bag": bag}
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _notified(env) -> list[dict]:
    f = Path(env["out"]) / "notified.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def test_every_task_notifies_through_the_configured_notifier(env):
    from tests.notifier_probe import ProbeNotifier

    for dag_id in ("babelsynth_generate", "babelsynth_train"):
        for t in env["bag"].get_dag(dag_id).tasks:
            cbs = (
                t.on_failure_callback if isinstance(t.on_failure_callback, list) else [t.on_failure_callback]
            )
            assert any(isinstance(c, ProbeNotifier) for c in cbs), f"{dag_id}.{t.task_id}"


def test_the_email_notifier_is_the_smtp_providers(monkeypatch):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    from operators.notify import notifiers

    monkeypatch.delenv("BABELSYNTH_NOTIFIER", raising=False)
    monkeypatch.setenv("BABELSYNTH_NOTIFY_EMAIL", "ops@example.com, data@example.com")
    (n,) = notifiers()
    assert isinstance(n, SmtpNotifier) and n.to == ["ops@example.com", "data@example.com"]
    assert "{{ ti.task_id }}" in n.subject


def test_a_failed_alarm_fails_publish_and_notifies_then_a_warned_run_publishes(env, caplog):
    dag = env["bag"].get_dag("babelsynth_generate")
    conf = {"input_uri": env["input"], "limit": 4, "languages": ["deu_Latn"], "shard_size": 4}
    with caplog.at_level(logging.INFO, logger="babelsynth"):
        dr = dag.test(run_conf={**conf, "config_path": str(env["configs"]["fail"])})
    tis = {t.task_id: t for t in dr.get_task_instances()}
    assert dr.state == "failed"
    assert tis["commit"].state == "success" and tis["publish"].state == "failed"
    assert tis["publish"].try_number == 1  # AirflowFailException: no retry of a verdict
    assert tis["retention"].state == "success"  # housekeeping runs whatever happened
    out = Path(env["out"]) / "output"
    assert not (out / "latest.json").exists()
    run_dir = Path(tis["commit"].xcom_pull(task_ids="commit")["manifest_uri"]).parent
    assert (run_dir / "report.html").exists() and (run_dir / "dataset_card.md").exists()
    estimate = [
        r for r in caplog.records if r.name == "babelsynth.runner" and "total GPU-hours" in r.getMessage()
    ]
    assert len(estimate) == 1 and "recaption teacher" in estimate[0].getMessage()  # the plan task's log
    (sent,) = _notified(env)
    task, event, message = sent["message"].split("|", 2)
    assert (task, event) == ("publish", "failed") and "FAIL kept_share [all]" in message

    dr = dag.test(run_conf={**conf, "config_path": str(env["configs"]["warn"])})
    tis = {t.task_id: t for t in dr.get_task_instances()}
    assert dr.state == "success", [(t.task_id, t.state) for t in tis.values()]
    pub = tis["publish"].xcom_pull(task_ids="publish")
    latest = json.loads((out / "latest.json").read_text())
    assert (
        pub["published"] and latest["run_id"] == dr.run_id and pub["latest_uri"] == str(out / "latest.json")
    )
    warned = _notified(env)[1]
    task, event, message = warned["message"].split("|", 2)
    assert (task, event) == ("publish", "warned") and "WARN kept_share [all]" in message
    assert len(_notified(env)) == 2
