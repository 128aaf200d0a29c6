"""NLLB-200 through CTranslate2, driven by its tokenizer alone (no torch at run time).

The directory is what `ct2-transformers-converter` writes (model.bin, config.json, shared_vocabulary.json)
plus the tokenizer: `sentencepiece.bpe.model` (copied with `--copy_files`) or, as ready-made conversions
ship, the Hugging Face `tokenizer.json`; both give the same pieces.

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

import regex

from babelsynth.cache import Cache, cache_key
from babelsynth.config import CT2NLLBBackend
from babelsynth.languages import FLORES_200, SOURCE_LANG
from babelsynth.progress import Progress
from babelsynth.segment import reassemble, split

log = logging.getLogger(__name__)

EOS = "</s>"
# Tokens that are never text: the language codes (the random test model and, rarely, real NLLB emit them
# mid-output, e.g. "hin_Devahin_Deva") and the fairseq specials. Suppressed in decoding, stripped after.
CONTROL_TOKENS: frozenset[str] = FLORES_200 | {"<s>", "<pad>", "<mask>", EOS}
# Scripts written without spaces: chunks of an over-long segment are joined without one.
_NO_SPACE_SCRIPTS = ("_Hans", "_Hant", "_Jpan", "_Thai", "_Khmr", "_Laoo", "_Mymr", "_Tibt")
_CLAUSE_END = re.compile(r"[,;:)\]»”\"'、，；：]$")
CACHE_VERSION = 3  # bump when the decoding or cleaning of outputs, or the cached value, changes
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


_UNSPACED_CHAR = regex.compile(
    r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Khmer}\p{Lao}\p{Myanmar}\p{Tibetan}\p{P}]"
)


def join_chunks(chunks: list[tuple[str, bool]], tgt: str) -> str:
    """Translations of the chunks of one over-long segment, put back together.

    Each chunk comes with whether its source started a new word (a space before it). A cut inside a word is
    joined without a space; a cut between words keeps its space, except between two characters of a script
    written without spaces (or punctuation) when the target is such a language (zh/ja/th/...)."""
    out = ""
    for text, spaced in chunks:
        if not text:
            continue
        if out and spaced:
            unspaced = tgt.endswith(_NO_SPACE_SCRIPTS) and (
                _UNSPACED_CHAR.match(out[-1]) or _UNSPACED_CHAR.match(text[0])
            )
            out += "" if unspaced else " "
        out += text
    return out


_ENGINES: dict[tuple, object] = {}
_ENGINES_LOCK = threading.Lock()


def load_engine(path: str, device: str, compute_type: str, inter: int, intra: int, device_index: int = 0):
    """One loaded model per process and settings: a run over many shards loads the weights once."""
    import ctranslate2

    key = (path, device, compute_type, inter, intra, device_index)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES.clear()  # at most one translator model resident
            _ENGINES[key] = ctranslate2.Translator(
                path,
                device=device,
                device_index=device_index,
                compute_type=compute_type,
                inter_threads=inter,
                intra_threads=intra,
            )
        return _ENGINES[key]


class TokenizerJSONPieces:
    """The `tokenizer.json` of a Hugging Face NLLB tokenizer behind sentencepiece's encode/decode calls.

    Pieces only: the language code and </s> are added by the translator (add_special_tokens=False)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tk = Tokenizer.from_file(str(path))

    def encode(self, text: str | list[str], out_type=str) -> list[str] | list[list[str]]:
        if out_type is not str:
            raise ValueError("only pieces (out_type=str) are supported")
        if isinstance(text, str):
            return self.tk.encode(text, add_special_tokens=False).tokens
        return [e.tokens for e in self.tk.encode_batch(text, add_special_tokens=False)]

    def decode(self, pieces: list[str]) -> str:
        return self.tk.decoder.decode(pieces) if pieces else ""


def load_tokenizer(path: Path):
    """sentencepiece.bpe.model when the dir has it, else tokenizer.json; an error naming both otherwise."""
    if (path / "sentencepiece.bpe.model").exists():
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(path / "sentencepiece.bpe.model"))
    if (path / "tokenizer.json").exists():
        return TokenizerJSONPieces(path / "tokenizer.json")
    raise FileNotFoundError(
        f"{path} has no NLLB tokenizer: convert with `ct2-transformers-converter ... --copy_files "
        f"sentencepiece.bpe.model` or copy the model's sentencepiece.bpe.model or tokenizer.json into it"
    )


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

        from babelsynth import gpu

        path = Path(cfg.path)
        if not (path / "model.bin").exists():
            raise FileNotFoundError(
                f"{path} is not a CTranslate2 model dir (no model.bin): convert NLLB with "
                f"ct2-transformers-converter (docs/real-models.md)"
            )
        self.cfg = cfg
        self.cache = cache
        self.model_id = cfg.model_id or path.name
        n_cuda = ctranslate2.get_cuda_device_count()
        self.device, self.compute_type = select_device(cfg.device, cfg.compute_type, n_cuda)
        self.device_index = 0
        if self.device == "cuda":
            self.device_index = cfg.device_index if cfg.device_index is not None else gpu.claim_device(n_cuda)
        self.sp = load_tokenizer(path)  # sentencepiece, or tokenizer.json with the same encode/decode
        self._engine = None  # loaded on the first segment the cache cannot answer
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
        # max_source_tokens, tokens_in / tokens_out (source and output tokens through the engine)
        self.stats: Counter[str] = Counter()

    def usage(self) -> dict[str, int]:
        """The engine's own work (cache hits excluded), in the keys every backend reports."""
        return {
            "model_calls": self.stats["engine_calls"],
            "tokens_in": self.stats["tokens_in"],
            "tokens_out": self.stats["tokens_out"],
        }

    @property
    def engine(self):
        if self._engine is None:
            c = self.cfg
            self._engine = load_engine(
                str(c.path),
                self.device,
                self.compute_type,
                c.inter_threads,
                c.intra_threads,
                self.device_index,
            )
        return self._engine

    @engine.setter
    def engine(self, value) -> None:
        self._engine = value

    @property
    def loaded(self) -> bool:
        return self._engine is not None

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
        with Progress(len(todo), "segments") as prog:
            for i in range(0, len(todo), MAX_SEGMENTS_PER_CALL):  # bounded memory; each group is cached
                fresh = self._engine_call(todo[i : i + MAX_SEGMENTS_PER_CALL], prog)
                if self.cache:
                    self.cache.put_many({keys[p]: list(v) for p, v in fresh.items()})
                result.update(fresh)
        return result

    def _engine_call(
        self, todo: list[tuple[str, str]], prog: Progress | None = None
    ) -> dict[tuple[str, str], SegmentResult]:
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
        self.stats["tokens_in"] += sum(map(len, src))
        parts: dict[tuple[str, str], dict[int, tuple[str, bool]]] = {p: {} for p in todo}
        trunc = dict.fromkeys(todo, False)
        pending = Counter(p for p, _, _ in jobs)  # chunks still out per segment: progress counts segments
        for (p, i, src_toks), fut in zip(jobs, futures, strict=True):
            hyp = fut.result().hypotheses[0]
            self.stats["tokens_out"] += len(hyp)
            toks, complete = clean_hypothesis(hyp, p[1])
            trunc[p] = trunc[p] or not complete
            spaced = bool(src_toks) and src_toks[0].startswith("▁")  # the source chunk starts a word
            parts[p][i] = (self.sp.decode(toks).strip(), spaced)
            pending[p] -= 1
            if prog is not None and not pending[p]:
                prog.advance()
        self.stats["segments_translated"] += len(todo)
        return {
            p: SegmentResult(
                join_chunks([c for _, c in sorted(parts[p].items())], p[1]),
                trunc[p],
                sum(not x for x, _ in parts[p].values()),
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
