"""NLLB-200 through CTranslate2, driven by sentencepiece alone (no torch at run time).

Source tokens follow the NLLB convention `[src_lang] + pieces + ["</s>"]`; the target code is the prefix
and is dropped from the output. Texts are cut by `segment.split` (sentences, list items, table cells;
protected spans never reach the model). Segments are deduplicated across all targets of a call, cut
further when longer than the input limit (CTranslate2 would silently truncate at 1024), sorted by length
and sent in ONE token-batched `translate_batch`; an output without its end token hit the decoding limit and
is flagged. Each (segment, target, model, decoding options) is cached, so reruns cost no engine call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from babelsynth.cache import Cache, cache_key
from babelsynth.config import CT2NLLBBackend
from babelsynth.languages import FLORES_200, SOURCE_LANG
from babelsynth.segment import reassemble, split

log = logging.getLogger(__name__)

EOS = "</s>"
# Tokens that are never text: the language codes (the random test model and, rarely, real NLLB emit them
# mid-output, e.g. "hin_Devahin_Deva") and the fairseq specials. Suppressed in decoding, stripped after.
CONTROL_TOKENS: frozenset[str] = FLORES_200 | {"<s>", "<pad>", "<mask>", EOS}
# Scripts written without spaces: chunks of an over-long segment are joined without one.
_NO_SPACE_SCRIPTS = ("_Hans", "_Hant", "_Jpan", "_Thai", "_Khmr", "_Laoo", "_Mymr", "_Tibt")
_CLAUSE_END = re.compile(r"[,;:)\]»”\"'、，；：]$")
CACHE_VERSION = 2  # bump when the decoding or cleaning of outputs, or the cached value, changes
MAX_SEGMENTS_PER_CALL = (
    8192  # unique (segment, target) pairs per engine call: memory stays flat on big shards
)


class SegmentResult(NamedTuple):
    text: str
    truncated: bool  # a chunk hit the decoding limit
    empty_chunks: int  # chunks that came back empty (their content is lost)


@dataclass
class Translation:
    text: str
    truncated: bool  # some segment hit the decoding limit: the text may be cut short
    parts: list[str] = field(default_factory=list)  # one translation per translatable segment, in order
    empty: int = 0  # segments whose translation came back empty, wholly or in part (content lost)


def select_device(device: str, compute_type: str | None, cuda_devices: int) -> tuple[str, str]:
    """`auto` picks CUDA when a GPU is present; default compute type int8_float16 on CUDA, int8 on CPU."""
    dev = ("cuda" if cuda_devices > 0 else "cpu") if device == "auto" else device
    if dev == "cuda" and cuda_devices == 0:
        raise ValueError("translator device is 'cuda' but no CUDA device is visible")
    return dev, compute_type or ("int8_float16" if dev == "cuda" else "int8")


def chunk_tokens(pieces: list[str], limit: int) -> list[list[str]]:
    """Cut a token list into runs of at most `limit` tokens whose concatenation is the input.

    Prefers a clause end (",", ";", ":") in the second half of the window, then any word start, then a hard
    cut: a sentence longer than the model's input is split, never truncated."""
    if limit < 1:
        raise ValueError("limit must be >= 1")
    out: list[list[str]] = []
    rest = pieces
    while len(rest) > limit:
        cut = 0
        for k in range(limit, limit // 2, -1):  # rest[k] starts the next chunk
            if rest[k].startswith("▁") and _CLAUSE_END.search(rest[k - 1]):
                cut = k
                break
        if not cut:
            cut = next((k for k in range(limit, 0, -1) if rest[k].startswith("▁")), limit)
        out.append(rest[:cut])
        rest = rest[cut:]
    out.append(rest)
    return out


def clean_hypothesis(tokens: list[str], tgt: str) -> tuple[list[str], bool]:
    """Drop the forced target prefix and every control token; complete = the end token was produced."""
    complete = bool(tokens) and tokens[-1] == EOS
    body = tokens[1:] if tokens and tokens[0] == tgt else tokens
    return [t for t in body if t not in CONTROL_TOKENS], complete


def _joiner(tgt: str) -> str:
    return "" if tgt.endswith(_NO_SPACE_SCRIPTS) else " "


_ENGINES: dict[tuple, object] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(path: str, device: str, compute_type: str, inter: int, intra: int):
    """One loaded model per process and settings: a run over many shards loads the weights once."""
    import ctranslate2

    key = (path, device, compute_type, inter, intra)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES.clear()  # at most one translator model resident
            _ENGINES[key] = ctranslate2.Translator(
                path, device=device, compute_type=compute_type, inter_threads=inter, intra_threads=intra
            )
        return _ENGINES[key]


def _vocabulary(path: Path) -> set[str] | None:
    for name in ("shared_vocabulary.json", "target_vocabulary.json"):
        if (path / name).exists():
            return set(json.loads((path / name).read_text(encoding="utf-8")))
    for name in ("shared_vocabulary.txt", "target_vocabulary.txt"):
        if (path / name).exists():
            return set((path / name).read_text(encoding="utf-8").splitlines())
    return None


class NLLBTranslator:
    def __init__(self, cfg: CT2NLLBBackend, cache: Cache | None = None):
        import ctranslate2
        import sentencepiece as spm

        path = Path(cfg.path)
        spm_file = path / "sentencepiece.bpe.model"
        if not (path / "model.bin").exists() or not spm_file.exists():
            raise FileNotFoundError(
                f"{path} is not a CTranslate2 NLLB dir (needs model.bin and sentencepiece.bpe.model)"
            )
        self.cfg = cfg
        self.cache = cache
        self.model_id = cfg.model_id or path.name
        self.device, self.compute_type = select_device(
            cfg.device, cfg.compute_type, ctranslate2.get_cuda_device_count()
        )
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        self.engine = load_engine(
            str(path), self.device, self.compute_type, cfg.inter_threads, cfg.intra_threads
        )
        vocab = _vocabulary(path)  # suppress only tokens the model has (an unknown one would map to <unk>)
        self._suppress = None if vocab is None else [[t] for t in sorted((CONTROL_TOKENS - {EOS}) & vocab)]
        c = cfg
        self._key_prefix = cache_key(
            kind="nllb",
            v=CACHE_VERSION,
            model=self.model_id,
            compute=self.compute_type,
            beam=c.beam_size,
            max_in=c.max_input_tokens,
            max_dec=c.max_decoding_length,
            suppress=self._suppress is not None,
        )
        # engine_calls, segments_translated (unique segment x target sent), chunks, cache_hits,
        # max_source_tokens
        self.stats: Counter[str] = Counter()

    @property
    def engine_calls(self) -> int:
        return self.stats["engine_calls"]

    @property
    def segments_translated(self) -> int:
        return self.stats["segments_translated"]

    def _key(self, seg: str, tgt: str) -> str:
        """sha256 over everything that changes the output; the constant part is hashed once per translator."""
        return hashlib.sha256(f"{self._key_prefix}\x00{tgt}\x00{seg}".encode()).hexdigest()

    def translate_segments(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], SegmentResult]:
        """{(segment, target): result}: cache first, then the engine for the rest, in bounded calls."""
        uniq = sorted(set(pairs))
        keys = {p: self._key(*p) for p in uniq} if self.cache else {}
        hits = self.cache.get_many(list(keys.values())) if self.cache else {}
        result = {p: SegmentResult(*hits[k]) for p, k in keys.items() if k in hits}
        self.stats["cache_hits"] += len(result)
        todo = [p for p in uniq if p not in result]
        for i in range(0, len(todo), MAX_SEGMENTS_PER_CALL):  # bounded memory; each finished group is cached
            fresh = self._engine_call(todo[i : i + MAX_SEGMENTS_PER_CALL])
            if self.cache:
                self.cache.put_many({keys[p]: list(v) for p, v in fresh.items()})
            result.update(fresh)
        return result

    def _engine_call(self, todo: list[tuple[str, str]]) -> dict[tuple[str, str], SegmentResult]:
        limit = self.cfg.max_input_tokens - 2  # room for the source code and </s>
        jobs: list[tuple[tuple[str, str], int, list[str]]] = []
        texts = sorted({seg for seg, _ in todo})  # a segment wanted in several targets is encoded once
        chunks = dict(
            zip(texts, (chunk_tokens(x, limit) for x in self.sp.encode(texts, out_type=str)), strict=True)
        )
        for p in todo:
            for i, toks in enumerate(chunks[p[0]]):
                jobs.append((p, i, toks))
        jobs.sort(key=lambda j: len(j[2]))  # length-sorted: less padding per batch
        src = [[SOURCE_LANG, *toks, EOS] for _, _, toks in jobs]
        # Asynchronous: results arrive batch by batch (length order, like `jobs`), so cleaning and decoding
        # the
        # finished ones overlaps with the engine working on the next batches.
        futures = self.engine.translate_batch(
            src,
            target_prefix=[[p[1]] for p, _, _ in jobs],
            beam_size=self.cfg.beam_size,
            max_batch_size=self.cfg.max_batch_tokens,
            batch_type="tokens",
            max_input_length=0,
            max_decoding_length=self.cfg.max_decoding_length,
            return_end_token=True,
            suppress_sequences=self._suppress,
            asynchronous=True,
        )
        self.stats["engine_calls"] += 1
        self.stats["chunks"] += len(jobs)
        self.stats["max_source_tokens"] = max(self.stats["max_source_tokens"], *map(len, src))
        parts: dict[tuple[str, str], dict[int, str]] = {p: {} for p in todo}
        trunc = dict.fromkeys(todo, False)
        for (p, i, _), fut in zip(jobs, futures, strict=True):
            toks, complete = clean_hypothesis(fut.result().hypotheses[0], p[1])
            trunc[p] = trunc[p] or not complete
            parts[p][i] = self.sp.decode(toks).strip()
        self.stats["segments_translated"] += len(todo)
        return {
            p: SegmentResult(
                _joiner(p[1]).join(x for _, x in sorted(parts[p].items()) if x),
                trunc[p],
                sum(not x for x in parts[p].values()),
            )
            for p in todo
        }

    def translate_many(self, jobs: list[tuple[str, str]]) -> list[Translation]:
        """(text, target) pairs -> one Translation each; all targets share one engine call."""
        by_text = {
            text: split(text) for text in {text for text, _ in jobs}
        }  # each text split once for all targets
        splits = [by_text[text] for text, _ in jobs]
        pairs = [(p.text, tgt) for (_, tgt), pieces in zip(jobs, splits) for p in pieces if p.translate]
        table = self.translate_segments(pairs) if pairs else {}
        out = []
        for (_, tgt), pieces in zip(jobs, splits):
            done = [table[(p.text, tgt)] for p in pieces if p.translate]
            texts = [d.text for d in done]
            empty = sum(bool(d.empty_chunks) or not d.text for d in done)
            out.append(Translation(reassemble(pieces, texts), any(d.truncated for d in done), texts, empty))
        return out

    def translate(self, texts: list[str], tgt: str) -> list[Translation]:
        return self.translate_many([(t, tgt) for t in texts])
