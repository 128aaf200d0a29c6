"""Tiny random Aya Vision VLM and its text-only twin LLM (the same language-model tensors), for the teacher,
the judge/rephraser and the training recipe. See :func:`build_aya_vision`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from babelsynth.train.weights import VLM_LAYOUT
from tinymodels.common import offline_env, seeded
from tinymodels.corpus import corpus_lines

# Library versions the output depends on (part of the build digest).
DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "safetensors")

# Cohere / Aya special tokens. Ids are assigned in this order, starting at 0.
AYA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<PAD>",
    "<UNK>",
    "<CLS>",
    "<SEP>",
    "<MASK_TOKEN>",
    "<BOS_TOKEN>",
    "<EOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_PATCH|>",
    "<|IMG_LINE_BREAK|>",
    "TILE",
    "TILE_GLOBAL",
    "<image>",
)

AYA_CONFIG: dict[str, Any] = {
    "seed": 0,
    "vocab_size": 2000,
    "image_size": 56,
    "patch_size": 14,
    "downsample_factor": 2,
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
    # Cohere2 derives head_dim = hidden_size / num_attention_heads = 64 / 2 = 32 (vLLM CPU attention: 32+).
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 256,
        "max_position_embeddings": 4096,
        "logit_scale": 1.0,
        "tie_word_embeddings": True,
        # 0.4 instead of 0.02: with 0.02 the next-token distribution is ~uniform (entropy 7.50 of 7.51 nats),
        # so a fixed sampling seed gives the SAME text for every prompt/image and greedy emits EOS at once
        # (empty output). 0.4 gives entropy ~4 nats: prompt-dependent samples and non-empty, varied greedy
        # text.
        "initializer_range": 0.4,
    },
}

COMET_CONFIG: dict[str, Any] = {
    "seed": 0,
    "spm_vocab_size": 1500,
    "encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "hidden_sizes": [64, 32],
}

# Cohere-style chat templates. The VLM one renders image / image_url content parts as "<image>", which the
# AyaVision processor expands into <|START_OF_IMG|>TILE_GLOBAL<|IMG_PATCH|>x4<|END_OF_IMG|>.
_TURN_PREFIX = (
    "{{ '<|START_OF_TURN_TOKEN|>' }}"
    "{% if message['role'] == 'user' %}{{ '<|USER_TOKEN|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|CHATBOT_TOKEN|>' }}"
    "{% else %}{{ '<|SYSTEM_TOKEN|>' }}{% endif %}"
)
VLM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + _TURN_PREFIX
    + "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url', 'image_pil'] %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)
LLM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + _TURN_PREFIX
    + "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)


def _train_aya_tokenizer(vocab_size: int, scratch: Path):
    """BPE (sentencepiece-style Metaspace, no byte fallback) trained on the corpus, Cohere special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<UNK>"))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    ascii_alphabet = [chr(c) for c in range(33, 127)] + ["\n", "\t", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(AYA_SPECIAL_TOKENS),
        initial_alphabet=ascii_alphabet,
        min_frequency=2,
        show_progress=False,
    )
    lines = [s for sents in corpus_lines().values() for s in sents]
    tk.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>",
        unk_token="<UNK>",
        pad_token="<PAD>",
        cls_token="<CLS>",
        sep_token="<SEP>",
        mask_token="<MASK_TOKEN>",
        additional_special_tokens=[
            t
            for t in AYA_SPECIAL_TOKENS
            if t not in ("<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>")
        ],
        padding_side="left",
        model_max_length=AYA_CONFIG["text"]["max_position_embeddings"],
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: generate() would reject them
        clean_up_tokenization_spaces=False,
    )
    for i, t in enumerate(AYA_SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.convert_tokens_to_ids(t)}, expected {i}")
    return tok


def build_aya_vision(out_dir: Path) -> tuple[Path, Path]:
    """Build a tiny random AyaVision VLM and its text-only twin; return ``(out_dir/"vlm", out_dir/"llm")``.

    VLM (``AyaVisionForConditionalGeneration``): SigLIP vision tower (56 px, patch 14, hidden 64, 2 layers,
    no head), pixel-shuffle (downsample 2) SwiGLU projector, Cohere2 text model (hidden 64, 2 layers, 2 heads,
    1 KV head, head_dim 32, sliding+full layers, ``logit_scale=1.0`` so HF and vLLM logits agree), processor =
    ``AyaVisionProcessor(GotOcr2ImageProcessor 56x56, crop_to_patches=False, max_patches=1)``: one image
    becomes ``<|START_OF_IMG|>TILE_GLOBAL`` + 4 x ``<|IMG_PATCH|>`` + ``<|END_OF_IMG|>``. The chat template
    renders content given as a plain string or as a list of ``text`` / ``image`` / ``image_url`` parts.

    LLM (``Cohere2ForCausalLM``): exactly the VLM's language model + lm_head (same tensors), same tokenizer,
    text-only chat template (string content or ``text`` parts). Both dirs are saved as safetensors.

    The LLM's tensor names come from ``babelsynth.train.weights`` (the mapping the merge uses), applied to
    the VLM's in-memory ``state_dict()`` names (``VLM_LAYOUT``: ``model.language_model.<X>`` <->
    ``model.<X>``, ``lm_head.weight`` <-> ``lm_head.weight``; vision tower and projector have no text
    counterpart).
    Embeddings are TIED in both models: ``lm_head.weight`` is the input embedding tensor, and safetensors
    stores it once, under the embedding name, so a merge over the mapped names keeps the tie. transformers
    4.57 writes the VLM file in the legacy layout (``language_model.model.<X>``, ``vision_tower.*``,
    ``multi_modal_projector.*``) and converts back on load.
    """
    offline_env()
    import torch
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        Cohere2Config,
        Cohere2ForCausalLM,
        GenerationConfig,
        GotOcr2ImageProcessor,
        SiglipVisionConfig,
    )

    cfg = AYA_CONFIG
    out_dir = Path(out_dir)
    scratch = out_dir / "_build"
    scratch.mkdir(parents=True, exist_ok=True)

    tok = _train_aya_tokenizer(cfg["vocab_size"], scratch)
    ids = {t: tok.convert_tokens_to_ids(t) for t in AYA_SPECIAL_TOKENS}
    token_ids = {
        "pad_token_id": ids["<PAD>"],
        "bos_token_id": ids["<BOS_TOKEN>"],
        "eos_token_id": ids["<|END_OF_TURN_TOKEN|>"],
    }

    text_cfg = Cohere2Config(vocab_size=len(tok), **cfg["text"], **token_ids)
    vision_cfg = SiglipVisionConfig(
        **cfg["vision"], image_size=cfg["image_size"], patch_size=cfg["patch_size"], vision_use_head=False
    )
    vlm_cfg = AyaVisionConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg.to_dict(),
        downsample_factor=cfg["downsample_factor"],
        image_token_index=ids["<|IMG_PATCH|>"],
        tie_word_embeddings=cfg["text"]["tie_word_embeddings"],
        **token_ids,
    )
    with seeded(cfg["seed"]):
        vlm = AyaVisionForConditionalGeneration(vlm_cfg).eval()
    gen_cfg = GenerationConfig(**token_ids)

    image_processor = GotOcr2ImageProcessor(
        size={"height": cfg["image_size"], "width": cfg["image_size"]},
        crop_to_patches=False,
        min_patches=1,
        max_patches=1,
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=cfg["patch_size"],
        img_size=cfg["image_size"],
        downsample_factor=cfg["downsample_factor"],
        chat_template=VLM_CHAT_TEMPLATE,
    )
    tok.chat_template = VLM_CHAT_TEMPLATE

    vlm_dir = out_dir / "vlm"
    vlm.generation_config = gen_cfg
    vlm.save_pretrained(str(vlm_dir), safe_serialization=True)
    processor.save_pretrained(str(vlm_dir))
    tok.save_pretrained(str(vlm_dir))

    # Text twin: copy the language model + lm_head tensors under the mapped names.
    llm = Cohere2ForCausalLM(text_cfg).eval()
    vlm_sd = vlm.state_dict()
    mapped = {}
    for k, v in vlm_sd.items():
        new = VLM_LAYOUT.text_name(k)
        if new is not None:
            mapped[new] = v.detach().clone()
    missing, unexpected = llm.load_state_dict(mapped, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"VLM->LLM mapping mismatch: missing={missing} unexpected={unexpected}")
    llm.tie_weights()
    with torch.no_grad():
        for k, v in llm.state_dict().items():
            if not torch.equal(v, vlm_sd[VLM_LAYOUT.vlm_name(k)]):
                raise RuntimeError(f"LLM tensor {k} differs from the VLM")
    llm.generation_config = gen_cfg
    llm_dir = out_dir / "llm"
    llm.save_pretrained(str(llm_dir), safe_serialization=True)
    tok.chat_template = LLM_CHAT_TEMPLATE
    tok.save_pretrained(str(llm_dir))
    tok.chat_template = VLM_CHAT_TEMPLATE

    shutil.rmtree(scratch)
    _verify_aya(vlm_dir, llm_dir)
    return vlm_dir, llm_dir


def sample_image(seed: int = 0, size: int = 64):
    """A deterministic RGB test image (a colour gradient with a square), no files needed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    img.putdata(
        [
            ((x * 4 + seed * 40) % 256, (y * 4) % 256, (x * y + seed * 7) % 256)
            for y in range(size)
            for x in range(size)
        ]
    )
    ImageDraw.Draw(img).rectangle([size // 4, size // 4, size // 2, size // 2], fill=(200, 30, 30))
    return img


def _verify_aya(vlm_dir: Path, llm_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    proc = AutoProcessor.from_pretrained(str(vlm_dir), use_fast=False)
    vlm = AutoModelForImageTextToText.from_pretrained(str(vlm_dir)).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[sample_image()], text=[prompt], return_tensors="pt")
    n_img = int((inputs["input_ids"] == vlm.config.image_token_index).sum())
    if n_img != 4:
        raise RuntimeError(f"expected 4 image patch tokens, got {n_img}")
    with torch.no_grad():
        vlm_logits = vlm(**inputs).logits[0, -1]
    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir)).eval()
    text_ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello there."}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        a = llm(input_ids=text_ids).logits[0, -1]
        b = vlm(input_ids=text_ids).logits[0, -1]
    if not torch.allclose(a, b, atol=1e-5) or not torch.isfinite(vlm_logits).all():
        raise RuntimeError("text LLM and VLM disagree on a text-only prompt")
