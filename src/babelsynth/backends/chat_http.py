"""OpenAI-compatible chat backend (a vLLM server in production and in tests): the fetch only.

Async requests under a semaphore keep the server's batch full. Error classes: connection errors, timeouts,
408, 429 and 5xx are the server's state, retried with exponential backoff, then the task fails
(BackendError; never a row outcome, so nothing is persisted and a retry asks again); a 400 speaks about
that one request's content (e.g. longer than the context) and becomes that row's reject; any other 4xx
(401/403 key, 404 model, 413 a proxy's body limit, 422 an API mismatch, ...) would fail every request,
so it fails the task at once. The cache is the
base client's (backends/chat.py). The API key is read from the env var the config names (`api_key_env`)
and lives only in the request headers: never in a log line, a repr or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx

from babelsynth.backends.chat import BackendError, CachedChatClient, ChatRequest, ChatResult, Deliver
from babelsynth.cache import Cache
from babelsynth.config import OpenAIHTTPBackend

log = logging.getLogger(__name__)
RETRIED_4XX = (408, 429)  # the server is busy or slow: like a 5xx
ROW_STATUS = (400,)  # about this request's content: the row's outcome


class OpenAIHTTPClient(CachedChatClient):
    cfg: OpenAIHTTPBackend

    def __init__(self, cfg: OpenAIHTTPBackend, cache: Cache | None = None):
        super().__init__(cfg, cache)
        self._tokenize_ok = True

    def __repr__(self) -> str:
        return f"OpenAIHTTPClient(url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    @property
    def url(self) -> str:
        return f"{self.cfg.base_url.rstrip('/')}/chat/completions"

    def _headers(self) -> dict:
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        return {"Authorization": f"Bearer {key or 'EMPTY'}"}

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        return httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits, headers=self._headers())

    def _fetch(self, requests: list[ChatRequest], deliver: Deliver) -> None:
        asyncio.run(self._run(requests, deliver))

    async def _run(self, reqs: list[ChatRequest], deliver: Deliver) -> None:
        """All requests under the semaphore. After a BackendError no new request starts, but those in flight
        finish and are delivered (so cached) before the error is raised: a rerun repeats none of them."""
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        abort = asyncio.Event()  # per call: concurrent calls (threads) never stop each other
        first: list[BackendError] = []
        async with self._client() as client:

            async def one(i: int, req: ChatRequest) -> None:
                async with sem:
                    if abort.is_set():
                        return
                    try:
                        res = await self._chat(client, req, abort)
                    except BackendError as e:
                        if not abort.is_set():
                            first.append(e)  # the request that gave up first names the cause
                        abort.set()
                        raise
                deliver(i, res)

            out = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)), return_exceptions=True)
        errors = [r for r in out if isinstance(r, BaseException)]
        if errors:
            raise (first or errors)[0]

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
            if r.status_code in RETRIED_4XX or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                log.info("retrying %s after attempt %d: %s", url, tries, last)
                continue
            if r.status_code >= 400 and r.status_code not in ROW_STATUS:
                raise BackendError(
                    f"model server at {url} (model {self.cfg.model!r}) answered HTTP {r.status_code}: "
                    f"{r.text[:200]} (every request would fail: check the URL, the model name, the API key "
                    "and any proxy in between)",
                    status=r.status_code,
                )
            return r
        raise BackendError(
            f"model server at {url} (model {self.cfg.model!r}) failed after {tries} attempts: {last}"
        )

    async def _chat(self, client: httpx.AsyncClient, req: ChatRequest, abort: asyncio.Event) -> ChatResult:
        r = await self._send(client, self.url, req.payload(self.cfg.model), "sent", abort)
        if r.status_code in ROW_STATUS:  # a refusal of this one request's content: the row's outcome
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
    def _fetch_token_counts(self, texts: list[str]) -> list[int | None]:
        """vLLM's /tokenize; a server without it (404/405) is asked no more and its counts are None."""
        if not self._tokenize_ok:
            return [None] * len(texts)
        return asyncio.run(self._tokenize(texts))

    async def _tokenize(self, texts: list[str]) -> list[int | None]:
        root = self.cfg.base_url.rstrip("/").removesuffix("/v1")
        url = f"{root}/tokenize"
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        out: list[int | None] = [None] * len(texts)
        async with self._client() as client:

            async def one(i: int, text: str) -> None:
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
                        if e.status is not None:  # no usable /tokenize (404, 405, ...): metrics count words
                            self._tokenize_ok = False
                            return
                        raise
                if r.status_code < 400:
                    out[i] = int(r.json()["count"])

            await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
        return out
