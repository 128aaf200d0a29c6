"""Teacher stage in depth: recaption + stage-1 rules + stage-2 judge on real vLLM (server and offline).

Requests that reach a server are counted by `CountingProxy`, a measurement and fault-injection relay in
front of a real vLLM server (it answers 502 while the server is down, as a load balancer would).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import io
import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from babelsynth import runner
from babelsynth.backends.chat import BackendError, ChatRequest, image_data_url
from babelsynth.backends.chat_http import OpenAIHTTPClient
from babelsynth.cache import Cache
from babelsynth.config import OpenAIHTTPBackend, VLLMOfflineBackend, config_from_dict
from babelsynth.prompts import load_prompt
from babelsynth.vllm_server import free_port
from tests.conftest import WORK, make_config

SECRET = "sk-test-4f9c2b7e1d"  # the fault server's API key; must never show in a log line or a repr
CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- measurement / fault-injection tool
class CountingProxy:
    """HTTP relay that logs (path, body sha256, upstream status, body) for every request it forwards."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.log: list[tuple[str, str, int, bytes]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")
                }
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                    conn.request("POST", self.path, body, headers)
                    r = conn.getresponse()
                    status, data = r.status, r.read()
                    conn.close()
                except OSError as e:
                    status, data = 502, f"upstream unreachable: {type(e).__name__}".encode()
                with proxy._lock:
                    proxy.log.append((self.path, hashlib.sha256(body).hexdigest(), status, body))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = (
                256  # the default backlog of 5 resets connections under 16 concurrent clients
            )

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def entries(self, path: str = CHAT, status: int | None = None) -> list[tuple[str, str, int, bytes]]:
        with self._lock:
            return [e for e in self.log if e[0] == path and (status is None or e[2] == status)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def teacher_input(tmp_path_factory) -> str:
    """20 good records, 5 per task type (captioning, vqa, ocr, chart)."""
    from babelsynth.sample_data import write_samples

    uri = str(tmp_path_factory.mktemp("teacher_in") / "samples.parquet")
    write_samples(uri, n_per_task=5, bad=False)
    return uri


def _cfg(models, teacher_url: str, llm_url: str, input_uri: str, out: Path, **over):
    servers = {"teacher": SimpleNamespace(url=teacher_url), "llm": SimpleNamespace(url=llm_url)}
    return make_config(
        models, servers, input_uri, str(out), str(out / "cache"), **{"run.shard_size": 64, **over}
    )


def _run(cfg, run_id: str, stages=("ingest", "recaption", "judge")) -> dict:
    runner.plan(cfg, run_id)
    return {s: runner.run_stage(cfg, run_id, s, 0) for s in stages}


# ---------------------------------------------------------------- API key, images, unreachable server
def test_api_key_is_read_from_the_env_var_the_config_names(monkeypatch):
    client = OpenAIHTTPClient(OpenAIHTTPBackend(base_url="http://h/v1", model="m", api_key_env="BS_KEY"))
    monkeypatch.setenv("BS_KEY", "from-env")
    assert client._headers() == {"Authorization": "Bearer from-env"}
    assert "from-env" not in repr(client)
    monkeypatch.delenv("BS_KEY")
    assert client._headers() == {"Authorization": "Bearer EMPTY"}  # vLLM started without --api-key


def test_a_config_naming_an_airflow_connection_is_refused_with_the_way_out():
    """The library reads no Airflow connection: the operators' hook does, and hands over api_key_env."""
    with pytest.raises(ValueError, match="api_key_conn_id") as e:
        OpenAIHTTPBackend(base_url="http://h/v1", model="m", api_key_conn_id="vllm_teacher")
    assert "BabelsynthEndpointHook" in str(e.value) and "api_key_env" in str(e.value)


def test_images_are_resized_to_the_configured_maximum():
    from PIL import Image

    def size_of(url: str) -> tuple[int, int]:
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size

    buf = io.BytesIO()
    Image.new("RGB", (800, 400), (10, 200, 30)).save(buf, format="JPEG")
    assert size_of(image_data_url(buf.getvalue(), 224)) == (224, 112)  # aspect kept
    small = image_data_url(buf.getvalue(), 1024)  # within the bound: the original bytes, never re-encoded
    assert small == "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    gif = io.BytesIO()
    Image.new("RGB", (100, 50)).save(gif, format="GIF")  # a format not every server takes: re-encoded
    assert image_data_url(gif.getvalue(), 1024).startswith("data:image/png;base64,")


def test_unreachable_server_fails_with_the_url_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIHTTPClient(OpenAIHTTPBackend(base_url=url, model="m", max_retries=2, backoff_s=0.01))
    with pytest.raises(BackendError) as e:
        client.chat_many([ChatRequest([{"role": "user", "content": "hi"}], 4)])
    assert f"{url}/chat/completions" in str(e.value) and "failed after 3 attempts" in str(e.value)
    assert client.sent == 3


def test_offline_backend_is_chosen_by_kind_and_validated():
    base = {
        "input_uri": "x",
        "output_uri": "y",
        "models": {
            "judge": {"kind": "openai_http", "base_url": "http://h/v1", "model": "j"},
            "rephraser": {"kind": "openai_http", "base_url": "http://h/v1", "model": "j"},
            "translator": {"kind": "ct2_nllb", "path": "p"},
            "comet": {"kind": "comet", "path": "c"},
        },
    }
    cfg = config_from_dict(
        {
            **base,
            "models": {
                **base["models"],
                "teacher": {"kind": "vllm_offline", "model": "t", "path": "/models/aya"},
            },
        }
    )
    assert isinstance(cfg.models.teacher, VLLMOfflineBackend)
    with pytest.raises(ValueError, match="base_url"):  # an offline field on an HTTP backend is refused
        config_from_dict(
            {
                **base,
                "models": {
                    **base["models"],
                    "teacher": {"kind": "openai_http", "model": "t", "path": "/models/aya"},
                },
            }
        )


# ---------------------------------------------------------------- real vLLM servers (shared fixture)
@pytest.mark.slow
def test_recaption_and_judge_on_vllm_server_then_rerun_makes_no_request(
    models, vllm_servers, teacher_input, tmp_path
):
    proxy = CountingProxy(vllm_servers["teacher"].port)
    try:
        cfg = _cfg(
            models,
            proxy.url,
            vllm_servers["llm"].url,
            teacher_input,
            tmp_path,
            **{
                "models.teacher.image_max_side": 64,
                "models.teacher.image_max_side_by_task": {},  # one limit for every task type here
                "recaption.mode": "report",
            },
        )
        st = _run(cfg, "teacher-1")
        rec, jud = st["recaption"], st["judge"]
        assert rec["in"] == 20 and rec["in"] == rec["out"] + rec["rejected"]
        # every request reached the real server through the proxy; the client's counter agrees
        sent = proxy.entries()
        assert len(sent) == rec["requests_sent"] == 20 and all(e[2] == 200 for e in sent)
        # images in the requests were downscaled to the configured maximum
        from PIL import Image

        for e in sent:
            url = next(p for p in json.loads(e[3])["messages"][1]["content"] if p["type"] == "image_url")
            im = Image.open(io.BytesIO(base64.b64decode(url["image_url"]["url"].split(",", 1)[1])))
            assert max(im.size) == 64
        # metrics per task type: words, tokens (the teacher's tokenizer, via /tokenize) and MTLD before/after
        bt = rec["by_task"]
        assert set(bt) == {"captioning", "vqa", "ocr", "chart", "all"}
        for task, d in bt.items():
            assert d["records"] == (20 if task == "all" else 5)
            assert (
                d["measured"]
                == d["tokens_measured"]
                == d["records"] - d["stage1_dropped"] - d.get("request_errors", 0)
            )
            if d["measured"]:
                assert (
                    d["words_before"] > 0 and d["tokens_before"] > 0 and d["mtld_before_n"] == d["measured"]
                )
                assert d["tokens_after_mean"] == round(d["tokens_after"] / d["tokens_measured"], 4)
            assert d["stage1_drop_rate"] == round(d["stage1_dropped"] / d["records"], 4)
        assert bt["all"]["stage1_dropped"] == rec["rejected"] - bt["all"].get("request_errors", 0)
        assert len(proxy.entries("/tokenize")) == rec["tokenize_requests"] > 0
        # stage 2: every verdict parsed; NO rows dropped with the explanation kept
        jb = jud["by_task"]["all"]
        assert jb["judged"] == jud["in"] == rec["out"] and jb["stage2_dropped"] == jud["rejected"]
        assert jb["stage2_drop_rate"] == round(jud["rejected"] / jud["in"], 4)
        res = runner.layout(cfg, "teacher-1").read_stage_result("judge", 0)
        assert all(r["judge_decision"] == "YES" for r in res["rows"])
        assert all(r["reason"] == "judge_rejected" and r["detail"] for r in res["rejected"])
        assert all(json.loads(r["record"])["judge_decision"] == "NO" for r in res["rejected"])
        kept = runner.layout(cfg, "teacher-1").read_stage_result("recaption", 0)["rows"]
        for r in kept:
            p = load_prompt("recaption", r["task_type"], 1)
            assert (r["recaption_prompt_id"], r["recaption_prompt_sha"]) == (p.id, p.sha)

        # a re-triggered run over the same input: every answer comes from the cache, nothing reaches a server
        n_before = len(proxy.log)
        st2 = _run(cfg, "teacher-2")
        assert len(proxy.log) == n_before
        assert st2["recaption"]["requests_sent"] == st2["judge"]["requests_sent"] == 0
        assert st2["recaption"]["by_task"] == rec["by_task"] and st2["judge"]["out"] == jud["out"]
    finally:
        proxy.close()


@pytest.mark.slow
def test_flagged_outputs_are_regenerated_under_new_seeds_then_dropped(
    models, vllm_servers, teacher_input, tmp_path
):
    """Enforce mode: the tiny model's noise trips rules (no <answer> tag, cut at max_tokens), so each record
    is asked again under a new seed, then dropped with the first reason and the flags of every attempt."""
    proxy = CountingProxy(vllm_servers["teacher"].port)
    try:
        cfg = _cfg(
            models,
            proxy.url,
            vllm_servers["llm"].url,
            teacher_input,
            tmp_path,
            **{
                "recaption.mode": "enforce",
                "recaption.max_regenerations": 2,
                "run.limit": 4,
                "judge.enabled": False,
            },
        )
        rec = _run(cfg, "regen", stages=("ingest", "recaption"))["recaption"]
        bodies = [json.loads(e[3]) for e in proxy.entries()]
        assert rec["regenerated"] == rec["in"] == 4 and len(bodies) == rec["requests_sent"] == 12
        assert len({b["seed"] for b in bodies}) == 12  # 3 attempts x 4 records, each under its own seed
        assert all(
            len({json.dumps(b["messages"]) for b in bodies if b["seed"] == s}) == 1
            for s in {b["seed"] for b in bodies}
        )
        res = runner.layout(cfg, "regen").read_stage_result("recaption", 0)
        assert rec["rejected"] == len(res["rejected"]) == rec["by_task"]["all"]["stage1_dropped"] == 4
        for r in res["rejected"]:
            rec_row = json.loads(r["record"])
            assert rec_row["recaption_attempts"] == 3 and r["reason"] == rec_row["filter_flags"][0]
            assert r["detail"].startswith("flags per attempt: [[") and "missing_answer_tag" in r["detail"]
        assert rec["by_task"]["all"]["stage1_drop_rate"] == 1.0
    finally:
        proxy.close()


# ---------------------------------------------------------------- our own server: API key, kill, restart
@pytest.fixture(scope="module")
def keyed_teacher(models):
    from babelsynth.vllm_server import VLLMServer

    srv = VLLMServer(
        models["vlm"],
        served_model_name="tiny-aya-vision",
        work_dir=WORK / "vllm-fault",
        extra_args=["--api-key", SECRET],
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_api_key_authenticates_and_never_shows(keyed_teacher, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)  # httpx/httpcore debug logging included
    cfg = OpenAIHTTPBackend(
        base_url=keyed_teacher.url,
        model="tiny-aya-vision",
        api_key_env="BS_TEACHER_KEY",
        max_retries=1,
        backoff_s=0.01,
    )
    req = ChatRequest([{"role": "user", "content": "hello"}], 4, seed=1)
    monkeypatch.delenv("BS_TEACHER_KEY", raising=False)
    no_key = OpenAIHTTPClient(cfg)
    with pytest.raises(
        BackendError, match="HTTP 401"
    ) as e:  # a wrong key fails the task at once, not each row
        no_key.chat_many([req])
    assert keyed_teacher.url in str(e.value) and no_key.sent == 1
    monkeypatch.setenv("BS_TEACHER_KEY", SECRET)
    client = OpenAIHTTPClient(cfg)
    (res,) = client.chat_many([req])
    assert res.error is None and res.completion_tokens > 0
    shown = caplog.text + repr(client) + repr(cfg) + str(cfg.model_dump()) + str(e.value) + repr(res)
    assert SECRET not in shown and "POST" in caplog.text  # the requests were logged, the key was not


@pytest.mark.slow
def test_server_killed_mid_stage_then_rerun_repeats_no_finished_request(
    models, keyed_teacher, teacher_input, tmp_path, monkeypatch
):
    monkeypatch.setenv("BS_TEACHER_KEY", SECRET)
    proxy = CountingProxy(keyed_teacher.port)
    try:
        cfg = _cfg(
            models,
            proxy.url,
            proxy.url,
            teacher_input,
            tmp_path,
            **{
                "models.teacher.api_key_env": "BS_TEACHER_KEY",
                "models.teacher.max_concurrency": 2,
                "models.teacher.max_retries": 2,
                "models.teacher.backoff_s": 0.3,
                "recaption.mode": "report",
            },
        )
        _run(cfg, "fault", stages=("ingest",))

        def kill_after(n: int) -> None:
            while len(proxy.entries(status=200)) < n:
                time.sleep(0.02)
            keyed_teacher.kill()

        killer = threading.Thread(target=kill_after, args=(4,), daemon=True)
        killer.start()
        with pytest.raises(BackendError) as e:
            runner.run_stage(cfg, "fault", "recaption", 0)
        killer.join(5)
        msg = str(e.value)
        assert (
            f"{proxy.url}/chat/completions" in msg and "failed after 3 attempts" in msg and "HTTP 502" in msg
        )
        finished = {h for _, h, s, _ in proxy.entries(status=200)}
        assert 4 <= len(finished) < 20  # killed mid-stage
        tries: dict[str, int] = {}
        for _, h, s, _ in proxy.entries():
            if s != 200:
                tries[h] = tries.get(h, 0) + 1
        assert max(tries.values()) == 3 and all(h not in finished for h in tries)  # retried within the bound

        keyed_teacher.start()  # same port, same model
        n0 = len(proxy.entries())
        st = runner.run_stage(cfg, "fault", "recaption", 0)
        after = proxy.entries()[n0:]
        resent = {h for _, h, _, _ in after}
        assert st["in"] == st["out"] + st["rejected"] == 20
        assert not resent & finished, "a request that had finished was sent again"
        assert (
            len(resent | finished) == 20
        )  # every record answered exactly once overall (report mode: one attempt)
        assert st["requests_sent"] == len(after) == 20 - len(finished)
    finally:
        proxy.close()


# ---------------------------------------------------------------- vLLM offline (in-process LLM in .venv-vllm)
@pytest.mark.slow
def test_offline_backend_runs_recaption_and_judge_in_the_vllm_venv(models, teacher_input, tmp_path):
    from babelsynth.backends import vllm_offline

    eng = {"enforce_eager": True}
    common = {
        "max_model_len": 2048,
        "dtype": "bfloat16",
        "kv_cache_memory_bytes": 64 << 20,
        "engine_args": eng,
    }
    cfg = _cfg(
        models,
        "http://unused/v1",
        "http://unused/v1",
        teacher_input,
        tmp_path,
        **{
            "models.teacher": {
                "kind": "vllm_offline",
                "model": "tiny-aya-vision",
                "path": models["vlm"],
                "image_max_side": 224,
                **common,
            },
            "models.judge": {"kind": "vllm_offline", "model": "tiny-llm", "path": models["llm"], **common},
            "recaption.mode": "report",
        },
    )
    try:
        st = _run(cfg, "offline-1")
        rec, jud = st["recaption"], st["judge"]
        assert rec["in"] == rec["out"] == 20 and rec["requests_sent"] == 20
        assert rec["by_task"]["all"]["tokens_measured"] == 20 and rec["by_task"]["all"]["tokens_after"] > 0
        assert jud["in"] == jud["out"] + jud["rejected"] == 20 and jud["by_task"]["all"]["judged"] == 20
        rows = runner.layout(cfg, "offline-1").read_stage_result("recaption", 0)["rows"]
        assert all(r["teacher_model"] == "tiny-aya-vision" and r["answer_en"] for r in rows)
        workers = vllm_offline.running_workers()
        assert len(workers) == 2 and all(w.proc.poll() is None for w in workers)
        assert all(Path(w.python).parts[-3] == ".venv-vllm" for w in workers)
        # rerun: all answers cached, the engines get no request
        st2 = _run(cfg, "offline-2")
        assert st2["recaption"]["requests_sent"] == st2["judge"]["requests_sent"] == 0
        assert st2["recaption"]["tokenize_requests"] == 0
    finally:
        vllm_offline.close_all()


def test_cache_keys_cover_model_prompt_sampling_and_input():
    from babelsynth.backends.chat import request_key

    base = ChatRequest([{"role": "user", "content": "q"}], 8, 0.7, 1.0, seed=3)
    k = request_key("m", base)
    assert request_key("m", ChatRequest([{"role": "user", "content": "q"}], 8, 0.7, 1.0, seed=3)) == k
    for other in (
        request_key("m2", base),
        request_key("m", ChatRequest(base.messages, 9, 0.7, 1.0, seed=3)),
        request_key("m", ChatRequest(base.messages, 8, 0.7, 1.0, seed=4)),
        request_key("m", ChatRequest([{"role": "user", "content": "q2"}], 8, 0.7, 1.0, seed=3)),
    ):
        assert other != k


def test_cache_round_trip_makes_no_request(tmp_path):
    """A cached answer is returned without any network use (the URL here does not even resolve)."""
    cache = Cache(tmp_path / "c.sqlite")
    client = OpenAIHTTPClient(
        OpenAIHTTPBackend(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0), cache
    )
    req = ChatRequest([{"role": "user", "content": "q"}], 8, seed=1)
    cache.put(
        client.key(req),
        {"text": "a", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "error": None},
    )
    (res,) = client.chat_many([req])
    assert res.cached and res.text == "a" and client.sent == 0
