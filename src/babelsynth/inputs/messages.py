"""Hugging Face Parquet in the chat shape of TRL / LLaVA-style SFT sets: `messages` ([{role, content}],
content a string or [{type: image|text, text}]) + `images` (list of HF Image)."""

from __future__ import annotations

from babelsynth.inputs.base import (
    hf_image_bytes,
    image_count_problem,
    message_turns,
    quarantined,
    sample,
    task_type_for,
)
from babelsynth.inputs.parquet import ParquetAdapter, dataset_name
from babelsynth.inputs.source import InputFile


class MessagesAdapter(ParquetAdapter):
    name = "messages"
    required = ("messages", "images")
    optional = ("source",)

    def convert(self, row: dict, f: InputFile, source_id: str) -> dict:
        source = row.get("source") or dataset_name(f.rel)
        conv, n_images, problem = message_turns(row.get("messages"))
        if problem:
            return quarantined(source_id, *problem, source)
        images = [hf_image_bytes(x) for x in row.get("images") or []]
        if any(b is None for b in images):
            return quarantined(source_id, "image_not_embedded", "an image has no bytes (only a path)", source)
        problem_text = image_count_problem(n_images, len(images))
        if problem_text:
            return quarantined(source_id, "image_token_mismatch", problem_text, source, conversation=conv)
        return sample(source_id, task_type_for(self.cfg, source), conv, images, source)


ADAPTER = MessagesAdapter
