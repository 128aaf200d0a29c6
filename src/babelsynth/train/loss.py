"""Answer-token cross-entropy that never materialises full-vocabulary logits for a micro-batch.

A packed 8k-token row times a 256k vocabulary is 2 G logits (8 GB in fp32, plus as much again for the
softmax and its gradient). Only answer tokens carry labels, so the hidden states of those positions are
gathered first, then the LM head and the cross-entropy run `chunk` tokens at a time, each chunk under
activation checkpointing: backward recomputes one chunk's logits at a time instead of keeping them all.

`LossModel` is the module FSDP wraps as its root. Holding the HF model plus the loss in one `forward`
keeps the tied embedding / LM head in the root group (gathered once per step) and lets every rank run
the same collectives in the same order: a micro-batch without images still runs the vision tower and
connector on a blank tile and adds `0 x features` to the input embeddings, so the graph (and FSDP's
all-gathers and reduce-scatters) is identical on every rank whatever its rows hold.

Logit scale: Cohere's LMs multiply logits by `logit_scale` (Cohere2ForCausalLM does, and so does vLLM's
Cohere head); transformers' AyaVisionForConditionalGeneration does not. The loss always applies the
language model's own `logit_scale`, so the VLM and its text base are scored by the same definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from babelsynth.train.data import IGNORE_INDEX


def _chunk_ce(head: nn.Module, scale: float, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h)
    if scale != 1.0:
        logits = logits * scale
    return F.cross_entropy(logits.float(), y, reduction="sum")


def chunked_ce_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, scale: float, chunk: int
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions and their count. Summing (not
    averaging) lets gradient accumulation over micro-batches and ranks equal one big batch exactly
    in exact arithmetic: the caller divides by the whole step's token count."""
    tgt = labels[:, 1:]
    keep = tgt != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    y = tgt[keep]
    n = int(y.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total + hidden.sum() * 0, 0  # keeps the graph (and FSDP's backward) identical on every rank
    for i in range(0, n, chunk):
        part = checkpoint(_chunk_ce, head, scale, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
        total = total + part
    return total, n


def is_vlm(model: nn.Module) -> bool:
    return hasattr(model.config, "vision_config")


def text_config(model: nn.Module):
    return model.config.text_config if is_vlm(model) else model.config


class LossModel(nn.Module):
    """HF model (AyaVision VLM or a causal LM) + chunked loss: forward(batch) -> (loss_sum, n_tokens)."""

    def __init__(self, model: nn.Module, chunk_tokens: int = 1024, always_run_vision: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.always_run_vision = always_run_vision and is_vlm(model)
        self.logit_scale = float(getattr(text_config(model), "logit_scale", 1.0) or 1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        if is_vlm(self.model):
            hidden = self._vlm_hidden(input_ids, attention_mask, position_ids, pixel_values)
        else:
            hidden = self.model.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        return chunked_ce_sum(hidden, labels, self.model.lm_head, self.logit_scale, self.chunk_tokens)

    def _vlm_hidden(self, input_ids, attention_mask, position_ids, pixel_values) -> torch.Tensor:
        """AyaVisionModel.forward, spelled out so a micro-batch without images can still run the tower."""
        inner, cfg = self.model.model, self.model.config
        embeds = inner.get_input_embeddings()(input_ids)
        select = dict(
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        if pixel_values is not None:
            feats = inner.get_image_features(pixel_values=pixel_values, **select).to(embeds.dtype)
            mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
            embeds = embeds.masked_scatter(mask, feats)
        elif self.always_run_vision:
            vc = cfg.vision_config
            weight = next(inner.vision_tower.parameters())
            blank = torch.zeros(
                1, vc.num_channels, vc.image_size, vc.image_size, dtype=weight.dtype, device=embeds.device
            )
            feats = inner.get_image_features(pixel_values=blank, **select)
            embeds = embeds + feats.sum().to(embeds.dtype) * 0
        out = inner.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state
