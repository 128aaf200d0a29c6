"""Readers of a finished run: runs written with samples.v1 (single-turn, images in global parts) still read,
a schema newer than this babelsynth fails with a clear message, and the export of a v1 run loads in
Hugging Face `datasets` with its images decoded."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from babelsynth.export import export
from babelsynth.layout import RunLayout
from babelsynth.release import RunReader
from babelsynth.schema import columns, to_table


def png(colour: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def v1_run(tmp_path) -> Path:
    """A committed run in the v1 layout: samples.v1 rows, images in one global part, no image_index."""
    lay = RunLayout(str(tmp_path), "old-run")
    images = {c: png(c) for c in ("red", "blue")}
    ids = {c: hashlib.sha256(b).hexdigest() for c, b in images.items()}
    base = dict.fromkeys(columns("samples", 1))
    files = []
    for shard, (lang, colour) in enumerate([("eng_Latn", "red"), ("deu_Latn", "blue")]):
        row = {
            **base,
            "run_id": "old-run",
            "sample_id": f"id{shard}",
            "source_id": f"s{shard}",
            "lang": lang,
            "task_type": "vqa",
            "image_ids": [ids[colour]],
            "prompt": f"Welche Farbe? {shard}",
            "answer": colour,
            "prompt_en": "Which colour?",
            "answer_en": colour,
            "answer_gt": colour,
            "selected": "source",
            "selection_reason": "english",
            "recaption_prompt_id": "recaption/vqa.v1",
            "recaption_prompt_sha": "0" * 64,
            "teacher_model": "t",
            "filter_flags": [],
            "gate_flags": [],
            "shard": shard,
        }
        files.append(
            lay.write_table(lay.samples_path(lang, shard), to_table("samples", [row], 1), "samples", lang)
        )
    rows = [
        {"image_id": ids[c], "image": b, "format": "PNG", "width": 12, "height": 12}
        for c, b in images.items()
    ]
    files.append(lay.write_table(lay.images_path(0), to_table("images", rows), "images"))
    manifest = {
        "run_id": "old-run",
        "schemas": {"samples": "samples.v1", "images": "images.v1", "rejected": "rejected.v1"},
        "samples_by_lang": {"eng_Latn": 1, "deu_Latn": 1},
        "files": files,
    }
    lay.write_manifest(manifest)
    return Path(lay.root)


def test_a_v1_run_reads_as_one_exchange_with_its_images(v1_run):
    got = {s["lang"]: s for s in RunReader(str(v1_run)).iter_samples()}
    assert got["deu_Latn"]["conversation"] == [
        {"role": "user", "content": "Welche Farbe? 1"},
        {"role": "assistant", "content": "blue"},
    ]
    assert got["deu_Latn"]["images"] == [png("blue")] and got["eng_Latn"]["images"] == [png("red")]
    assert RunReader(str(v1_run / "manifest.json")).languages == ["deu_Latn", "eng_Latn"]


def test_a_newer_schema_fails_naming_the_versions(v1_run):
    m = json.loads((v1_run / "manifest.json").read_text())
    m["schemas"]["samples"] = "samples.v9"
    (v1_run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ValueError, match=r"written with samples.v9; this babelsynth reads samples.v1 to samples.v2"
    ):
        RunReader(str(v1_run))


def test_an_uncommitted_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not committed"):
        RunReader(str(tmp_path / "nothing"))


def test_export_of_a_v1_run_loads_in_datasets_with_images_decoded(v1_run, tmp_path):
    import datasets
    from PIL import Image

    out = tmp_path / "export"
    assert export(str(v1_run), str(out), "hf") == {"files": 2, "samples": 2, "images": 2}
    ds = datasets.load_dataset(str(out), "deu_Latn", split="train", cache_dir=str(tmp_path / "cache"))
    (row,) = list(ds)
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert row["texts"] == [{"user": "Welche Farbe? 1", "assistant": "blue", "source": ""}]
