"""Reliability without a model engine: error classes, config drift on resume, S3 faults, secrets, and the
privilege boundary of trigger-time params.

Fault injection uses named fakes: `FaultServer`, an OpenAI-compatible server answering by a script (the
fault is the point, not the model), `S3FaultProxy` (tests/proxies.py), a relay in front of the real moto S3
server that injects 503 SlowDown, connection resets and 403s, and `FlakyWorker`, an engine worker that dies
mid-call.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from babelsynth import fingerprint, redaction, runner, storage
from babelsynth.backends import vllm_offline, vllm_worker
from babelsynth.backends.chat import BackendError, ChatRequest, ChatResult
from babelsynth.backends.chat_http import OpenAIHTTPClient
from babelsynth.cache import Cache
from babelsynth.config import OpenAIHTTPBackend, VLLMOfflineBackend, load_config
from babelsynth.fingerprint import ConfigDriftError
from babelsynth.sample_data import write_samples
from babelsynth.stages import STAGES
from tests.conftest import ROOT
from tests.proxies import S3FaultProxy


def _req(text: str) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], 8, seed=1)


# ---------------------------------------------------------------------------------------------- fakes
class FaultServer:
    """FAKE for fault injection: an OpenAI-compatible endpoint whose answer to each request is decided by
    `script(n, body) -> (status, text)`, n counting requests from 0. /tokenize answers 404."""

    def __init__(self, script):
        self.script, self.bodies, self.statuses = script, [], []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/tokenize"):
                    status, data = 404, {"detail": "Not Found"}
                else:
                    with lock:
                        n = len(fake.bodies)
                        fake.bodies.append(body)
                    status, text = fake.script(n, body)
                    fake.statuses.append(status)
                    data = {
                        "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 5},
                    }
                    if status != 200:
                        data = {"error": {"message": text}}
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_server():
    servers = []

    def make(script):
        servers.append(FaultServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def http_client(url: str, cache=None, **kw) -> OpenAIHTTPClient:
    cfg = OpenAIHTTPBackend(
        base_url=url, model="m", max_concurrency=1, backoff_s=0.01, **{"max_retries": 2, **kw}
    )
    return OpenAIHTTPClient(cfg, cache)


# ---------------------------------------------------------------------------------------------- error classes
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried_then_fail_the_task_never_a_row(fault_server, status, tmp_path):
    srv = fault_server(lambda n, body: (status, "busy"))
    client = http_client(srv.url, Cache(tmp_path / "c.sqlite"))
    with pytest.raises(BackendError, match=f"failed after 3 attempts: HTTP {status}"):
        client.chat_many([_req("a")])
    assert client.sent == 3 and len(srv.bodies) == 3
    assert client.cache.get_many([client.key(_req("a"))]) == {}  # nothing recorded as this row's outcome


@pytest.mark.parametrize("status", [408, 503])
def test_a_transient_status_that_clears_is_retried_to_success(fault_server, status):
    srv = fault_server(lambda n, body: (status, "busy") if n < 2 else (200, "ok"))
    (res,) = http_client(srv.url).chat_many([_req("a")])
    assert res.error is None and res.text == "ok" and srv.statuses == [status, status, 200]


@pytest.mark.parametrize("status", [401, 403, 404, 405, 413, 422])
def test_a_status_every_request_would_get_fails_the_task_at_once(fault_server, status):
    srv = fault_server(lambda n, body: (status, "nope"))
    client = http_client(srv.url)
    with pytest.raises(BackendError, match=f"HTTP {status}.*every request would fail") as e:
        client.chat_many([_req(t) for t in "abc"])
    assert e.value.status == status and client.sent == 1


def test_only_a_400_is_the_rows_outcome(fault_server):
    srv = fault_server(lambda n, body: (400, "prompt too long") if "long" in str(body) else (200, "ok"))
    res = http_client(srv.url).chat_many([_req("a"), _req("too long"), _req("b")])
    assert [r.error for r in res] == [
        None,
        "HTTP 400: " + json.dumps({"error": {"message": "prompt too long"}}),
        None,
    ]


class FlakyWorker:
    """FAKE engine worker for fault injection: answers requests in order but dies (as a killed process
    does, BackendError) after `die_after[k]` answers on its k-th call."""

    def __init__(self, die_after: list[int | None]):
        self.die_after, self.calls = die_after, []

    def call(self, msg, on_item=None):
        self.calls.append([b["messages"][-1]["content"] for b in msg["requests"]])
        limit = self.die_after[len(self.calls) - 1] if len(self.calls) <= len(self.die_after) else None
        for i, body in enumerate(msg["requests"]):
            if limit is not None and i == limit:
                raise BackendError("vLLM offline worker exited with code -9")
            on_item(
                {"i": i, "result": ChatResult(body["messages"][-1]["content"].upper(), "stop", 1, 1).record()}
            )
        return {}


def test_offline_engine_death_restarts_within_the_bound_and_repeats_no_answered_request(
    tmp_path, monkeypatch
):
    worker = FlakyWorker([2])  # dies after 2 answers, then works
    monkeypatch.setattr(vllm_offline, "worker_for", lambda cfg: worker)
    client = vllm_offline.VLLMOfflineClient(
        VLLMOfflineBackend(model="m", path="/x", max_restarts=1), Cache(tmp_path / "c")
    )
    res = client.chat_many([_req(t) for t in "abcde"])
    assert [r.text for r in res] == list("ABCDE") and client.restarts == 1
    assert worker.calls == [list("abcde"), list("cde")]  # a, b answered once: never asked again


def test_offline_engine_that_keeps_dying_fails_the_task_after_the_bound(tmp_path, monkeypatch):
    worker = FlakyWorker([1, 1])
    monkeypatch.setattr(vllm_offline, "worker_for", lambda cfg: worker)
    cache = Cache(tmp_path / "c")
    client = vllm_offline.VLLMOfflineClient(VLLMOfflineBackend(model="m", path="/x", max_restarts=1), cache)
    with pytest.raises(BackendError, match=r"failed 2 time\(s\).*max_restarts=1"):
        client.chat_many([_req(t) for t in "abc"])
    assert (
        worker.calls == [list("abc"), list("bc")]
        and len(cache.get_many([client.key(_req(t)) for t in "abc"])) == 2
    )


class FakeLLM:
    """FAKE engine for the worker's classification: raises `error` when a conversation says "boom"."""

    def __init__(self, error: BaseException):
        self.error = error

    def chat(self, convs, params, use_tqdm=False):
        if any("boom" in json.dumps(c) for c in convs):
            raise self.error
        return [
            type(
                "Out",
                (),
                {
                    "outputs": [type("C", (), {"text": "ok", "finish_reason": "stop", "token_ids": [1]})],
                    "prompt_token_ids": [1, 2],
                },
            )
            for _ in convs
        ]


class EngineDeadError(RuntimeError):  # the names vLLM and torch use; the worker matches names (no import)
    pass


class OutOfMemoryError(RuntimeError):
    pass


def test_the_engine_worker_turns_only_request_errors_into_row_errors(monkeypatch):
    monkeypatch.setattr(vllm_worker, "sampling_params", lambda body: None)
    bodies = [{"messages": [{"role": "user", "content": t}]} for t in ("a", "boom", "b")]
    out = vllm_worker.chat_batch(FakeLLM(ValueError("prompt is longer than max_model_len")), bodies)
    assert [("result" in o, "error" in o) for o in out] == [(True, False), (False, True), (True, False)]
    for fatal in (
        EngineDeadError("engine core died"),
        OutOfMemoryError("CUDA out of memory"),
        RuntimeError("x"),
    ):
        with pytest.raises(type(fatal)):
            vllm_worker.chat_batch(FakeLLM(fatal), bodies)
    assert vllm_worker.request_error(ValueError()) and not vllm_worker.request_error(OutOfMemoryError())


# ---------------------------------------------------------------------------------------------- stage level
@pytest.fixture
def demo_cfg(tmp_path, monkeypatch):
    """The demo config on 8 sample records (no model is loaded unless a test runs a model stage)."""
    monkeypatch.setenv("BABELSYNTH_WORK", str(tmp_path))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(tmp_path / "models"))
    write_samples(str(tmp_path / "input" / "samples.parquet"), n_per_task=2, bad=False)

    def make(**over):
        return load_config("configs/demo.yaml", {"run.shard_size": 8, **over})

    return make


ANSWER = "<answer>A red circle drawn in the middle of a white square canvas.</answer>"


def _teacher(demo_cfg, url: str, **over):
    cfg = demo_cfg(
        **{
            "models.teacher.base_url": url,
            "models.teacher.max_retries": 1,
            "models.teacher.backoff_s": 0.01,
            "models.teacher.max_concurrency": 2,
            **over,
        }
    )
    runner.plan(cfg, "r")
    runner.run_stage(cfg, "r", "ingest", 0)
    return cfg


def test_a_server_outage_fails_the_stage_and_persists_nothing(demo_cfg, fault_server):
    srv = fault_server(lambda n, body: (503, "down") if n >= 3 else (200, ANSWER))
    cfg = _teacher(demo_cfg, srv.url)
    with pytest.raises(BackendError, match="HTTP 503"):
        runner.run_stage(cfg, "r", "recaption", 0)
    assert not runner.layout(cfg, "r").has_stage_result("recaption", 0)


def test_too_many_row_errors_fail_the_stage_instead_of_writing_rejects(demo_cfg, fault_server):
    srv = fault_server(lambda n, body: (400, "bad request") if n % 2 else (200, ANSWER))
    cfg = _teacher(demo_cfg, srv.url)
    with pytest.raises(
        runner.StageErrorRateError, match=r"4 of 8 rows ended in request errors.*max_error_rate=0.1"
    ):
        runner.run_stage(cfg, "r", "recaption", 0)
    assert not runner.layout(cfg, "r").has_stage_result("recaption", 0)


def test_a_few_row_errors_become_rejects_under_the_bound(demo_cfg, fault_server):
    srv = fault_server(lambda n, body: (400, "image unreadable") if n == 0 else (200, ANSWER))
    cfg = _teacher(demo_cfg, srv.url)
    st = runner.run_stage(cfg, "r", "recaption", 0)
    assert st["reasons"] == {"teacher_request_rejected": 1} and st["out"] == 7


# ---------------------------------------------------------------------------------------------- config drift
def test_fingerprints_ignore_how_a_model_is_reached_and_name_what_it_answers(demo_cfg):
    a = demo_cfg()
    keys = fingerprint.stage_keys(STAGES, "recaption")
    moved = demo_cfg(
        **{"models.teacher.base_url": "http://elsewhere/v1", "models.teacher.max_concurrency": 3}
    )
    assert fingerprint.drift(fingerprint.leaves(a, keys), fingerprint.leaves(moved, keys)) == []
    other = demo_cfg(**{"models.teacher.model": "aya-32b", "recaption.temperature": 0.1})
    assert fingerprint.drift(fingerprint.leaves(a, keys), fingerprint.leaves(other, keys)) == [
        "models.teacher.model",
        "recaption.temperature",
    ]
    assert (
        fingerprint.refused(
            ["score.gates.comet.threshold", "score.selection_margin", "models.comet.path"], STAGES
        )
        == []
    )
    assert fingerprint.refused(["run.languages", "judge.mode"], STAGES) == ["run.languages", "judge.mode"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ingest.max_text_chars", 100),
        ("run.shard_size", 4),
        ("models.teacher.model", "other"),
        ("run.languages", ["deu_Latn"]),
    ],
)
def test_a_retrigger_with_another_config_is_refused_naming_the_keys(demo_cfg, key, value):
    cfg = demo_cfg()
    runner.plan(cfg, "drift")
    before = runner.run_stage(cfg, "drift", "ingest", 0)
    changed = demo_cfg(**{key: value})
    with pytest.raises(ConfigDriftError, match=rf"{key}[^,]* differ") as e:
        runner.plan(changed, "drift")
    assert "new run id" in str(e.value)
    if key.startswith("ingest"):  # a stage task reached directly is refused too, nothing rewritten
        with pytest.raises(ConfigDriftError, match=key):
            runner.run_stage(changed, "drift", "ingest", 0)
    assert runner.run_stage(cfg, "drift", "ingest", 0) == before


def test_a_retrigger_that_changes_only_gates_or_transport_is_accepted(demo_cfg):
    cfg = demo_cfg()
    shards = runner.plan(cfg, "ok")
    runner.run_stage(cfg, "ok", "ingest", 0)
    again = demo_cfg(**{"score.gates.comet.threshold": 0.9, "models.judge.base_url": "http://x/v1"})
    assert runner.plan(again, "ok") == shards
    assert runner.run_stage(again, "ok", "ingest", 0)["in"] == 8


# ---------------------------------------------------------------------------------------------- S3 faults
@pytest.fixture
def s3(monkeypatch):
    """The real S3 protocol (moto's server) behind the fault proxy; boto3 talks to the proxy."""
    import boto3
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    proxy = S3FaultProxy(moto.get_host_and_port())
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BABELSYNTH_S3_ENDPOINT_URL", proxy.url)
    direct = boto3.client("s3", endpoint_url="http://{}:{}".format(*moto.get_host_and_port()))
    direct.create_bucket(Bucket="bkt")
    yield proxy, direct
    proxy.close()
    moto.stop()


def test_s3_slowdown_and_a_reset_mid_upload_are_retried_and_the_object_completes(s3):
    proxy, direct = s3
    data = os.urandom(256 * 1024)
    proxy.faults = ["slowdown", "reset", "slowdown"]
    storage.write_bytes("s3://bkt/runs/r/shard.parquet", data)
    assert direct.get_object(Bucket="bkt", Key="runs/r/shard.parquet")["Body"].read() == data
    puts = [o for m, p, o in proxy.log if m == "PUT"]
    assert puts == ["503", "reset", "503", "200"]  # each fault retried; one complete object in the end


def test_s3_permission_denied_is_an_error_not_missing(s3):
    proxy, direct = s3
    direct.put_object(Bucket="bkt", Key="runs/r/manifest.json", Body=b"{}")
    assert storage.exists("s3://bkt/runs/r/manifest.json") and not storage.exists("s3://bkt/runs/r/nothing")
    proxy.deny = "manifest"
    with pytest.raises(storage.StoragePermissionError, match=r"denied \(HTTP 403\).*not treated as missing"):
        storage.exists("s3://bkt/runs/r/manifest.json")


def test_a_run_on_s3_under_throttling_and_resets_completes_its_stages(s3, demo_cfg):
    proxy, direct = s3
    cfg = demo_cfg(**{"output_uri": "s3://bkt/runs"})
    proxy.faults = ["slowdown", "reset", "ok", "reset", "slowdown"]
    runner.plan(cfg, "s3throttle")
    st = runner.run_stage(cfg, "s3throttle", "ingest", 0)
    assert st["in"] == st["out"] == 8
    keys = {o["Key"] for o in direct.list_objects_v2(Bucket="bkt", Prefix="runs/s3throttle/")["Contents"]}
    assert "runs/s3throttle/_stages/ingest/shard=00000.json.gz" in keys
    assert [o for m, _, o in proxy.log if m == "PUT"].count("reset") == 2


# ---------------------------------------------------------------------------------------------- secrets
SECRET = "sk-planted-5b1c7e99"


def test_secret_values_are_found_by_name_by_api_key_env_and_in_uris(demo_cfg):
    env = {
        "AWS_SECRET_ACCESS_KEY": "aws-" + SECRET,
        "MY_TEACHER_CRED": "named-by-config-" + SECRET,
        "SOME_CONN": "http://user:conn-" + SECRET + "@host:80/v1",
        "TOKENIZERS_PARALLELISM": "false-not-a-secret",
        "BABELSYNTH_WORK": "/tmp/a-path",
        "PWD": "/srv/checkout",  # the shell's working directory: printed paths must stay readable
    }
    cfg = demo_cfg(**{"models.teacher.api_key_env": "MY_TEACHER_CRED"})
    values = redaction.secret_values(cfg, env)
    assert {"aws-" + SECRET, "named-by-config-" + SECRET, "conn-" + SECRET} <= values
    assert (
        "/tmp/a-path" not in values and "false-not-a-secret" not in values and "/srv/checkout" not in values
    )
    doc = {"config": {"base_url": "http://u:conn-" + SECRET + "@h/v1", "x": ["aws-" + SECRET]}}
    assert SECRET not in json.dumps(redaction.redact(doc, values))


def test_check_config_and_the_cli_logs_never_print_a_secret(tmp_path):
    cfg = tmp_path / "c.yaml"
    text = (
        (ROOT / "configs" / "demo.yaml")
        .read_text()
        .replace("model: tiny-aya-vision,", "model: tiny-aya-vision, api_key_env: BS_TEACHER_KEY,")
    )
    old = '"${BABELSYNTH_TEACHER_URL:-http://127.0.0.1:8011/v1}"'
    assert old in text
    cfg.write_text(text.replace(old, '"http://bob:${BS_URL_PASSWORD}@127.0.0.1:8011/v1"'))
    env = {k: v for k, v in os.environ.items() if k != "BABELSYNTH_TEACHER_URL"}
    env = {
        **env,
        "BABELSYNTH_WORK": str(tmp_path),
        "BABELSYNTH_MODELS": str(tmp_path),
        "BS_TEACHER_KEY": SECRET,
        "BS_URL_PASSWORD": "pw-" + SECRET,
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
    }
    for f in ("input/samples.parquet", "nllb/ct2/model.bin", "nllb/ct2/sentencepiece.bpe.model"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)  # check-config checks the files exist
        (tmp_path / f).write_bytes(b"x")
    (tmp_path / "comet/cometkiwi/checkpoints").mkdir(parents=True)
    (tmp_path / "comet/cometkiwi/checkpoints/model.ckpt").write_bytes(b"x")
    out = subprocess.run(
        [sys.executable, "-m", "babelsynth.cli", "check-config", "--config", str(cfg), "--show"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["models"]["teacher"]["base_url"] == "http://bob:***@127.0.0.1:8011/v1"
    assert SECRET not in out.stdout + out.stderr


def test_the_log_filter_masks_secret_values_in_messages_and_arguments(monkeypatch):
    import logging

    monkeypatch.setenv("BS_API_KEY", SECRET)
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "sending with key %s to %s", (SECRET, "h"), None)
    assert (
        redaction.RedactingFilter().filter(rec)
        and SECRET not in rec.getMessage()
        and "***" in rec.getMessage()
    )


# ------------------------------------------------------------------------------------- privilege boundary
def test_path_params_must_stay_under_the_allowed_roots(tmp_path):
    from operators.boundary import AllowedRoots, ParamBoundaryError, allowed, check_params, pattern

    root = tmp_path / "data"
    (root / "in").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "in" / "link").symlink_to(tmp_path / "secret")
    roots = [str(root / "in"), "s3://bucket/babelsynth"]
    ok = [
        str(root / "in" / "x.parquet"),
        str(root / "in"),
        f"file://{root}/in/y",
        "s3://bucket/babelsynth/runs/a",
    ]
    bad = [
        "/etc/passwd",
        str(root / "in" / ".." / ".." / "secret" / "x"),  # traversal
        str(root / "inx" / "x"),  # a prefix that is not a directory boundary
        str(root / "in" / "link" / "x"),  # a symlink out of the root
        "s3://other-bucket/babelsynth/x",
        "s3://bucket/babelsynth-evil/x",
        "s3://bucket/babelsynth/../other/x",
        "relative/path",
        "http://attacker.example/x",
    ]
    assert all(allowed(v, roots) for v in ok)
    assert not any(allowed(v, roots) for v in bad)
    import re

    pat = re.compile(pattern(roots))
    assert all(pat.search(v) for v in ok if not v.startswith("file://"))
    assert not any(pat.search(v) for v in bad[:3] + bad[4:])  # only resolving can catch the symlink
    assert re.compile(pattern([])).search("/anything") is None
    limits = AllowedRoots(input=roots)
    check_params({"input_uri": ok[0], "languages": ["deu_Latn"]}, limits)
    with pytest.raises(ParamBoundaryError, match=r"input_uri=.*allowed_roots.input.*set by the deployment"):
        check_params({"input_uri": bad[3]}, limits)
    with pytest.raises(ParamBoundaryError, match=r"comet_path.*none"):
        check_params({"comet_path": ok[0]}, limits)


@pytest.fixture(scope="module")
def guarded_bag(tmp_path_factory):
    """The DAG parsed under a deployment that allows only <tmp>/allowed (and the test configs)."""
    from airflow.models import DagBag
    from airflow.utils import db

    db.resetdb()  # dag.test validates params against the metadata DB's copy of the DAG
    tmp = tmp_path_factory.mktemp("guarded")
    allowed = tmp / "allowed"
    allowed.mkdir()
    deploy = tmp / "airflow.yaml"
    roots = {
        "config": [str(ROOT / "configs")],
        "input": [str(allowed)],
        "output": [str(allowed)],
        "models": [str(allowed)],
    }
    deploy.write_text(json.dumps({"allowed_roots": roots}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BABELSYNTH_AIRFLOW_CONFIG", str(deploy))
        yield DagBag(dag_folder=str(ROOT / "dags")), allowed, deploy


@pytest.mark.parametrize(
    ("dag_id", "conf"),
    [
        ("babelsynth_generate", {"input_uri": "/etc/passwd"}),
        ("babelsynth_generate", {"output_uri": "s3://someone-elses-bucket/x"}),
        ("babelsynth_generate", {"config_path": "/tmp/evil.yaml"}),
        ("babelsynth_generate", {"translator_path": "/root/.cache/model"}),
        ("babelsynth_generate", {"comet_path": "{allowed}/../../outside.ckpt"}),
        ("babelsynth_train", {"manifest_uri": "/etc/manifest.json"}),
        ("babelsynth_train", {"train_config": "/tmp/evil.yaml"}),
        ("babelsynth_train", {"out_uri": "{allowed}/../elsewhere"}),
    ],
)
def test_a_path_param_outside_the_roots_is_refused_at_trigger_time(guarded_bag, dag_id, conf):
    from airflow.sdk.exceptions import ParamValidationError

    bag, allowed, _ = guarded_bag
    conf = {k: v.format(allowed=allowed) for k, v in conf.items()}
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {next(iter(conf))}"):
        bag.dags[dag_id].test(run_conf=conf)


def test_what_the_trigger_pattern_lets_through_fails_the_task_before_any_read(
    guarded_bag, tmp_path, models, monkeypatch
):
    from airflow.sdk.exceptions import AirflowFailException

    from operators import tasks
    from operators.boundary import ParamBoundaryError

    _, allowed, deploy = guarded_bag
    monkeypatch.setenv("BABELSYNTH_AIRFLOW_CONFIG", str(deploy))  # what the workers of that deployment read
    (tmp_path / "secret").mkdir()
    (allowed / "link").symlink_to(tmp_path / "secret")
    write_samples(str(tmp_path / "secret" / "in.parquet"), n_per_task=1, bad=False)
    write_samples(str(allowed / "input" / "samples.parquet"), n_per_task=1, bad=False)
    monkeypatch.setenv("BABELSYNTH_WORK", str(allowed))
    # the deployment's own models (plan checks their files exist; the boundary is for params only)
    monkeypatch.setenv("BABELSYNTH_MODELS", os.path.dirname(os.path.dirname(models["nllb_ct2"])))
    params = {"input_uri": str(allowed / "link" / "in.parquet"), "output_uri": str(allowed / "out")}
    with pytest.raises(AirflowFailException, match="input_uri") as e:  # no retry: it cannot help
        tasks.plan(params, "boundary")
    assert isinstance(e.value.__cause__, ParamBoundaryError)
    assert not (allowed / "out").exists()  # nothing was read or written
    assert tasks.plan({"output_uri": str(allowed / "out")}, "inside") == [0]  # the deployment's input is fine


# ---------------------------------------------------------------------------------------------- honest tests
def test_no_test_can_skip():
    """CI runs every test, slow engine tests included: a missing engine or package is a failure."""
    import ast

    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("skip", "importorskip", "skipif", "xfail"):
                found.append(f"{path.name}:{node.lineno} {node.attr}")
    assert found == [], found
