"""What every chat backend shares: request/result/error types, cache keys, image turns, and the cache.

`CachedChatClient` answers from the content-addressed cache and hands only the misses to its backend's
`_fetch`; each answer is stored the moment the backend delivers it, so a task that fails half way and is
retried repeats no request that had finished. A backend (chat_http: an OpenAI-compatible server;
vllm_offline: an in-process engine) implements the fetch and nothing else, and both use the same keys:
a request answered by either is never asked again.
"""

from __future__ import annotations

import base64
import io
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from babelsynth.cache import Cache, cache_key
from babelsynth.progress import Progress


class BackendError(RuntimeError):
    """A model server or engine failed after bounded retries; the task fails and Airflow may retry it."""

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
        """The OpenAI chat body: what the HTTP client posts, the offline engine runs and the key hashes."""
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
    error: str | None = None  # the backend refused this request (e.g. prompt longer than the context)

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


Deliver = Callable[[int, ChatResult], None]


class CachedChatClient(ABC):
    """Cache lookup and store around a backend's fetch; stages see only chat_many and count_tokens.

    Counters for stage stats, tests and benchmarks: `sent` (requests that reached the backend; HTTP
    retries included), `completed` (answers delivered, refusals included), `tokenize_sent`, and the
    prompt/completion tokens of the answers the model produced (cache hits excluded).
    """

    def __init__(self, cfg: Any, cache: Cache | None = None):
        self.cfg = cfg
        self.cache = cache
        self.sent = 0
        self.completed = 0
        self.tokenize_sent = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def usage(self) -> dict[str, int]:
        """The model's own work (what a run pays for), in the keys every backend reports."""
        return {
            "model_calls": self.sent,
            "tokens_in": self.prompt_tokens,
            "tokens_out": self.completion_tokens,
        }

    @property
    def model_id(self) -> str:
        return self.cfg.model

    def key(self, req: ChatRequest) -> str:
        return request_key(self.cfg.model, req)

    def chat_many(self, requests: list[ChatRequest]) -> list[ChatResult]:
        """One result per request, in order. Identical requests in one call are fetched once."""
        keys = [self.key(r) for r in requests]
        hits = self.cache.get_many(keys) if self.cache else {}
        fresh: dict[str, ChatResult] = {}
        todo = {k: r for k, r in zip(keys, requests) if k not in hits}
        if todo:
            todo_keys = list(todo)

            def deliver(i: int, res: ChatResult) -> None:
                k = todo_keys[i]
                if self.cache and res.error is None:  # a refusal is the row's outcome, not a cached answer
                    self.cache.put(k, res.record())
                self.completed += 1
                self.prompt_tokens += res.prompt_tokens or 0
                self.completion_tokens += res.completion_tokens or 0
                fresh[k] = res
                prog.advance()

            with Progress(len(todo_keys), "requests") as prog:
                self._fetch(list(todo.values()), deliver)
            missing = len(todo_keys) - len(fresh)
            if missing:
                raise BackendError(f"{self!r} gave no answer to {missing} of {len(todo_keys)} requests")
        return [ChatResult(**hits[k], cached=True) if k in hits else fresh[k] for k in keys]

    def count_tokens(self, texts: list[str]) -> list[int | None]:
        """Token counts under the model's tokenizer, cached like answers; None where the backend cannot
        count (e.g. a server without /tokenize): metrics then report words only."""
        keys = [tokenize_key(self.cfg.model, t) for t in texts]
        counts = {k: v["n"] for k, v in (self.cache.get_many(keys) if self.cache else {}).items()}
        todo = {k: t for k, t in zip(keys, texts) if k not in counts}
        if todo:
            got = self._fetch_token_counts(list(todo.values()))
            new = {k: n for k, n in zip(todo, got) if n is not None}
            if self.cache:
                self.cache.put_many({k: {"n": n} for k, n in new.items()})
            counts.update(new)
        return [counts.get(k) for k in keys]

    @abstractmethod
    def _fetch(self, requests: list[ChatRequest], deliver: Deliver) -> None:
        """Answer every request: call deliver(i, result) as soon as requests[i] is answered (the base caches
        it then), a refusal as a result with `error`; raise BackendError when the backend itself fails."""

    @abstractmethod
    def _fetch_token_counts(self, texts: list[str]) -> list[int | None]:
        """One count per text, None where the backend cannot count it."""
