"""Translation by an instruction LLM (translate backend `llm`), one chat request per segment.

The translate stage cuts texts with `segment.split` exactly as for NLLB, so protected spans (code, URLs,
placeholders, tags) never reach the model and are put back byte for byte; only the translatable segments
are asked. Each request renders the versioned prompt translate/llm.v<N> with the target language named and
the segment XML-escaped between <source> tags: the text holds no raw `<`, so nothing in a caption (a
`</source>`, "ignore your instructions") can close the delimiter and speak as the instruction. The answer
is expected between <translation> tags (parsed like the rephraser's, `tagged.parse_translation`), and with
`constrain_tags` the server is asked for exactly that shape (vLLM structured outputs, a regex). An answer
that cannot be used (no tags, empty, cut at the token limit, refused, a line break the segment did not
have) is that segment's failure: the stage falls back to NLLB for it and counts it.

Requests go through the chat client's content-addressed cache (the same cache as every backend): a rerun
asks nothing again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from babelsynth.backends.chat import CachedChatClient, ChatRequest
from babelsynth.config import LLMTranslateSection
from babelsynth.languages import language_name
from babelsynth.prompts import load_prompt
from babelsynth.tagged import parse_translation, token_budget

# What the server may answer with constrain_tags: the tags around text without raw angle brackets, at most
# CHARS_PER_CHAR x the escaped segment + CHARS_SLACK characters long (no real translation is 4x its source;
# unbounded, a looping model would run to the token limit; bounded, the close tag always fits).
TAG_REGEX = r"<translation>[^<>]{1,%d}</translation>"
CHARS_PER_CHAR, CHARS_SLACK = 4, 32


def tag_regex(segment: str) -> str:
    return TAG_REGEX % (CHARS_PER_CHAR * len(escape(segment)) + CHARS_SLACK)


FAILURES = ("no_tag", "empty", "truncated", "request_rejected", "line_break_added")


def escape(text: str) -> str:
    """XML-escape the three characters that could open or close a tag (or fake an escape)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    """Inverse of `escape` for the answer (the model is asked to keep the escapes)."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@dataclass(frozen=True)
class LLMSegment:
    text: str | None  # None: unusable, the stage falls back to NLLB
    status: str  # ok or one of FAILURES


class LLMTranslator:
    """Same shape as NLLBTranslator where the stage needs it: model_id, stats, usage()."""

    kind = "llm"

    def __init__(self, client: CachedChatClient, cfg: LLMTranslateSection):
        self.client = client
        self.cfg = cfg
        self.prompt = load_prompt("translate", "llm", cfg.prompt_version)
        # segments_translated (unique segment x target asked), cache_hits, llm_<status> per answer
        self.stats: Counter[str] = Counter()

    @property
    def model_id(self) -> str:
        return self.client.model_id

    def usage(self) -> dict[str, int]:
        return self.client.usage()

    def request(self, segment: str, tgt: str) -> ChatRequest:
        """The chat request of one segment: what is sent, hashed for the cache and tested."""
        c = self.cfg
        msgs = self.prompt.render(source=escape(segment), language=language_name(tgt))
        budget = token_budget(c.max_tokens, c.tokens_per_char, escape(segment), "")
        seed = int(hashlib.sha256(f"{c.seed}\x00{tgt}\x00{segment}".encode()).hexdigest()[:8], 16)
        extra = {"structured_outputs": {"regex": tag_regex(segment)}} if c.constrain_tags else {}
        return ChatRequest(msgs, budget, c.temperature, seed=seed, extra=extra)

    def translate_segments(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], LLMSegment]:
        """{(segment, target): result} for every pair; identical pairs are asked once."""
        uniq = sorted(set(pairs))
        if not uniq:
            return {}
        answers = self.client.chat_many([self.request(*p) for p in uniq])
        out = {}
        for (seg, tgt), a in zip(uniq, answers, strict=True):
            out[(seg, tgt)] = self._parse(seg, a.text, a.finish_reason, a.error)
            self.stats[f"llm_{out[(seg, tgt)].status}"] += 1
            self.stats["cache_hits"] += a.cached
        self.stats["segments_translated"] += len(uniq)
        return out

    @staticmethod
    def _parse(segment: str, raw: str, finish_reason: str | None, error: str | None) -> LLMSegment:
        if error:
            return LLMSegment(None, "request_rejected")
        text, status = parse_translation(raw, finish_reason, escape(segment))
        if text is None:
            return LLMSegment(None, status)
        text = unescape(text)
        if "\n" in text and "\n" not in segment:  # a segment is one line: a break would change the layout
            return LLMSegment(None, "line_break_added")
        return LLMSegment(text, "ok")
