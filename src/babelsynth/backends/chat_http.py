"""OpenAI-compatible chat client (a vLLM server in production and in tests).

Async requests under a semaphore keep the server's batch full; timeouts, 429 and 5xx are retried with
exponential backoff; every answer goes to the content-addressed cache as soon as it arrives, so a
retried task repeats no request that had finished. The API key comes from an env var or an Airflow
connection and lives only in the request headers: never in a log line, a repr or an error message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import httpx

from babelsynth.cache import Cache, cache_key
from babelsynth.config import OpenAIHTTPBackend

log = logging.getLogger(__name__)
# A status that says the endpoint or its credentials are wrong: no row can succeed, so fail the task at once.
_FATAL_4XX = (401, 403, 404, 405)


class BackendError(RuntimeError):
    """A model server failed after bounded retries; the task fails and Airflow may retry it."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status when the server answered with a fatal one


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self, model: str) -> dict:
        body = {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra)
        return body


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    error: str | None = None  # the server refused this request (e.g. prompt longer than the context)

    def record(self) -> dict:
        """What the cache stores (everything but the `cached` marker)."""
        return {k: v for k, v in self.__dict__.items() if k != "cached"}


def request_key(model: str, req: ChatRequest) -> str:
    """Cache key of one chat request: model id + the whole body (prompt with its image bytes, sampling, seed).

    Every backend kind uses it, so the same request to the same model id is answered once."""
    return cache_key(kind="chat", model=model, body=req.payload(model))


def tokenize_key(model: str, text: str) -> str:
    return cache_key(kind="tokenize", model=model, text=text)


_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def image_data_url(data: bytes, max_side: int) -> str:
    """Data URL of an image whose longer side is at most max_side (keeps request size bounded).

    An image already within the bound in a format every server decodes is sent as is (no re-encode, no
    quality loss); a larger one is downscaled (aspect kept) and sent as PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if max(im.size) <= max_side and im.format in _MIME:
            return f"data:{_MIME[im.format]};base64," + base64.b64encode(data).decode()
        rgb = im.convert("RGB")
        if max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_with_images(text: str, images: list[bytes], max_side: int) -> dict:
    return user_with_image_urls(text, [image_data_url(b, max_side) for b in images])


def user_with_image_urls(text: str, urls: list[str]) -> dict:
    """OpenAI user turn: the images first, then the text."""
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _conn_password(value: str) -> str | None:
    """Password of an Airflow connection in its env-var form (JSON or URI)."""
    if value.lstrip().startswith("{"):
        pw = json.loads(value).get("password")
        return str(pw) if pw else None
    pw = urllib.parse.urlsplit(value).password
    return urllib.parse.unquote(pw) if pw else None


def resolve_api_key(cfg: OpenAIHTTPBackend) -> str | None:
    """The API key: env var `api_key_env`, else the password of Airflow connection `api_key_conn_id`.

    The connection is read from AIRFLOW_CONN_<ID> (Airflow's env form, used by pods and secrets mounts);
    inside an Airflow task (Airflow already loaded: babelsynth never imports it) from the task's Airflow.
    """
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        return os.environ[cfg.api_key_env]
    conn_id = cfg.api_key_conn_id
    if not conn_id:
        return None
    env = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env:
        return _conn_password(env)
    where = f"AIRFLOW_CONN_{conn_id.upper()} is not set"
    if "airflow.sdk" in sys.modules:
        try:
            return sys.modules["airflow.sdk"].Connection.get(conn_id).password or None
        except Exception as e:  # noqa: BLE001 - the message names the connection, never a secret
            where += f" and the task's Airflow answered {type(e).__name__}"
    raise BackendError(f"API key connection {conn_id!r} for {cfg.base_url} not found: {where}")


def make_chat_client(cfg: Any, cache: Cache | None = None):
    """The client for a backend config, chosen by its explicit `kind`."""
    if cfg.kind == "openai_http":
        return ChatClient(cfg, cache)
    if cfg.kind == "vllm_offline":
        from babelsynth.backends.vllm_offline import VLLMOfflineClient

        return VLLMOfflineClient(cfg, cache)
    raise ValueError(f"unknown chat backend kind {cfg.kind!r}")


class ChatClient:
    def __init__(self, cfg: OpenAIHTTPBackend, cache: Cache | None = None):
        self.cfg = cfg
        self.cache = cache
        self.sent = 0  # chat requests that reached the network, retries included (for tests and stats)
        self.completed = 0
        self.tokenize_sent = 0
        self._tokenize_ok = True

    def __repr__(self) -> str:
        return f"ChatClient(url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    @property
    def model_id(self) -> str:
        return self.cfg.model

    @property
    def url(self) -> str:
        return f"{self.cfg.base_url.rstrip('/')}/chat/completions"

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {resolve_api_key(self.cfg) or 'EMPTY'}"}

    def key(self, req: ChatRequest) -> str:
        return request_key(self.cfg.model, req)

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        keys = [self.key(r) for r in requests]
        hits = self.cache.get_many(keys) if self.cache else {}
        out: list[ChatResult | None] = [
            ChatResult(**hits[k], cached=True) if k in hits else None for k in keys
        ]
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            fresh = asyncio.run(self._run([requests[i] for i in todo], [keys[i] for i in todo]))
            for i, r in zip(todo, fresh):
                out[i] = r
        return out  # type: ignore[return-value]

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        return httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits, headers=self._headers())

    async def _run(self, reqs: list[ChatRequest], keys: list[str]) -> list[ChatResult]:
        """All requests under the semaphore. After a BackendError no new request starts, but those in flight
        finish and their answers are cached before the error is raised: a rerun repeats none of them."""
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        abort = asyncio.Event()  # per call: concurrent calls (threads) never stop each other
        first: list[BackendError] = []
        async with self._client() as client:

            async def one(req: ChatRequest, key: str) -> ChatResult | None:
                async with sem:
                    if abort.is_set():
                        return None
                    try:
                        res = await self._chat(client, req, abort)
                    except BackendError as e:
                        if not abort.is_set():
                            first.append(e)  # the request that gave up first names the cause
                        abort.set()
                        raise
                if self.cache and res.error is None:
                    self.cache.put(key, res.record())
                self.completed += 1
                return res

            out = await asyncio.gather(*(one(r, k) for r, k in zip(reqs, keys)), return_exceptions=True)
        errors = [r for r in out if isinstance(r, BaseException)]
        if errors:
            raise (first or errors)[0]
        return out  # type: ignore[return-value]

    async def _send(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: dict,
        counter: str,
        abort: asyncio.Event | None = None,
    ) -> httpx.Response:
        """POST, retrying timeouts, transport errors, 429 and 5xx; then BackendError naming the URL."""
        last, tries = "", 0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
                if abort is not None and abort.is_set():  # another request already gave up on this server
                    break
            try:
                tries += 1
                setattr(self, counter, getattr(self, counter) + 1)
                r = await client.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
                log.info("retrying %s after attempt %d: %s", url, tries, last)
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                log.info("retrying %s after attempt %d: %s", url, tries, last)
                continue
            if r.status_code in _FATAL_4XX:
                raise BackendError(
                    f"model server at {url} (model {self.cfg.model!r}) answered HTTP {r.status_code}: "
                    f"{r.text[:200]} (check the URL, the model name and the API key)",
                    status=r.status_code,
                )
            return r
        raise BackendError(
            f"model server at {url} (model {self.cfg.model!r}) failed after {tries} attempts: {last}"
        )

    async def _chat(self, client: httpx.AsyncClient, req: ChatRequest, abort: asyncio.Event) -> ChatResult:
        r = await self._send(client, self.url, req.payload(self.cfg.model), "sent", abort)
        if r.status_code >= 400:  # deterministic refusal of this one request: the row decides, not the run
            return ChatResult("", None, 0, 0, error=f"HTTP {r.status_code}: {r.text[:300]}")
        data = r.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return ChatResult(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    # ------------------------------------------------------------------ token counts (metrics)
    def count_tokens(self, texts: list[str]) -> list[int | None]:
        """Token counts under the served model's tokenizer (vLLM's /tokenize), cached like answers.

        None when the endpoint has no /tokenize (not a vLLM server): metrics then report words only."""
        keys = [tokenize_key(self.cfg.model, t) for t in texts]
        hits = self.cache.get_many(keys) if self.cache else {}
        todo = {k: t for k, t in zip(keys, texts) if k not in hits}
        if todo and self._tokenize_ok:
            hits.update(asyncio.run(self._tokenize(todo)))
        return [hits[k]["n"] if k in hits else None for k in keys]

    async def _tokenize(self, todo: dict[str, str]) -> dict[str, dict]:
        root = self.cfg.base_url.rstrip("/").removesuffix("/v1")
        url = f"{root}/tokenize"
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        out: dict[str, dict] = {}
        async with self._client() as client:

            async def one(key: str, text: str) -> None:
                if not self._tokenize_ok:
                    return
                async with sem:
                    try:
                        r = await self._send(
                            client,
                            url,
                            {"model": self.cfg.model, "prompt": text, "add_special_tokens": False},
                            "tokenize_sent",
                        )
                    except BackendError as e:
                        if e.status in (404, 405):
                            self._tokenize_ok = False
                            return
                        raise
                if r.status_code >= 400:
                    return
                out[key] = {"n": int(r.json()["count"])}
                if self.cache:
                    self.cache.put(key, out[key])

            await asyncio.gather(*(one(k, t) for k, t in todo.items()))
        return out
