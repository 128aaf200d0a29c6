"""Reference-free quality estimation (CometKiwi-style) from a local COMET checkpoint, never a hub.

COMET encodes `mt </s></s> src` in one window of the encoder (512 tokens for XLM-R) and silently cuts
whatever is longer. Long pairs are therefore scored by segments: both texts are cut at sentence and line
boundaries (babelsynth.segment), aligned in order, packed into chunks that fit the window, scored, and
the chunk scores averaged weighted by translation tokens. All chunks of a call go to the model in one
batched, length-sorted predict (GPU when present); finished pair scores go to the content-addressed cache.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from babelsynth.cache import Cache, cache_key
from babelsynth.config import CometBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    src: str
    mt: str
    weight: int  # translation tokens: the share of the pair's score this chunk carries


def _units(text: str) -> list[str]:
    """Sentence/line units whose concatenation is text: each translatable piece with the text after it."""
    from babelsynth.segment import split

    units: list[str] = []
    lead = ""  # markers and spaces before the first sentence join it
    for p in split(text):
        if p.translate:
            units.append(lead + p.text)
            lead = ""
        elif units:
            units[-1] += p.text
        else:
            lead += p.text
    return [u for u in units if u] or [text]


def _cut(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """Cut one over-long unit into pieces of at most ~limit tokens, at whitespace when there is some."""
    n = count(text)
    if n <= limit or len(text) < 2:
        return [text]
    k = math.ceil(n / limit)
    size = math.ceil(len(text) / k)
    out, i = [], 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            sp = text.rfind(" ", i + size // 2, j)
            j = sp + 1 if sp > i else j
        out.append(text[i:j])
        i = j
    return [p for q in out for p in _cut(q, count, limit)] if any(count(q) > limit for q in out) else out


def plan_chunks(src: str, mt: str, count: Callable[[str], int], budget: int) -> list[Chunk]:
    """Pure: chunks of (src, mt) that each fit `budget` tokens together and cover all of mt and src in order.

    Units are aligned 1:1 when both sides have as many, else by relative position (each source unit goes
    with the translation units over the same share of the text). One chunk when the pair already fits."""
    n_mt, n_src = count(mt), count(src)
    if n_mt + n_src <= budget:
        return [Chunk(src, mt, max(n_mt, 1))]
    share = n_mt / max(n_mt + n_src, 1)
    mt_units = [p for u in _units(mt) for p in _cut(u, count, max(8, int(budget * share) // 2))]
    src_units = [p for u in _units(src) for p in _cut(u, count, max(8, int(budget * (1 - share)) // 2))]
    if len(mt_units) == len(src_units):
        groups = [([m], [s]) for m, s in zip(mt_units, src_units)]
    else:  # src unit i joins the mt unit that spans the relative position of its midpoint
        total = sum(map(len, mt_units)) or 1
        ends, acc = [], 0
        for u in mt_units:
            acc += len(u)
            ends.append(acc / total)
        groups = [([m], []) for m in mt_units]
        stotal, acc = sum(map(len, src_units)) or 1, 0
        for u in src_units:
            mid = (acc + len(u) / 2) / stotal
            acc += len(u)
            groups[next((i for i, e in enumerate(ends) if mid <= e), len(ends) - 1)][1].append(u)
    chunks: list[Chunk] = []
    cur_m: list[str] = []
    cur_s: list[str] = []
    cur_n = 0
    for ms, ss in groups:
        n = (
            sum(map(count, ms)) + sum(map(count, ss)) + len(ms) + len(ss)
        )  # +1 per join: merges can add a token
        if cur_m and cur_n + n > budget and "".join(cur_s).strip():
            chunks.append(Chunk("".join(cur_s), "".join(cur_m), max(count("".join(cur_m)), 1)))
            cur_m, cur_s, cur_n = [], [], 0
        cur_m += ms
        cur_s += ss
        cur_n += n
    if cur_m:
        if not "".join(cur_s).strip() and chunks:  # translation tail without source: join the last chunk
            last = chunks.pop()
            cur_m, cur_s = [last.mt, *cur_m], [last.src]
        chunks.append(Chunk("".join(cur_s), "".join(cur_m), max(count("".join(cur_m)), 1)))
    return chunks


class CometScorer:
    def __init__(self, cfg: CometBackend, cache: Cache | None = None, window: int | None = None):
        import comet
        import torch

        for n in ("pytorch_lightning", "lightning.pytorch", "lightning", "lightning_fabric", "comet"):
            logging.getLogger(n).setLevel(logging.ERROR)
        self.cfg = cfg
        self.cache = cache
        self.model_id = cfg.model_id or cfg.path
        self.gpus = cfg.gpus if cfg.gpus is not None else (1 if torch.cuda.is_available() else 0)
        self.model = comet.load_from_checkpoint(cfg.path)
        enc = self.model.encoder
        # [CLS] mt [SEP][SEP] src [SEP]: what is left of the encoder window for the two texts
        specials = 1 + 2 * getattr(enc, "size_separator", 2)
        self.window = window or enc.max_positions
        self.budget = self.window - specials
        self.tokenizer = enc.tokenizer
        self.calls = 0  # predict calls that reached the model
        self.segments_scored = 0  # chunks sent to the model
        self.split_pairs = 0  # pairs longer than the window, scored by segments
        self.tokens_scored = 0  # encoder input tokens of the chunks sent (special tokens aside)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _counter(self, texts: list[str]) -> Callable[[str], int]:
        """Token counts, the given texts tokenized in one batch, anything else once on demand."""
        uniq = list(dict.fromkeys(texts))
        ids = self.tokenizer(uniq, add_special_tokens=False)["input_ids"] if uniq else []
        memo = {t: len(x) for t, x in zip(uniq, ids)}

        def count(text: str) -> int:
            if text not in memo:
                memo[text] = self.count_tokens(text)
            return memo[text]

        return count

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """QE score per (source, translation) pair, in input order."""
        keys = [
            cache_key(kind="comet", model=self.model_id, window=self.window, src=s, mt=t) for s, t in pairs
        ]
        hits = self.cache.get_many(keys) if self.cache else {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in hits}.values())
        if todo:
            count = self._counter([t for i in todo for t in pairs[i]])
            plans = {i: plan_chunks(pairs[i][0], pairs[i][1], count, self.budget) for i in todo}
            self.split_pairs += sum(len(p) > 1 for p in plans.values())
            uniq = sorted(
                {(c.src, c.mt) for p in plans.values() for c in p}, key=lambda sm: count(sm[0]) + count(sm[1])
            )
            self.tokens_scored += sum(count(s) + count(m) for s, m in uniq)
            chunk_score = dict(zip(uniq, self._predict(uniq)))
            fresh = {}
            for i, plan in plans.items():
                w = sum(c.weight for c in plan)
                fresh[keys[i]] = sum(chunk_score[(c.src, c.mt)] * c.weight for c in plan) / w
            if self.cache:
                self.cache.put_many(fresh)
            hits = {**hits, **fresh}
        return [hits[k] for k in keys]

    def _predict(self, sorted_pairs: list[tuple[str, str]]) -> list[float]:
        """One batched predict over pairs already sorted by length (COMET's own sort is by source chars)."""
        self.calls += 1
        self.segments_scored += len(sorted_pairs)
        data = [{"src": s, "mt": t} for s, t in sorted_pairs]
        out = self.model.predict(
            data, batch_size=self.cfg.batch_size, gpus=self.gpus, progress_bar=False, length_batching=False
        )
        return [float(x) for x in out.scores]
