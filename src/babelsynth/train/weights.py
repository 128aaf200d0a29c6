"""The one VLM <-> text-LLM weight-name mapping (Aya Vision's language model vs the Cohere2 it came from).

The merge reads it to pair tensors, and the tiny-model builder reads it to derive the text LLM from the
VLM, so the two can never disagree. A VLM's keys come in one of two layouts (VLM_LAYOUTS): transformers
4.57 saves the legacy one, in-memory `state_dict()` names and transformers 5 files use the current one.
Pure string functions: no torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Where a model keeps its decoder body (`lm_prefix` + embed_tokens / layers.* / norm) and LM head."""

    lm_prefix: str
    lm_head: str

    def text_name(self, key: str) -> str | None:
        """The text LLM's name for this layout's `key`; None for tensors the text model has no part of
        (vision tower, connector)."""
        if key == self.lm_head:
            return TEXT_LAYOUT.lm_head
        if key.startswith(self.lm_prefix):
            return TEXT_LAYOUT.lm_prefix + key[len(self.lm_prefix) :]
        return None

    def vlm_name(self, text_key: str) -> str:
        """This layout's name for the text LLM's `text_key`."""
        if text_key == TEXT_LAYOUT.lm_head:
            return self.lm_head
        if not text_key.startswith(TEXT_LAYOUT.lm_prefix):
            raise KeyError(f"not a text-LLM parameter name: {text_key}")
        return self.lm_prefix + text_key[len(TEXT_LAYOUT.lm_prefix) :]


LEGACY_VLM_LAYOUT = Layout("language_model.model.", "language_model.lm_head.weight")  # 4.57 files; the hub
VLM_LAYOUT = Layout(
    "model.language_model.", "lm_head.weight"
)  # state_dict() since 4.52; transformers 5 files
VLM_LAYOUTS = (LEGACY_VLM_LAYOUT, VLM_LAYOUT)
TEXT_LAYOUT = Layout("model.", "lm_head.weight")


def detect_vlm_layout(keys: Iterable[str]) -> Layout:
    """The VLM layout the keys are in, judged by the decoder-body prefix."""
    keys = list(keys)
    for layout in VLM_LAYOUTS:
        if any(k.startswith(layout.lm_prefix) for k in keys):
            return layout
    raise ValueError(
        f"no language-model tensors found; expected keys starting with one of "
        f"{[lay.lm_prefix for lay in VLM_LAYOUTS]}, got e.g. {keys[:5]}"
    )


def is_text_only(keys: Iterable[str]) -> bool:
    """True for a causal LM's keys: a decoder body under `model.` and no VLM language-model prefix."""
    keys = list(keys)
    return any(k.startswith(TEXT_LAYOUT.lm_prefix) for k in keys) and not any(
        k.startswith(lay.lm_prefix) for k in keys for lay in VLM_LAYOUTS
    )
