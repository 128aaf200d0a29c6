"""Translate-stage throughput against the raw engine, in one run, same sentences, same model.

  .venv/bin/python benchmarks/bench_translate.py [--sentences 512] [--model-dir DIR]

Reports (a) NLLBTranslator.translate (segmentation, dedup, cache off, length sort, token batches) against
raw `ctranslate2.Translator.translate_batch` on pre-tokenized segments; the ratio is what to read, not the
seconds. Not a test: timings on a shared 2-core box move; ratios from one run are comparable.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--model-dir", default=None, help="CT2 NLLB dir; default: build the tiny one")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ctranslate2
    import sentencepiece as spm

    from babelsynth.backends.nllb_ct2 import NLLBTranslator
    from babelsynth.config import CT2NLLBBackend
    from babelsynth.models.build import build_all, corpus_lines

    ct2_dir = args.model_dir or build_all(Path(".work/bench/models"))["nllb_ct2"]
    rng = random.Random(0)
    pool = [s for lines in corpus_lines(("eng_Latn",)).values() for s in lines]
    # distinct paragraphs of 2-4 sentences: the stage must split them; the raw engine gets the sentences
    texts = [" ".join(rng.sample(pool, rng.randint(2, 4))) + f" Item {i}." for i in range(args.sentences // 3)]
    cfg = CT2NLLBBackend(path=ct2_dir, beam_size=1, max_decoding_length=64, device="cpu", compute_type="int8")
    stage = NLLBTranslator(cfg, cache=None)
    sp = spm.SentencePieceProcessor(model_file=str(Path(ct2_dir) / "sentencepiece.bpe.model"))
    from babelsynth.segment import split

    segs = [p.text for t in texts for p in split(t) if p.translate]
    raw_src = [["eng_Latn", *sp.encode(s, out_type=str), "</s>"] for s in segs]
    raw = ctranslate2.Translator(ct2_dir, device="cpu", compute_type="int8", inter_threads=1, intra_threads=1)

    def run_raw():
        raw.translate_batch(raw_src, target_prefix=[["fra_Latn"]] * len(raw_src), beam_size=1,
                            max_batch_size=4096, batch_type="tokens", max_decoding_length=64)  # fmt: skip

    def run_stage():
        stage.translate(texts, "fra_Latn")

    best = {}
    for name, fn in (("raw translate_batch", run_raw), ("NLLBTranslator.translate", run_stage)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
        print(f"{name:<28} best {best[name]:.3f}s  ({len(segs) / best[name]:.0f} segments/s)")
    print(f"stage / raw throughput ratio: {best['raw translate_batch'] / best['NLLBTranslator.translate']:.3f}"
          f"  ({len(texts)} texts, {len(segs)} segments)")


if __name__ == "__main__":
    main()
