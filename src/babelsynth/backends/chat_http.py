"""OpenAI-compatible chat client (a vLLM server in production and tests).

Async requests under a semaphore keep the server's batch full; timeouts, 429 and 5xx are retried with
exponential backoff; every answer goes to the content-addressed cache as soon as it arrives, so a
retried task repeats no request that had finished.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from babelsynth.cache import Cache, cache_key
from babelsynth.config import OpenAIHTTPBackend

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A model server failed after bounded retries; the task fails and Airflow may retry it."""


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


def image_data_url(data: bytes, max_side: int) -> str:
    """PNG data URL, downscaled so the longer side is at most max_side (keeps request size bounded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_with_images(text: str, images: list[bytes], max_side: int) -> dict:
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(b, max_side)}} for b in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


class ChatClient:
    def __init__(self, cfg: OpenAIHTTPBackend, cache: Cache | None = None):
        self.cfg = cfg
        self.cache = cache
        self.sent = 0  # requests that reached the network (for tests and stats)
        self.completed = 0

    @property
    def model_id(self) -> str:
        return self.cfg.model

    def _headers(self) -> dict:
        key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        return {"Authorization": f"Bearer {key or 'EMPTY'}"}

    def key(self, req: ChatRequest) -> str:
        return cache_key(kind="chat", model=self.cfg.model, body=req.payload(self.cfg.model))

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

    async def _run(self, reqs: list[ChatRequest], keys: list[str]) -> list[ChatResult]:
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(
            base_url=self.cfg.base_url.rstrip("/"), timeout=self.cfg.timeout_s, limits=limits, headers=self._headers()
        ) as client:

            async def one(req: ChatRequest, key: str) -> ChatResult:
                async with sem:
                    res = await self._post(client, req)
                if self.cache and res.error is None:
                    self.cache.put(key, {k: v for k, v in res.__dict__.items() if k != "cached"})
                self.completed += 1
                return res

            return await asyncio.gather(*(one(r, k) for r, k in zip(reqs, keys)))

    async def _post(self, client: httpx.AsyncClient, req: ChatRequest) -> ChatResult:
        url = f"{self.cfg.base_url.rstrip('/')}/chat/completions"
        last: str = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                self.sent += 1
                r = await client.post("/chat/completions", json=req.payload(self.cfg.model))
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
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
        raise BackendError(
            f"model server at {url} (model {self.cfg.model!r}) failed after {self.cfg.max_retries + 1} attempts: {last}"
        )
