"""NLLB-200 through CTranslate2, driven by sentencepiece alone (no torch at run time).

Source tokens follow the NLLB convention `[src_lang] + pieces + ["</s>"]`, the target code is the
prefix and is dropped from the output. Segments are deduplicated, sorted by length and batched by
tokens; each (segment, target, model) is cached so reruns cost no engine call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from babelsynth.cache import Cache, cache_key
from babelsynth.config import CT2NLLBBackend
from babelsynth.languages import SOURCE_LANG
from babelsynth.segment import reassemble, split

log = logging.getLogger(__name__)


@dataclass
class Translation:
    text: str
    truncated: bool  # some segment hit the decoding limit


def _device(cfg: CT2NLLBBackend) -> tuple[str, str]:
    import ctranslate2

    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    ct = cfg.compute_type or ("int8_float16" if dev == "cuda" else "int8")
    return dev, ct


class NLLBTranslator:
    def __init__(self, cfg: CT2NLLBBackend, cache: Cache | None = None):
        import ctranslate2
        import sentencepiece as spm

        path = Path(cfg.path)
        spm_file = path / "sentencepiece.bpe.model"
        if not (path / "model.bin").exists() or not spm_file.exists():
            raise FileNotFoundError(f"{path} is not a CTranslate2 NLLB dir (needs model.bin and sentencepiece.bpe.model)")
        self.cfg = cfg
        self.cache = cache
        self.model_id = cfg.model_id or path.name
        self.device, self.compute_type = _device(cfg)
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        self.engine = ctranslate2.Translator(
            str(path), device=self.device, compute_type=self.compute_type,
            inter_threads=cfg.inter_threads, intra_threads=cfg.intra_threads,
        )  # fmt: skip
        self.engine_calls = 0
        self.segments_translated = 0

    def _key(self, seg: str, tgt: str) -> str:
        c = self.cfg
        return cache_key(kind="nllb", model=self.model_id, tgt=tgt, seg=seg, beam=c.beam_size,
                         max_in=c.max_input_tokens, max_dec=c.max_decoding_length)  # fmt: skip

    def _chunks(self, seg: str) -> list[list[str]]:
        """Token lists within the input limit: an over-long segment is cut at word boundaries."""
        pieces = self.sp.encode(seg, out_type=str)
        lim = self.cfg.max_input_tokens - 2
        if len(pieces) <= lim:
            return [pieces]
        out, cur = [], []
        for p in pieces:
            if len(cur) >= lim and p.startswith("▁"):
                out.append(cur)
                cur = []
            cur.append(p)
            if len(cur) >= 2 * lim:  # no word boundary for too long: hard cut
                out.append(cur)
                cur = []
        if cur:
            out.append(cur)
        return out

    def translate_segments(self, segs: list[str], tgt: str) -> dict[str, tuple[str, bool]]:
        uniq = sorted(set(segs))
        keys = {s: self._key(s, tgt) for s in uniq}
        hits = self.cache.get_many(list(keys.values())) if self.cache else {}
        result = {s: tuple(hits[k]) for s, k in keys.items() if k in hits}
        todo = [s for s in uniq if s not in result]
        if todo:
            jobs: list[tuple[str, int, list[str]]] = []
            for s in todo:
                for i, toks in enumerate(self._chunks(s)):
                    jobs.append((s, i, toks))
            jobs.sort(key=lambda j: len(j[2]))  # length-sorted: less padding per batch
            src = [[SOURCE_LANG, *j[2], "</s>"] for j in jobs]
            self.engine_calls += 1
            res = self.engine.translate_batch(
                src, target_prefix=[[tgt]] * len(src), beam_size=self.cfg.beam_size,
                max_batch_size=self.cfg.max_batch_tokens, batch_type="tokens",
                max_decoding_length=self.cfg.max_decoding_length, max_input_length=0,
            )  # fmt: skip
            parts: dict[str, dict[int, str]] = {}
            trunc: dict[str, bool] = {}
            for (s, i, _), r in zip(jobs, res):
                hyp = r.hypotheses[0]
                hyp = hyp[1:] if hyp and hyp[0] == tgt else hyp
                # Hitting the decoding limit (prefix excluded) means the output may be cut: flag it.
                trunc[s] = trunc.get(s, False) or len(r.hypotheses[0]) >= self.cfg.max_decoding_length
                parts.setdefault(s, {})[i] = self.sp.decode(hyp)
            fresh = {s: (" ".join(parts[s][i] for i in sorted(parts[s])).strip(), trunc[s]) for s in todo}
            self.segments_translated += len(todo)
            if self.cache:
                self.cache.put_many({keys[s]: list(v) for s, v in fresh.items()})
            result.update(fresh)
        return result  # type: ignore[return-value]

    def translate(self, texts: list[str], tgt: str) -> list[Translation]:
        split_texts = [split(t) for t in texts]
        segs = [p.text for pieces in split_texts for p in pieces if p.translate]
        table = self.translate_segments(segs, tgt) if segs else {}
        out = []
        for pieces in split_texts:
            done = [table[p.text] for p in pieces if p.translate]
            out.append(Translation(reassemble(pieces, [d[0] for d in done]), any(d[1] for d in done)))
        return out
