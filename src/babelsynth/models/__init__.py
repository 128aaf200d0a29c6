"""Tiny random offline models (NLLB/CT2, AyaVision VLM + text LLM, CometKiwi) for tests and the demo.

Importing this package is cheap: torch/transformers/comet are imported only inside the builders.
"""

from babelsynth.models.build import (
    CORPUS_CODES,
    CORPUS_DIR,
    build_all,
    build_aya_vision,
    build_comet,
    build_nllb,
    corpus_lines,
    llm_to_vlm_name,
    vlm_to_llm_name,
)

__all__ = [
    "CORPUS_CODES",
    "CORPUS_DIR",
    "build_all",
    "build_aya_vision",
    "build_comet",
    "build_nllb",
    "corpus_lines",
    "llm_to_vlm_name",
    "vlm_to_llm_name",
]
