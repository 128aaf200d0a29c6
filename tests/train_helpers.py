"""Shared by the training tests: a fake pipeline run (manifest + Parquet shards + images) built here."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LANG_TEXT = {
    "eng_Latn": ("What color is the picture?", "The picture is {c}."),
    "deu_Latn": ("Welche Farbe hat das Bild?", "Das Bild ist {c}."),
    "fra_Latn": ("Quelle est la couleur de l'image ?", "L'image est {c}."),
}
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _png(rgb, size) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def build_fake_run(root: Path, rows_per_lang: int = 8) -> Path:
    """A run root with manifest.json, samples/lang=*/ shards and two images files (row groups of 2)."""
    images = {c: _png(rgb, (40 + 8 * i, 30 + 4 * i)) for i, (c, rgb) in enumerate(COLORS.items())}
    ids = {c: hashlib.sha256(b).hexdigest() for c, b in images.items()}
    files = []
    names = list(COLORS)
    for part, chunk in enumerate([names[:2], names[2:]]):
        t = pa.table(
            {
                "image_id": [ids[c] for c in chunk],
                "image": [images[c] for c in chunk],
                "format": ["PNG"] * len(chunk),
                "width": pa.array([1] * len(chunk), pa.int32()),
                "height": pa.array([1] * len(chunk), pa.int32()),
            }
        )
        rel = f"images/part-{part:05d}.parquet"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, root / rel, row_group_size=1)
        files.append({"table": "images", "path": rel, "rows": len(chunk)})
    for lang, (prompt, answer) in LANG_TEXT.items():
        rows = []
        for i in range(rows_per_lang):
            c = names[i % 4]
            image_ids = [ids[c]] if i % 4 else [ids[c], ids[names[(i + 1) % 4]]]
            rows.append(
                {
                    "run_id": "test",
                    "sample_id": hashlib.sha256(f"src{i}|{lang}".encode()).hexdigest()[:24],
                    "source_id": f"src{i}",
                    "lang": lang,
                    "task_type": "captioning",
                    "image_ids": image_ids,
                    "prompt": prompt,
                    "answer": answer.format(c=c),
                }
            )
        rel = f"samples/lang={lang}/part-00000.parquet"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / rel)
        files.append({"table": "samples", "path": rel, "rows": len(rows), "lang": lang})
    (root / "manifest.json").write_text(json.dumps({"run_id": "test", "files": files}))
    return root


def family_configs(vlm: Path, text: Path, hidden: int, vocab: int, layers: int, **text_extra) -> None:
    """Minimal config.json files of a VLM and its text base (what the merge's family check reads)."""
    fam = {"model_type": "cohere2", "hidden_size": hidden, "vocab_size": vocab, "num_hidden_layers": layers}
    (vlm / "config.json").write_text(json.dumps({"text_config": fam, "vision_config": {}}))
    (text / "config.json").write_text(json.dumps({**fam, **text_extra}))


# The published dimensions of the two Aya Vision models, as their config.json files state them (paper
# arXiv 2505.08751 section 4.1 and Table 6; notes/paper.md section 8). Aya Vision 8B: SigLIP2-so400m-
# patch14-384 run at 364 px + Command R7B (Cohere2). 32B: SigLIP2-so400m-patch16-512 + Aya Expanse 32B
# (Cohere). The 32B connector width 49152 is inferred from the paper's 428M connector parameters.
AYA_VISION_CONFIGS = {
    "8b": {
        "model_type": "aya_vision",
        "downsample_factor": 2,
        "alignment_intermediate_size": 28672,
        "text_config": {
            "model_type": "cohere2",
            "vocab_size": 256000,
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 364,
            "vision_use_head": False,
        },
    },
    "32b": {
        "model_type": "aya_vision",
        "downsample_factor": 2,
        "alignment_intermediate_size": 49152,
        "text_config": {
            "model_type": "cohere",
            "vocab_size": 256000,
            "hidden_size": 8192,
            "num_hidden_layers": 40,
            "intermediate_size": 24576,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": True,
            "use_qk_norm": False,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "patch_size": 16,
            "image_size": 512,
            "vision_use_head": False,
        },
    },
}
