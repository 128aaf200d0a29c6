"""Hugging Face Parquet in The Cauldron's shape: `images` (list of HF Image) + `texts` (list of
{user, assistant, source}); one row is one (possibly multi-turn) conversation about its images."""

from __future__ import annotations

from babelsynth.inputs.base import (
    hf_image_bytes,
    image_count_problem,
    quarantined,
    sample,
    strip_image_tokens,
    task_type_for,
    turn,
)
from babelsynth.inputs.parquet import ParquetAdapter, dataset_name
from babelsynth.inputs.source import InputFile


class CauldronAdapter(ParquetAdapter):
    name = "cauldron"
    required = ("images", "texts")

    def convert(self, row: dict, f: InputFile, source_id: str) -> dict:
        texts = row.get("texts") or []
        source = next((t.get("source") for t in texts if t.get("source")), None) or dataset_name(f.rel)
        conv, tokens = [], 0
        for t in texts:
            user, n = strip_image_tokens(t.get("user") or "")
            tokens += n
            conv += [turn("user", user), turn("assistant", (t.get("assistant") or "").strip())]
        images = [hf_image_bytes(x) for x in row.get("images") or []]
        task = task_type_for(self.cfg, source)
        if any(b is None for b in images):
            return quarantined(source_id, "image_not_embedded", "an image has no bytes (only a path)", source)
        problem = image_count_problem(tokens, len(images))
        if problem:
            return quarantined(source_id, "image_token_mismatch", problem, source, conversation=conv)
        return sample(source_id, task, conv, images, source)


ADAPTER = CauldronAdapter
