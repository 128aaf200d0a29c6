"""Backend kind -> client, each backend module imported only when a config asks for it (distilabel's `load`).

Above the backends in the import graph: `chat.py` holds what they share and imports none of them.
"""

from __future__ import annotations

from typing import Any

from babelsynth.backends.chat import CachedChatClient
from babelsynth.cache import Cache


def make_chat_client(cfg: Any, cache: Cache | None = None) -> CachedChatClient:
    """The client for a backend config, chosen by its explicit `kind`; a backend's module loads on use."""
    if cfg.kind == "openai_http":
        from babelsynth.backends.chat_http import OpenAIHTTPClient

        return OpenAIHTTPClient(cfg, cache)
    if cfg.kind == "vllm_offline":
        from babelsynth.backends.vllm_offline import VLLMOfflineClient

        return VLLMOfflineClient(cfg, cache)
    raise ValueError(f"unknown chat backend kind {cfg.kind!r}")
