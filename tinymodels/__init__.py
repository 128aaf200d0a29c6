"""Tiny random offline models for tests, the demo and the benchmarks; not part of the babelsynth wheel.

One module per model (nllb, aya, comet), the shared corpus they train tokenizers on (corpus), and the
cache that builds them under one root (build). `python -m tinymodels build --root DIR` builds them all.
Importing is cheap: torch / transformers / comet load only inside the builders.
"""
