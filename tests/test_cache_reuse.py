"""Cache reuse: work the cache can answer loads no model, so a re-run or a grown input pays only for what
is new (benchmarks/bench_io.py measures the whole pipeline)."""

from __future__ import annotations

from babelsynth.cache import Cache
from babelsynth.config import CometBackend, CT2NLLBBackend


def test_a_fully_cached_score_call_never_loads_the_comet_checkpoint(models, tmp_path):
    from babelsynth.backends.comet_qe import CometScorer

    cfg = CometBackend(path=models["comet"], model_id="tiny-cometkiwi", batch_size=8, gpus=0)
    pairs = [("The cat sleeps.", "Die Katze schläft."), ("A red car.", "Ein rotes Auto.")]
    first = CometScorer(cfg, Cache(tmp_path / "c.sqlite"))
    scores = first.score(pairs)
    assert first.loaded and first.segments_scored == 2
    again = CometScorer(cfg, Cache(tmp_path / "c.sqlite"))
    assert again.score(pairs[::-1]) == scores[::-1]
    assert not again.loaded and again.calls == 0  # keys, window included, came from the cache
    assert again.score([("New.", "Neu.")]) and again.loaded


def test_a_fully_cached_translation_never_loads_the_engine(models, tmp_path):
    from babelsynth.backends.nllb_ct2 import NLLBTranslator

    cfg = CT2NLLBBackend(path=models["nllb_ct2"], model_id="tiny-nllb", beam_size=1, max_decoding_length=16)
    first = NLLBTranslator(cfg, Cache(tmp_path / "t.sqlite"))
    done = [t.text for t in first.translate(["The cat sleeps.", "A red car."], "deu_Latn")]
    assert first.loaded
    again = NLLBTranslator(cfg, Cache(tmp_path / "t.sqlite"))
    assert [t.text for t in again.translate(["A red car.", "The cat sleeps."], "deu_Latn")] == done[::-1]
    assert not again.loaded and again.engine_calls == 0
