"""COMET QE scoring (backends/comet_qe.py) against the raw `comet` predict, in one run, same pairs, same
model.

  .venv/bin/python benchmarks/bench_comet.py [--pairs 768] [--repeats 3] [--batch 32]

Workload: what the score stage sends: (English, translation) pairs over the corpus languages, prompts repeated
across rows (as real prompts are), and one pair in 24 a multi-paragraph answer longer than the 512-token
window.
(a) raw `model.predict(pairs, length_batching=True)`: COMET's own sort (by source characters); it silently
cuts
    every long pair at 512 tokens, so it does less work than a correct scorer.
(b) raw without length sorting, to show what the sort buys.
(c) CometScorer.score, cache off: dedup, segment-level scoring of long pairs (nothing cut), sort by tokens.
Ratios are what to read (the box is shared). Best of N interleaved runs; one process, torch 1 thread.
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


def lines(lang: str) -> list[str]:
    return [x for x in (CORPUS / f"{lang}.txt").read_text("utf-8").splitlines() if x]


def workload(n: int, seed: int = 0, long_every: int = 24) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    en = lines("eng_Latn")
    tr = {lg: lines(lg) for lg in LANGS}
    pairs = []
    for i in range(n):
        lg = LANGS[i % len(LANGS)]
        if (
            long_every and i % long_every == long_every - 1
        ):  # a long answer: 40 numbered sentences, beyond the window
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from babelsynth.backends.comet_qe import CometScorer
    from babelsynth.config import CometBackend
    from tinymodels.build import build_all

    ckpt = build_all(ROOT / ".work" / "test" / "models")["comet"]
    scorer = CometScorer(CometBackend(path=ckpt, batch_size=args.batch, gpus=0))
    result = {}
    for name, long_every in (("short_only", 0), ("with_long", 24)):
        pairs = workload(args.pairs, long_every=long_every)
        data = [{"src": s, "mt": t} for s, t in pairs]
        raw_tokens = sum(
            min(scorer.count_tokens(s) + scorer.count_tokens(t), scorer.budget) for s, t in pairs
        )
        runs: dict[str, list[float]] = {"raw_sorted": [], "raw_unsorted": [], "scorer": []}
        for _ in range(args.repeats):
            for key, fn in (
                (
                    "raw_sorted",
                    lambda data=data: scorer.model.predict(
                        data, batch_size=args.batch, gpus=0, progress_bar=False
                    ),
                ),
                (
                    "raw_unsorted",
                    lambda data=data: scorer.model.predict(
                        data, batch_size=args.batch, gpus=0, progress_bar=False, length_batching=False
                    ),
                ),
                ("scorer", lambda pairs=pairs: scorer.score(pairs)),
            ):
                t0 = time.perf_counter()
                fn()
                runs[key].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in runs.items()}
        before = (scorer.segments_scored, scorer.tokens_scored)
        scorer.score(pairs)
        segs, toks = scorer.segments_scored - before[0], scorer.tokens_scored - before[1]
        result[name] = {
            "pairs": len(pairs),
            "distinct_pairs": len(set(pairs)),
            "pairs_beyond_window": sum(
                scorer.count_tokens(s) + scorer.count_tokens(t) > scorer.budget for s, t in pairs
            ),
            "raw": {"inputs": len(pairs), "tokens": raw_tokens},
            "scorer": {"inputs": segs, "tokens": toks},
            "best_seconds": {k: round(v, 3) for k, v in best.items()},
            "speed_scorer_vs_raw_sorted": round(best["raw_sorted"] / best["scorer"], 2),
            "tokens_per_s_scorer_vs_raw_sorted": round(
                (toks / best["scorer"]) / (raw_tokens / best["raw_sorted"]), 2
            ),
            "speed_raw_sorted_vs_unsorted": round(best["raw_unsorted"] / best["raw_sorted"], 2),
        }
    result["note"] = (
        "raw cuts pairs beyond the window at 512 tokens; the scorer scores all of them, by segments"
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
