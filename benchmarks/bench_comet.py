"""COMET QE scoring (backends/comet_qe.py) against the raw `comet` predict, in one run, on the same model.

  .venv/bin/python benchmarks/bench_comet.py [--pairs 768] [--repeats 3] [--batch 32] [--shape tiny|base]

Workload: what the score stage sends: (English, translation) pairs over the corpus languages, prompts repeated
across rows (as real prompts are), and (second workload) one pair in 24 a multi-paragraph answer longer than
the 512-token window. Three figures are kept apart, each on identical work:

(1) scorer vs raw on the SAME DEDUPLICATED pairs: raw `model.predict(distinct, length_batching=True)` (COMET's
    own sort) against CometScorer.score(distinct) with the cache off. Equal work without long pairs: the ratio
    is the scorer's own cost per pair (cache keys, token counting, chunk planning, its sort).
(2) what deduplication gains: raw on all pairs vs raw on the distinct ones (the scorer dedups; raw does not).
(3) with long pairs, raw silently cuts each at 512 tokens while the scorer scores every segment: compared by
    tokens per second, not seconds.

Wall seconds (perf_counter) and CPU seconds (process_time, all threads) of interleaved runs, best of N;
torch runs one thread. --shape base builds a random XLM-R-base-shaped CometKiwi (768 hidden, 12 layers)
under .work/bench/ once, where the encoder, not the Python around it, dominates as it does for real.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tinymodels lives at the repo root, outside the wheel
CORPUS = ROOT / "tinymodels" / "corpus"
LANGS = ("fra_Latn", "deu_Latn", "hin_Deva", "jpn_Jpan", "zho_Hans", "rus_Cyrl")
BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def lines(lang: str) -> list[str]:
    return [x for x in (CORPUS / f"{lang}.txt").read_text("utf-8").splitlines() if x]


def workload(n: int, seed: int = 0, long_every: int = 24) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    en = lines("eng_Latn")
    tr = {lg: lines(lg) for lg in LANGS}
    pairs = []
    for i in range(n):
        lg = LANGS[i % len(LANGS)]
        if long_every and i % long_every == long_every - 1:  # a long answer: 40 numbered sentences
            idx = [rng.randrange(12) for _ in range(40)]
            pairs.append(
                (
                    "\n".join(f"{k + 1}. {en[j]}" for k, j in enumerate(idx)),
                    "\n".join(f"{k + 1}. {tr[lg][j]}" for k, j in enumerate(idx)),
                )
            )
        elif i % 3 == 0:  # a prompt: few distinct ones, repeated across rows
            j = rng.randrange(3)
            pairs.append((en[j], tr[lg][j]))
        else:
            k = rng.randrange(1, 4)
            js = [rng.randrange(12) for _ in range(k)]
            pairs.append((" ".join(en[j] for j in js), " ".join(tr[lg][j] for j in js)))
    return pairs


def checkpoint(shape: str) -> tuple[str, str]:
    """The checkpoint and its encoder's dir (config + tokenizer), as CometBackend.encoder_path takes it."""
    from tinymodels.build import build_all

    if shape == "tiny":
        built = build_all(ROOT / ".work" / "test" / "models")
        return built["comet"], built["comet_encoder"]
    from tinymodels import comet as tiny_comet

    out = ROOT / ".work" / "bench" / "comet-base"
    ckpt = out / "cometkiwi" / "checkpoints" / "model.ckpt"
    if not ckpt.exists():
        tiny_comet.COMET_CONFIG["encoder"] = dict(BASE)  # this process only: a bigger random encoder
        tiny_comet.build_comet(out)
    return str(ckpt), str(out / "encoder")


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shape", choices=("tiny", "base"), default="tiny")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from babelsynth.backends.comet_qe import CometScorer
    from babelsynth.config import CometBackend

    ckpt, encoder = checkpoint(args.shape)  # the checkpoint names its encoder by hub id: its files are here
    scorer = CometScorer(
        CometBackend(path=ckpt, encoder_path=encoder, batch_size=args.batch, gpus=0)
    )  # no cache

    def raw(pairs):
        data = [{"src": s, "mt": t} for s, t in pairs]
        return lambda: scorer.model.predict(data, batch_size=args.batch, gpus=0, progress_bar=False)

    result: dict = {"shape": args.shape, "batch": args.batch, "repeats": args.repeats}
    for name, long_every in (("short_only", 0), ("with_long", 24)):
        pairs = workload(args.pairs, long_every=long_every)
        distinct = list(dict.fromkeys(pairs))
        runs: dict[str, list[tuple[float, float]]] = {
            "raw_distinct": [],
            "scorer_distinct": [],
            "raw_all": [],
        }
        for _ in range(args.repeats):  # interleaved, so load on the shared box hits each alike
            runs["raw_distinct"].append(timed(raw(distinct)))
            runs["scorer_distinct"].append(timed(lambda d=distinct: scorer.score(d)))
            runs["raw_all"].append(timed(raw(pairs)))
        best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in runs.items()}
        before = (scorer.segments_scored, scorer.tokens_scored)
        scorer.score(distinct)
        segs, toks = scorer.segments_scored - before[0], scorer.tokens_scored - before[1]
        raw_tokens = sum(
            min(scorer.count_tokens(s) + scorer.count_tokens(t), scorer.budget) for s, t in distinct
        )
        rd, sd, ra = best["raw_distinct"], best["scorer_distinct"], best["raw_all"]
        result[name] = {
            "pairs": len(pairs),
            "distinct_pairs": len(distinct),
            "pairs_beyond_window": sum(
                scorer.count_tokens(s) + scorer.count_tokens(t) > scorer.budget for s, t in distinct
            ),
            "best_wall_s": {k: round(v[0], 3) for k, v in best.items()},
            "best_cpu_s": {k: round(v[1], 3) for k, v in best.items()},
            # (1) same distinct pairs: >1 means the scorer is faster than raw
            "scorer_vs_raw_same_pairs": {"wall": round(rd[0] / sd[0], 3), "cpu": round(rd[1] / sd[1], 3)},
            # (2) deduplication alone, on raw COMET
            "dedup_gain_raw": {"wall": round(ra[0] / rd[0], 3), "cpu": round(ra[1] / rd[1], 3)},
            # (3) work done: raw cuts long pairs at the window, the scorer scores every segment
            "raw": {"inputs": len(distinct), "tokens": raw_tokens},
            "scorer": {"inputs": segs, "tokens": toks},
            "tokens_per_cpu_s_scorer_vs_raw": round((toks / sd[1]) / (raw_tokens / rd[1]), 3),
        }
    print(json.dumps(result, indent=1))
    out = ROOT / ".work" / "bench" / f"comet-{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
