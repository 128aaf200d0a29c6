"""Held-out answer-only losses: the cheap signal for "did merging bring text ability back?".

Two numbers per model on the same held-out rows (split by hash of sample_id):
- text_loss: the prompt without its image, through a text LLM or a VLM's language model;
- mm_loss: the prompt with its image(s), VLMs only.
The alpha sweep is scored in memory: the SFT model is loaded once and, for each alpha, its tensors are
overwritten one at a time with the merge (read lazily from both checkpoints, rounded to the merge's
dtype exactly as `merge_llm` writes it), so no alpha but the chosen one is ever written to disk.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from babelsynth.train.config import TrainConfig
from babelsynth.train.data import Example, RunData, collate, heldout_examples, row_encoder
from babelsynth.train.loss import LossModel, is_vlm
from babelsynth.train.merge import Merge, read_config
from babelsynth.train.parallel import file_key_map

EVAL_FILE = "eval.json"


def is_vlm_dir(model_dir: str | os.PathLike) -> bool:
    return "vision_config" in read_config(model_dir)


def eval_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_for_eval(model_dir: str | os.PathLike, device: torch.device, chunk: int) -> LossModel:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_vlm_dir(model_dir) else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=eval_dtype(device)).to(device).eval()
    return LossModel(model, chunk)


@torch.no_grad()
def answer_loss(
    lm: LossModel, examples: list[Example], batch_size: int, pad_id: int, device: torch.device | str = "cpu"
) -> float | None:
    """Token-weighted mean cross-entropy over answer tokens; None when there is nothing to score."""
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id, packed=False).items()
        }
        s, k = lm(**batch)
        total, n = total + float(s), n + k
    return total / n if n else None


@dataclass
class HeldOut:
    text: list[Example]
    mm: list[Example]
    skipped_text: int
    skipped_mm: int
    pad_id: int


def heldout(run_uri: str, processor, cfg: TrainConfig) -> HeldOut:
    """The held-out rows encoded once (text-only and with images) at the SFT phase's max_seq_len."""
    data = RunData(run_uri)
    limit = cfg.eval.max_batches * cfg.eval.batch_size
    max_len = cfg.phases.sft.max_seq_len
    frac = cfg.eval.heldout_fraction
    text, sk_t = heldout_examples(
        data, row_encoder(processor, data.images, max_len, with_images=False), frac, limit
    )
    mm, sk_m = heldout_examples(
        data, row_encoder(processor, data.images, max_len, with_images=True), frac, limit
    )
    tok = processor.tokenizer
    return HeldOut(
        text, mm, sk_t, sk_m, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    )


def score(lm: LossModel, ho: HeldOut, cfg: TrainConfig, device: torch.device) -> dict:
    vlm = is_vlm(lm.model)
    return {
        "kind": "vlm" if vlm else "text",
        "text_loss": answer_loss(lm, ho.text, cfg.eval.batch_size, ho.pad_id, device),
        "mm_loss": answer_loss(lm, ho.mm, cfg.eval.batch_size, ho.pad_id, device) if vlm else None,
        "n_text": len(ho.text),
        "n_mm": len(ho.mm) if vlm else 0,
    }


def evaluate_models(
    models: dict[str, str | os.PathLike], ho: HeldOut, cfg: TrainConfig, device: torch.device
) -> dict[str, dict]:
    """{name: {"kind", "text_loss", "mm_loss", "n_text", "n_mm"}} for every model dir given. The VLM's
    processor tokenizes for all models, so text and VLM losses are comparable (the merge checks that
    the text model shares the vocabulary)."""
    results = {}
    for name, model_dir in models.items():
        lm = load_for_eval(model_dir, device, cfg.phases.sft.loss_chunk_tokens)
        results[name] = score(lm, ho, cfg, device)
        del lm
    return results


def evaluate_sweep(
    sft_dir: str | os.PathLike,
    text_dir: str | os.PathLike,
    alphas: list[float],
    ho: HeldOut,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, dict]:
    """{"0.30": scores, ...}: each alpha merged into one in-memory model, tensor by tensor, and scored."""
    if not alphas:
        return {}
    lm = load_for_eval(sft_dir, device, cfg.phases.sft.loss_chunk_tokens)
    params = dict(lm.model.named_parameters())
    out = {}
    with ExitStack() as stack:
        m = Merge(sft_dir, text_dir, stack, cfg.merge.dtype)
        names = {n: k for n, k in file_key_map(lm.model, m.vlm.keys()).items() if n in params}
        for alpha in alphas:
            with torch.no_grad():
                for name, key in names.items():
                    params[name].copy_(m.tensor(key, alpha).to(params[name].dtype))
            out[f"{alpha:.2f}"] = {"alpha": alpha, **score(lm, ho, cfg, device)}
    del lm
    return out
