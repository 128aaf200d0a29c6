"""The endpoint hook: an Airflow connection becomes a base_url and the NAME of an env var holding the key.

The key reaches the request header of the task's own client, and never an override, an argv or a repr.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import ROOT

KEY = "sk-live-7d1e9a0c55"
TEACHER = f"http://:{KEY}@vllm-teacher:8000/v1"


@pytest.fixture
def teacher_conn(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_BABELSYNTH_TEACHER", TEACHER)
    monkeypatch.delenv("AIRFLOW_CONN_BABELSYNTH_LLM", raising=False)
    monkeypatch.delenv("BABELSYNTH_TEACHER_API_KEY", raising=False)
    for k, v in {
        "BABELSYNTH_CONFIG": str(ROOT / "configs" / "demo.yaml"),
        "BABELSYNTH_WORK": "/tmp/unused-work",
        "BABELSYNTH_MODELS": "/tmp/unused-models",
    }.items():
        monkeypatch.setenv(k, v)


def test_hook_turns_the_connection_into_a_url_and_an_env_var_name(teacher_conn):
    from operators.hooks import BabelsynthEndpointHook

    hook = BabelsynthEndpointHook("babelsynth_teacher")
    ep = hook.get_conn()
    assert ep.base_url == "http://vllm-teacher:8000/v1" and ep.api_key == KEY
    assert KEY not in repr(ep) + repr(hook)
    over = hook.overrides(("teacher",))
    assert over == {
        "models.teacher.base_url": "http://vllm-teacher:8000/v1",
        "models.teacher.api_key_env": "BABELSYNTH_TEACHER_API_KEY",
    }
    assert os.environ["BABELSYNTH_TEACHER_API_KEY"] == KEY  # exported in this process only
    assert hook.overrides(("teacher",), with_keys=False) == {"models.teacher.base_url": ep.base_url}


def test_the_task_config_names_the_variable_and_the_client_sends_the_key(teacher_conn):
    from babelsynth.backends.registry import make_chat_client
    from operators.params import load

    cfg = load({})
    teacher = cfg.models.teacher
    assert teacher.base_url == "http://vllm-teacher:8000/v1"
    assert teacher.api_key_env == "BABELSYNTH_TEACHER_API_KEY" and KEY not in cfg.model_dump_json()
    client = make_chat_client(teacher)
    assert client._headers() == {"Authorization": f"Bearer {KEY}"} and KEY not in repr(client)


def test_pods_get_the_url_and_never_the_key_in_argv(teacher_conn):
    from operators.placement import load_placement
    from operators.pod import BabelsynthPodStageOperator

    k8s = load_placement(str(ROOT / "configs" / "airflow.yaml")).kubernetes
    op = BabelsynthPodStageOperator(task_id="recaption", stage="recaption", shard=0, k8s=k8s)
    argv = op.argv({"params": {"limit": 4}, "run_id": "r1"})
    assert 'models.teacher.base_url="http://vllm-teacher:8000/v1"' in argv
    assert KEY not in " ".join(argv) + repr(op) and not any("api_key_env" in a for a in argv)


def test_venv_stage_gets_the_variable_name_not_the_key(teacher_conn, monkeypatch):
    from airflow.providers.standard.operators.python import ExternalPythonOperator

    from operators.venv import BabelsynthVenvStageOperator

    monkeypatch.setattr(ExternalPythonOperator, "execute", lambda self, context: {"stage": "recaption"})
    op = BabelsynthVenvStageOperator(task_id="recaption", stage="recaption", shard="1", python="/bin/false")
    assert op.execute({"params": {}, "run_id": "r1"}) == {"shard": 1, "stage": "recaption"}
    assert op.op_kwargs["overrides"]["models.teacher.api_key_env"] == "BABELSYNTH_TEACHER_API_KEY"
    assert KEY not in json.dumps(op.op_kwargs) and os.environ["BABELSYNTH_TEACHER_API_KEY"] == KEY


def test_https_from_the_extra_missing_connections_leave_the_config_alone(monkeypatch):
    from operators.hooks import BabelsynthEndpointHook, endpoint_overrides

    monkeypatch.delenv("AIRFLOW_CONN_BABELSYNTH_TEACHER", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_BABELSYNTH_LLM", raising=False)
    assert endpoint_overrides() == {}
    llm = {"conn_type": "http", "host": "vllm-llm.internal", "schema": "v1", "extra": {"https": True}}
    monkeypatch.setenv("AIRFLOW_CONN_BABELSYNTH_LLM", json.dumps(llm))
    assert endpoint_overrides() == {
        "models.judge.base_url": "https://vllm-llm.internal/v1",
        "models.rephraser.base_url": "https://vllm-llm.internal/v1",
    }
    monkeypatch.setenv("AIRFLOW_CONN_BABELSYNTH_LLM", json.dumps({"conn_type": "http", "password": "k"}))
    with pytest.raises(ValueError, match="'babelsynth_llm' has no host"):
        BabelsynthEndpointHook("babelsynth_llm").get_conn()
