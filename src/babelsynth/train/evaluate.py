"""Held-out answer-only losses: the cheap signal for "did merging bring text ability back?".

Two numbers per model on the same held-out rows (split by hash of sample_id):
- text_loss: the prompt without its image, through a text LLM or a VLM's language model;
- mm_loss: the prompt with its image(s), VLMs only.
Results are JSON-written next to each model (<model_dir>/eval.json) and returned as a dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from babelsynth.train.config import TrainConfig
from babelsynth.train.data import Example, RunData, collate, heldout_examples, row_encoder
from babelsynth.train.sft import resolve_device, token_loss_sum

EVAL_FILE = "eval.json"


def is_vlm_dir(model_dir: str | os.PathLike) -> bool:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return "vision_config" in cfg


def load_for_eval(model_dir: str | os.PathLike, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_vlm_dir(model_dir) else AutoModelForCausalLM
    return cls.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()


@torch.no_grad()
def answer_loss(
    model, examples: list[Example], batch_size: int, pad_id: int, device: torch.device | str = "cpu"
) -> float | None:
    """Token-weighted mean cross-entropy over answer tokens; None when there is nothing to score."""
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id, packed=False).items()
        }
        s, k = token_loss_sum(model, batch)
        total, n = total + float(s), n + k
    return total / n if n else None


def evaluate_models(
    models: dict[str, str | os.PathLike],
    run_uri: str,
    processor,
    cfg: TrainConfig,
    out_path: str | os.PathLike | None = None,
    write_next_to: set[str] = frozenset(),
) -> dict:
    """{name: {"text_loss", "mm_loss", "n_text", "n_mm", "dir", "kind"}} for every model dir given;
    the models named in `write_next_to` also get <dir>/eval.json (inputs such as the text base are
    left untouched). The VLM's processor tokenizes for all models, so text and VLM losses are
    comparable; the text model must share the tokenizer (merge_llm checks the vocab shapes)."""
    device = resolve_device(cfg.device)
    data = RunData(run_uri)
    limit = cfg.eval.max_batches * cfg.eval.batch_size
    max_len = cfg.phases.sft.max_seq_len
    frac = cfg.eval.heldout_fraction
    text_ex = heldout_examples(
        data, row_encoder(processor, data.images, max_len, with_images=False), frac, limit
    )
    mm_ex = heldout_examples(
        data, row_encoder(processor, data.images, max_len, with_images=True), frac, limit
    )
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    results: dict[str, dict] = {}
    for name, model_dir in models.items():
        model = load_for_eval(model_dir, device)
        vlm = is_vlm_dir(model_dir)
        res = {
            "dir": str(model_dir),
            "kind": "vlm" if vlm else "text",
            "text_loss": answer_loss(model, text_ex, cfg.eval.batch_size, pad_id, device),
            "mm_loss": answer_loss(model, mm_ex, cfg.eval.batch_size, pad_id, device) if vlm else None,
            "n_text": len(text_ex),
            "n_mm": len(mm_ex) if vlm else 0,
        }
        del model
        results[name] = res
        if name in write_next_to:
            (Path(model_dir) / EVAL_FILE).write_text(json.dumps(res, indent=1))
    if out_path is not None:
        Path(out_path).write_text(json.dumps(results, indent=1))
    return results
