"""Secrets planted in every place a user can put one reach the model servers and S3, and nothing else: a real
generation run under Airflow (dag.test) is searched, every output object (Parquet decoded, stage results
decompressed), the cache, every log line and every XCom.

The model servers are the session's real vLLM servers behind `ChatProxy` relays that demand the keys (a
request without the right key gets 401), so a run that succeeds proves each secret was really used.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, WORK
from tests.proxies import ChatProxy

pytestmark = pytest.mark.slow
PLANTED = {
    "api_key_env": "sk-teacher-planted-9d3a71c0",  # an env var a config names as models.teacher.api_key_env
    "connection": "sk-conn-planted-5e8f2b14",  # the password of an Airflow connection
    "s3": "aws-secret-planted-77c1d9e2",  # AWS_SECRET_ACCESS_KEY
    "config_ref": "tok-config-planted-3b6e90f5",  # a ${VAR} a config expands (a secret-named variable)
}


def texts_of_bucket(s3, bucket: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            data = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            text = data.decode("utf-8", "replace")
            if o["Key"].endswith(".gz"):
                text = gzip.decompress(data).decode("utf-8", "replace")
            elif o["Key"].endswith(".parquet"):
                rows = pq.read_table(io.BytesIO(data)).to_pylist()
                text += json.dumps(rows, default=lambda b: b.decode("utf-8", "replace"), ensure_ascii=False)
            out[o["Key"]] = text
    return out


def test_planted_secrets_never_reach_an_output_a_log_or_an_xcom(
    models, vllm_servers, sample_input, tmp_path, monkeypatch, capfd, caplog
):
    import boto3
    from airflow.models import DagBag
    from airflow.utils import db
    from moto.server import ThreadedMotoServer

    caplog.set_level("DEBUG")
    teacher = ChatProxy(vllm_servers["teacher"].port, require_key=PLANTED["api_key_env"])
    llm = ChatProxy(vllm_servers["llm"].port, require_key=PLANTED["connection"])
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    try:
        endpoint = "http://{}:{}".format(*moto.get_host_and_port())
        env = {
            "AWS_ACCESS_KEY_ID": "planted-access-id",
            "AWS_SECRET_ACCESS_KEY": PLANTED["s3"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "BABELSYNTH_S3_ENDPOINT_URL": endpoint,
            "BS_TEACHER_KEY": PLANTED["api_key_env"],
            "BS_SOURCE_TOKEN": PLANTED["config_ref"],
            "AIRFLOW_CONN_BABELSYNTH_LLM": f"http://:{PLANTED['connection']}@127.0.0.1:{llm.server.server_port}/v1",
            "BABELSYNTH_WORK": str(tmp_path),
            "BABELSYNTH_MODELS": str(WORK / "models"),
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AIRFLOW_CONN_BABELSYNTH_TEACHER", raising=False)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="planted")
        s3.upload_file(sample_input, "planted", "in/samples.parquet")
        # the run's config: the demo's, naming the teacher's key variable and expanding a secret-named one
        demo = (ROOT / "configs" / "demo.yaml").read_text()
        cfg_text = demo.replace(
            "model: tiny-aya-vision,", "model: tiny-aya-vision, api_key_env: BS_TEACHER_KEY,"
        )
        cfg_text = cfg_text.replace("seed: 0\nmodels:", "seed: 0\n  limit: 4\nmodels:").replace(
            "model_id: tiny-cometkiwi,", 'model_id: "tiny-cometkiwi-${BS_SOURCE_TOKEN}",'
        )
        assert "api_key_env: BS_TEACHER_KEY" in cfg_text and "${BS_SOURCE_TOKEN}" in cfg_text
        (tmp_path / "run.yaml").write_text(cfg_text)
        deploy = tmp_path / "airflow.yaml"
        roots = {"config": [str(tmp_path)], "input": ["s3://planted/in"], "output": ["s3://planted/runs"]}
        deploy.write_text(json.dumps({"allowed_roots": {**roots, "models": [str(WORK / "models")]}}))
        monkeypatch.setenv("BABELSYNTH_AIRFLOW_CONFIG", str(deploy))
        db.resetdb()
        conf = {
            "config_path": str(tmp_path / "run.yaml"),
            "input_uri": "s3://planted/in/samples.parquet",
            "output_uri": "s3://planted/runs",
            "teacher_url": teacher.url,
            "languages": ["deu_Latn"],
            "translator_path": models["nllb_ct2"],
            "comet_path": models["comet"],
        }
        dr = DagBag(dag_folder=str(ROOT / "dags")).dags["babelsynth_generate"].test(run_conf=conf)
        tis = dr.get_task_instances()
        assert dr.state == "success", [(t.task_id, t.map_index, t.state) for t in tis]
        # every secret was used: both relays accepted keyed requests and refused none
        assert teacher.answered() > 0 and llm.answered() > 0
        assert {s for _, _, s in teacher.log + llm.log} <= {200}
        found: dict[str, str] = {}
        found.update(texts_of_bucket(s3, "planted"))
        for p in [*Path(os.environ["AIRFLOW_HOME"]).rglob("*.log"), *tmp_path.rglob("*")]:
            if p.is_file() and p.suffix not in (".parquet",):
                found[str(p)] = p.read_bytes().decode("utf-8", "replace")
        for ti in tis:
            value = ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index)
            found[f"xcom:{ti.task_id}[{ti.map_index}]"] = json.dumps(value, default=str)
        captured = capfd.readouterr()
        found["stdout"], found["stderr"], found["log records"] = captured.out, captured.err, caplog.text
        manifests = [json.loads(t) for k, t in found.items() if k.endswith("manifest.json")]
        assert (
            len(manifests) == 1
            and manifests[0]["config"]["models"]["teacher"]["api_key_env"] == "BS_TEACHER_KEY"
        )
        assert manifests[0]["config"]["models"]["comet"]["model_id"] == "tiny-cometkiwi-***"
        assert len(found) > 20 and any(k.startswith("xcom:commit") for k in found)
        leaks = {name: [k for k, t in found.items() if secret in t] for name, secret in PLANTED.items()}
        assert leaks == {name: [] for name in PLANTED}, leaks
    finally:
        teacher.close()
        llm.close()
        moto.stop()
