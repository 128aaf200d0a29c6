"""babelsynth's own input (schemas/input.v2.yaml, or v1 with question + answer): Parquet, ids in source_id."""

from __future__ import annotations

from babelsynth.inputs.base import hf_image_bytes, sample, turn
from babelsynth.inputs.parquet import ParquetAdapter
from babelsynth.inputs.source import InputFile


class CanonicalAdapter(ParquetAdapter):
    name = "canonical"
    required = ("source_id", "task_type", "images")
    optional = ("conversation", "question", "answer", "source")
    id_columns = ("source_id",)

    def check_schema(self, f: InputFile, names: list[str]) -> None:
        super().check_schema(f, names)
        if "conversation" not in names and not {"question", "answer"} <= set(names):
            raise ValueError(
                f"{f.uri} has neither `conversation` (schemas/input.v2.yaml) nor `question` + `answer` "
                f"(schemas/input.v1.yaml); it has {names}. For other datasets set input.format"
            )

    def convert(self, row: dict, f: InputFile, source_id: str) -> dict:
        conv = row.get("conversation")
        if conv is None:  # v1: one exchange
            conv = [turn("user", row.get("question") or ""), turn("assistant", row.get("answer") or "")]
        images = [hf_image_bytes(x) for x in row.get("images") or []]
        rec = sample(
            row.get("source_id") or "", row.get("task_type") or "", conv, images, row.get("source") or ""
        )
        return rec


ADAPTER = CanonicalAdapter
