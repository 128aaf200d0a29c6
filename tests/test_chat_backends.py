"""The base chat client (cache lookup and store around a backend's fetch) and both backends' fetches,
without an engine: a stub OpenAI server for chat_http, a stub engine worker for vllm_offline."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from babelsynth.backends import vllm_offline
from babelsynth.backends.chat import (
    BackendError,
    CachedChatClient,
    ChatRequest,
    ChatResult,
    request_key,
)
from babelsynth.backends.chat_http import OpenAIHTTPClient
from babelsynth.backends.registry import make_chat_client
from babelsynth.cache import Cache
from babelsynth.config import OpenAIHTTPBackend, VLLMOfflineBackend


def _req(text: str, seed: int = 1) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], 8, seed=seed)


def _answer(req: ChatRequest) -> ChatResult:
    """A deterministic fake model: refuses "too long", echoes the rest upper-cased."""
    text = req.messages[-1]["content"]
    if text == "too long":
        return ChatResult("", None, 0, 0, error="HTTP 400: prompt longer than the context")
    return ChatResult(text.upper(), "stop", len(text), 1)


class Fake(CachedChatClient):
    """Records what reaches the backend; `fail_after` raises a BackendError after that many answers."""

    def __init__(self, cache, fail_after: int | None = None):
        super().__init__(OpenAIHTTPBackend(base_url="http://unused/v1", model="m"), cache)
        self.fetched: list[list[str]] = []
        self.counted: list[list[str]] = []
        self.fail_after = fail_after

    def _fetch(self, requests, deliver):
        self.fetched.append([r.messages[-1]["content"] for r in requests])
        for i, r in enumerate(requests):
            if self.fail_after is not None and i == self.fail_after:
                raise BackendError("server went away")
            self.sent += 1
            deliver(i, _answer(r))

    def _fetch_token_counts(self, texts):
        self.counted.append(list(texts))
        return [None if t == "?" else len(t.split()) for t in texts]


def test_cache_hit_makes_zero_fetches(tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    first = Fake(cache)
    res = first.chat_many([_req("a"), _req("b")])
    assert [r.text for r in res] == ["A", "B"] and not any(r.cached for r in res)
    assert first.completed == 2
    again = Fake(cache)
    res2 = again.chat_many([_req("b"), _req("a")])
    assert again.fetched == [] and again.sent == 0 and again.completed == 0
    assert [(r.text, r.cached) for r in res2] == [("B", True), ("A", True)]


def test_a_refused_request_is_not_cached_so_a_rerun_asks_it_again(tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    client = Fake(cache)
    ok, refused = client.chat_many([_req("fine"), _req("too long")])
    assert ok.error is None and refused.error.startswith("HTTP 400")
    rerun = Fake(cache)
    ok2, refused2 = rerun.chat_many([_req("fine"), _req("too long")])
    assert rerun.fetched == [["too long"]]  # only the refusal goes back to the backend
    assert ok2.cached and not refused2.cached and refused2.error


def test_identical_requests_in_one_call_are_fetched_once(tmp_path):
    client = Fake(Cache(tmp_path / "c.sqlite"))
    res = client.chat_many([_req("x"), _req("y"), _req("x"), _req("x", seed=2)])
    assert client.fetched == [["x", "y", "x"]]  # seed 2 is another request
    assert [r.text for r in res] == ["X", "Y", "X", "X"]


def test_answers_delivered_before_a_failure_are_kept_and_not_asked_again(tmp_path):
    """The retried task repeats no request that had finished: the base stores each answer on delivery."""
    cache = Cache(tmp_path / "c.sqlite")
    reqs = [_req(t) for t in ("a", "b", "c", "d")]
    with pytest.raises(BackendError, match="went away"):
        Fake(cache, fail_after=2).chat_many(reqs)
    retry = Fake(cache)
    assert [r.text for r in retry.chat_many(reqs)] == ["A", "B", "C", "D"]
    assert retry.fetched == [["c", "d"]]


def test_a_backend_that_drops_an_answer_fails_the_call(tmp_path):
    class Lossy(Fake):
        def _fetch(self, requests, deliver):
            deliver(0, _answer(requests[0]))

    with pytest.raises(BackendError, match="no answer to 1 of 2"):
        Lossy(Cache(tmp_path / "c.sqlite")).chat_many([_req("a"), _req("b")])


def test_token_counts_are_cached_and_unknown_counts_are_not(tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    client = Fake(cache)
    assert client.count_tokens(["one two", "?", "one two"]) == [2, None, 2]
    assert client.counted == [["one two", "?"]]
    again = Fake(cache)
    assert again.count_tokens(["?", "one two"]) == [None, 2]
    assert again.counted == [["?"]]


def test_make_chat_client_chooses_by_kind():
    http = make_chat_client(OpenAIHTTPBackend(base_url="http://h/v1", model="m"))
    off = make_chat_client(VLLMOfflineBackend(model="m", path="/models/x"))
    assert type(http) is OpenAIHTTPClient and type(off) is vllm_offline.VLLMOfflineClient

    class Other:
        kind = "smoke_signals"

    with pytest.raises(ValueError, match="smoke_signals"):
        make_chat_client(Other())


# ---------------------------------------------------------------- both backends on one cache
class StubWorker:
    """Stands in for the vLLM engine process: the JSON-line protocol's messages, answered by `_answer`."""

    def __init__(self):
        self.ops: list[dict] = []

    def call(self, msg: dict, on_item=None) -> dict:
        self.ops.append(msg)
        if msg["op"] == "tokenize":
            return {"counts": [len(t.split()) for t in msg["texts"]]}
        for i, body in enumerate(msg["requests"]):
            res = _answer(ChatRequest(body["messages"], body["max_tokens"]))
            on_item({"i": i, "error": res.error} if res.error else {"i": i, "result": res.record()})
        return {}


def test_both_backends_share_keys_so_an_offline_answer_is_never_asked_of_the_server(tmp_path, monkeypatch):
    worker = StubWorker()
    monkeypatch.setattr(vllm_offline, "worker_for", lambda cfg: worker)
    cache = Cache(tmp_path / "c.sqlite")
    off = vllm_offline.VLLMOfflineClient(VLLMOfflineBackend(model="tiny", path="/models/x"), cache)
    reqs = [_req("a"), _req("too long"), _req("a")]
    res = off.chat_many(reqs)
    assert [r.text for r in res] == ["A", "", "A"] and res[1].error
    assert off.sent == 2 and off.completed == 2 and worker.ops[0]["requests"][0] == reqs[0].payload("tiny")
    assert off.count_tokens(["a b", "a b c"]) == [2, 3] and off.tokenize_sent == 2

    # the same model id behind a server that does not even listen: the answer and the counts come cached
    http = OpenAIHTTPClient(
        OpenAIHTTPBackend(base_url="http://127.0.0.1:9/v1", model="tiny", max_retries=0), cache
    )
    assert http.key(reqs[0]) == off.key(reqs[0]) == request_key("tiny", reqs[0])
    (hit,) = http.chat_many([reqs[0]])
    assert hit.cached and hit.text == "A" and http.sent == 0
    assert http.count_tokens(["a b c"]) == [3] and http.tokenize_sent == 0
    with pytest.raises(BackendError, match=r"127\.0\.0\.1:9/"):  # the refusal was not cached: asked, fails
        http.chat_many([reqs[1]])


# ---------------------------------------------------------------- chat_http against a stub server
class StubServer:
    """OpenAI-compatible stub: /v1/chat/completions answered by `_answer` (400 on a refusal), or `status`
    for every request; no /tokenize (404), like a server that is not vLLM."""

    def __init__(self, status: int = 200):
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                stub.auth.append(self.headers.get("Authorization"))
                code, data = 404, {"detail": "Not Found"}
                if self.path == "/v1/chat/completions":
                    res = _answer(ChatRequest(body["messages"], body["max_tokens"]))
                    code, data = (400, {"error": res.error}) if res.error else (200, _completion(res))
                    code = code if status == 200 else status
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _completion(res: ChatResult) -> dict:
    return {
        "choices": [{"message": {"content": res.text}, "finish_reason": res.finish_reason}],
        "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens},
    }


@pytest.fixture
def stub():
    s = StubServer()
    yield s
    s.close()


def test_http_fetch_answers_refuses_per_row_and_sends_the_named_key(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-stub-123")
    cfg = OpenAIHTTPBackend(base_url=stub.url, model="m", api_key_env="STUB_KEY", max_concurrency=2)
    client = OpenAIHTTPClient(cfg, Cache(tmp_path / "c.sqlite"))
    res = client.chat_many([_req("a"), _req("too long"), _req("b")])
    assert [r.text for r in res] == ["A", "", "B"] and "prompt longer" in res[1].error
    assert client.sent == client.completed == 3 and set(stub.auth) == {"Bearer sk-stub-123"}
    assert client.count_tokens(["a b"]) == [None] and client.tokenize_sent == 1  # no /tokenize: words only
    assert client.count_tokens(["c"]) == [None] and client.tokenize_sent == 1  # and it is not asked again
    assert "sk-stub-123" not in repr(client)


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_http_fatal_status_fails_the_task_at_once(status):
    s = StubServer(status)
    try:
        client = OpenAIHTTPClient(OpenAIHTTPBackend(base_url=s.url, model="m", max_concurrency=1))
        with pytest.raises(BackendError, match=f"HTTP {status}") as e:
            client.chat_many([_req(t) for t in "abcd"])
        assert e.value.status == status and client.sent == 1  # no retry, no further request started
    finally:
        s.close()
