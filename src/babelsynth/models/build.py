"""Build the tiny, random, fully offline models that tests and the demo run on.

Nothing here touches a network or a model hub: every tokenizer is trained on the small hand-written
corpus in ``corpus/<code>.txt`` and every weight is drawn from a seeded RNG. Same inputs and same library
versions give byte-identical files.

Builders (each writes into ``out_dir`` and verifies its own output):

* :func:`build_nllb` -- tiny NLLB-200 (M2M100) + NLLB BPE sentencepiece carrying all FLORES-200 codes,
  saved as HF (``out_dir/hf``) and converted to CTranslate2 int8 (``out_dir/ct2``, returned). The ct2 dir also
  holds ``sentencepiece.bpe.model`` and the tokenizer files, so translation needs only ``ctranslate2`` +
  ``sentencepiece``::

      source = ["eng_Latn"] + sp.encode(text, out_type=str) + ["</s>"]
      hyp = translator.translate_batch([source], target_prefix=[["fra_Latn"]])[0].hypotheses[0]
      text = sp.decode(hyp[1:])                      # drop the forced target-language token

* :func:`build_aya_vision` -- tiny AyaVision VLM (``out_dir/vlm``) and its text-only twin LLM
(``out_dir/llm``);
  see that function for the parameter-name mapping between them.
* :func:`build_comet` -- tiny CometKiwi-style reference-free ``UnifiedMetric``
(``input_segments=["mt","src"]``).
* :func:`build_all` -- all of the above under one root, cached by a stamp (config + source hash), built into a
  temporary directory and renamed into place, serialised by a file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_CODES: tuple[str, ...] = (SOURCE_LANG, *AYA_TARGETS)
STAMP_FILE = ".babelsynth-stamp.json"
LOCK_FILE = ".build.lock"

# Counts real (non-cached) builds per model name in this process; tests use it to observe cache hits.
BUILD_COUNTER: Counter[str] = Counter()

NLLB_CONFIG: dict[str, Any] = {
    "seed": 0,
    "spm_vocab_size": 2000,
    "model": {
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "max_position_embeddings": 1024,
        "activation_function": "relu",
        "scale_embedding": True,
        "tie_word_embeddings": True,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "init_std": 0.2,
    },
    "quantization": "int8",
}

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
    # Cohere2 derives head_dim = hidden_size / num_attention_heads: 64 / 2 = 32 (vLLM CPU attention needs
    # 32+).
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
        # so a
        # fixed sampling seed gives the SAME text for every prompt/image and greedy emits EOS at once (empty
        # output). 0.4 gives entropy ~4 nats: prompt-dependent samples and non-empty, varied greedy text.
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

# VLM module/state_dict name  <->  text LLM name (see build_aya_vision docstring).
VLM_TEXT_PREFIX = "model.language_model."
LLM_TEXT_PREFIX = "model."


# ------------------------------------------------------------------------------------------------------------
# corpus


def corpus_lines(codes: tuple[str, ...] | list[str] = CORPUS_CODES) -> dict[str, list[str]]:
    """The hand-written corpus: {code: [sentence, ...]} (about a dozen everyday sentences per language)."""
    out: dict[str, list[str]] = {}
    for code in codes:
        path = CORPUS_DIR / f"{code}.txt"
        out[code] = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return out


def _train_spm(model_file: Path, *, model_type: str, vocab_size: int) -> Path:
    """Train a fairseq-style sentencepiece (unk=0 bos=1 eos=2, no pad) on the corpus.

    Trained from an iterator into memory, so no file path ends up inside the model proto (byte-stable builds).
    """
    import io

    import sentencepiece as spm

    lines = [s for sents in corpus_lines().values() for s in sents]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(buf.getvalue())
    return model_file


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------------------
# NLLB + CTranslate2


def build_nllb(out_dir: Path) -> Path:
    """Build the tiny random NLLB-200 model; return the CTranslate2 (int8) directory ``out_dir/"ct2"``.

    Layout: ``out_dir/hf`` (transformers M2M100ForConditionalGeneration + NllbTokenizerFast, safetensors),
    ``out_dir/ct2`` (model.bin int8 + config.json + shared_vocabulary.json + sentencepiece.bpe.model +
    tokenizer.json / tokenizer_config.json / special_tokens_map.json). The tokenizer carries every FLORES-200
    code as a special token; the source convention is ``[src_lang] + pieces + ["</s>"]`` and the target is
    forced with ``target_prefix=[[tgt_lang]]`` (CT2 adds the ``</s>`` decoder start itself).
    """
    _offline_env()
    import transformers
    from ctranslate2.converters import TransformersConverter
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    cfg = NLLB_CONFIG
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / "_build"
    (scratch / "spm").mkdir(parents=True, exist_ok=True)

    # (a) NLLB-style BPE sentencepiece: unk=0 bos=1 eos=2, no pad.
    spm_file = _train_spm(
        scratch / "spm" / "sentencepiece.bpe.model", model_type="bpe", vocab_size=cfg["spm_vocab_size"]
    )

    # (b) fairseq id layout + <mask> + all FLORES-200 codes as special tokens.
    if transformers.__version__.startswith("4."):
        from transformers import NllbTokenizerFast

        NllbTokenizer(vocab_file=str(spm_file), src_lang=SOURCE_LANG).save_pretrained(
            str(scratch / "tok_slow")
        )
        tok = NllbTokenizerFast.from_pretrained(str(scratch / "tok_slow"), src_lang=SOURCE_LANG)
    else:  # transformers 5.x: codes must be passed explicitly or they all map to <unk>
        from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

        tok = NllbTokenizer.from_pretrained(
            str(scratch / "spm"), src_lang=SOURCE_LANG, extra_special_tokens=FAIRSEQ_LANGUAGE_CODES
        )
    for code in CORPUS_CODES:
        if tok.convert_tokens_to_ids(code) == tok.unk_token_id:
            raise RuntimeError(f"NLLB tokenizer lost language code {code}")

    # (c) tiny random M2M100 with the NLLB flavour of config.
    with _seeded(cfg["seed"]):
        model = M2M100ForConditionalGeneration(M2M100Config(vocab_size=len(tok), **cfg["model"])).eval()
    hf_dir = out_dir / "hf"
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    tok.save_pretrained(str(hf_dir))
    if not (hf_dir / "sentencepiece.bpe.model").exists():
        shutil.copy2(spm_file, hf_dir / "sentencepiece.bpe.model")

    # (d) CTranslate2 conversion + tokenizer files for a torch-free runtime.
    ct2_dir = out_dir / "ct2"
    copy = [
        f
        for f in (
            "sentencepiece.bpe.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        )
        if (hf_dir / f).exists()
    ]
    TransformersConverter(str(hf_dir), copy_files=copy).convert(
        str(ct2_dir), quantization=cfg["quantization"], force=True
    )
    (ct2_dir / "babelsynth_nllb.json").write_text(
        json.dumps(
            {
                "source_lang": SOURCE_LANG,
                "source_format": "[src_lang] + pieces + ['</s>']",
                "target_prefix": "[[tgt_lang]]",
                "spm": "sentencepiece.bpe.model",
                "compute_type": cfg["quantization"],
            },
            indent=1,
        )
    )
    shutil.rmtree(scratch)
    _verify_nllb(ct2_dir)
    return ct2_dir


def _verify_nllb(ct2_dir: Path) -> None:
    import ctranslate2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ct2_dir / "sentencepiece.bpe.model"))
    tr = ctranslate2.Translator(
        str(ct2_dir), device="cpu", compute_type="int8", inter_threads=1, intra_threads=1
    )
    text = corpus_lines([SOURCE_LANG])[SOURCE_LANG][0]
    src = [SOURCE_LANG] + sp.encode(text, out_type=str) + ["</s>"]
    res = tr.translate_batch(
        [src] * len(AYA_TARGETS),
        target_prefix=[[c] for c in AYA_TARGETS],
        beam_size=1,
        max_decoding_length=24,
    )
    for code, r in zip(AYA_TARGETS, res, strict=True):
        hyp = r.hypotheses[0]
        if hyp[0] != code or not sp.decode(hyp[1:]).strip():
            raise RuntimeError(f"tiny NLLB produced no text for {code}: {hyp}")


# ------------------------------------------------------------------------------------------------------------
# Aya Vision (VLM) + matching text-only Cohere2 LLM


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


def vlm_to_llm_name(name: str) -> str | None:
    """Map a VLM state_dict key to the text LLM key (None for vision tower / projector weights)."""
    if name.startswith(VLM_TEXT_PREFIX):
        return LLM_TEXT_PREFIX + name[len(VLM_TEXT_PREFIX) :]
    if name == "lm_head.weight":
        return name
    return None


def llm_to_vlm_name(name: str) -> str:
    """Map a text LLM state_dict key to the VLM key."""
    if name == "lm_head.weight":
        return name
    if not name.startswith(LLM_TEXT_PREFIX):
        raise KeyError(f"not a Cohere2ForCausalLM parameter name: {name}")
    return VLM_TEXT_PREFIX + name[len(LLM_TEXT_PREFIX) :]


def build_aya_vision(out_dir: Path) -> tuple[Path, Path]:
    """Build a tiny random AyaVision VLM and its text-only twin; return ``(out_dir/"vlm", out_dir/"llm")``.

    VLM (``AyaVisionForConditionalGeneration``): SigLIP vision tower (56 px, patch 14, hidden 64, 2 layers,
    no head), pixel-shuffle (downsample 2) SwiGLU projector, Cohere2 text model (hidden 64, 2 layers, 2 heads,
    1 KV head, head_dim 32, sliding+full layers, ``logit_scale=1.0`` so HF and vLLM logits agree), processor =
    ``AyaVisionProcessor(GotOcr2ImageProcessor 56x56, crop_to_patches=False, max_patches=1)``: one image
    becomes
    ``<|START_OF_IMG|>TILE_GLOBAL`` + 4 x ``<|IMG_PATCH|>`` + ``<|END_OF_IMG|>``. The chat template renders
    content given as a plain string or as a list of ``text`` / ``image`` / ``image_url`` parts.

    LLM (``Cohere2ForCausalLM``): exactly the VLM's language model + lm_head (same tensors), same tokenizer,
    text-only chat template (string content or ``text`` parts). Both dirs are saved as safetensors.

    Parameter-name mapping (the in-memory ``state_dict()`` names of transformers 4.57 / 5.x)::

        VLM  model.language_model.<X>   <->  LLM  model.<X>      e.g.
        model.language_model.layers.0.mlp.up_proj.weight
        VLM  lm_head.weight             <->  LLM  lm_head.weight
        VLM  model.vision_tower.* , model.multi_modal_projector.*  -> no text counterpart (keep from the VLM)

    See :func:`vlm_to_llm_name` / :func:`llm_to_vlm_name`. Embeddings are TIED in both models
    (``tie_word_embeddings=True``): ``lm_head.weight`` is the same tensor as the input embeddings
    (``model.language_model.embed_tokens.weight`` / ``model.embed_tokens.weight``), and safetensors stores it
    once, under the embedding name. A merge ``W = a*W_vlm + (1-a)*W_text`` over the mapped names therefore
    keeps
    the tie; load with ``from_pretrained`` and operate on ``state_dict()`` rather than on raw file keys.
    Note: transformers 4.57 writes the VLM file with its legacy key layout (``language_model.model.<X>``,
    ``vision_tower.*``, ``multi_modal_projector.*``) and converts back on load.
    """
    _offline_env()
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
    with _seeded(cfg["seed"]):
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
        new = vlm_to_llm_name(k)
        if new is not None:
            mapped[new] = v.detach().clone()
    missing, unexpected = llm.load_state_dict(mapped, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"VLM->LLM mapping mismatch: missing={missing} unexpected={unexpected}")
    llm.tie_weights()
    with torch.no_grad():
        for k, v in llm.state_dict().items():
            if not torch.equal(v, vlm_sd[llm_to_vlm_name(k)]):
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


# ------------------------------------------------------------------------------------------------------------
# COMET (CometKiwi-style, reference-free)


def build_comet(out_dir: Path, *, final_dir: Path | None = None) -> Path:
    """Build a tiny CometKiwi-style ``UnifiedMetric``; return
    ``out_dir/"cometkiwi"/"checkpoints"/"model.ckpt"``.

    Layout: ``out_dir/encoder`` (XLM-R config + tokenizer trained on the corpus; COMET builds the encoder from
    config.json, no weights are looked up) and ``out_dir/cometkiwi/{hparams.yaml,checkpoints/model.ckpt}``,
    the
    hub layout, so ``comet.load_from_checkpoint(ckpt)`` works offline; score with
    ``model.predict([{"src": ..., "mt": ...}], gpus=0, progress_bar=False)``.

    The encoder path stored in the hparams is ABSOLUTE. ``final_dir`` is where ``out_dir`` will live once
    moved
    (``build_all`` builds in a temp dir and renames); the stored path points there. If the model is moved
    elsewhere, load it with ``UnifiedMetric.load_from_checkpoint(ckpt, pretrained_model=<new encoder dir>,
    load_pretrained_weights=False)`` or rebuild.
    """
    _offline_env()
    import torch
    import yaml

    cfg = COMET_CONFIG
    out_dir = Path(out_dir).resolve()
    final = Path(final_dir).resolve() if final_dir is not None else out_dir
    scratch = out_dir / "_build"
    scratch.mkdir(parents=True, exist_ok=True)
    enc_dir = out_dir / "encoder"
    enc_final = final / "encoder"

    from transformers import XLMRobertaConfig, XLMRobertaTokenizer, XLMRobertaTokenizerFast

    spm_file = _train_spm(scratch / "xlmr_spm.model", model_type="unigram", vocab_size=cfg["spm_vocab_size"])
    XLMRobertaTokenizer(vocab_file=str(spm_file)).save_pretrained(str(enc_dir))
    tok = XLMRobertaTokenizerFast.from_pretrained(str(enc_dir))
    tok.save_pretrained(str(enc_dir))  # writes tokenizer.json, which COMET loads
    XLMRobertaConfig(
        vocab_size=len(tok),
        max_position_embeddings=514,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **cfg["encoder"],
    ).save_pretrained(str(enc_dir))

    import logging

    from comet.models import UnifiedMetric

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import pytorch_lightning as ptl

    with _seeded(cfg["seed"]):
        model = UnifiedMetric(
            encoder_model="XLM-RoBERTa",
            pretrained_model=str(enc_dir),
            hidden_sizes=cfg["hidden_sizes"],
            activations="Tanh",
            layer_transformation="sparsemax",
            batch_size=16,
            load_pretrained_weights=False,
            local_files_only=True,
            sent_layer="mix",
            word_layer=2,
            input_segments=["mt", "src"],
            word_level_training=False,
            final_activation="Sigmoid",
        )
    model_dir = out_dir / "cometkiwi"
    (model_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    hp = dict(model.hparams)
    hp.pop("load_pretrained_weights", None)
    hp.pop("local_files_only", None)
    hp["pretrained_model"] = str(enc_final)
    (model_dir / "hparams.yaml").write_text(yaml.safe_dump(hp), encoding="utf-8")
    ckpt = model_dir / "checkpoints" / "model.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hp,
            "pytorch-lightning_version": ptl.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        ckpt,
    )
    shutil.rmtree(scratch)
    _verify_comet(ckpt, None if final == out_dir else enc_dir)
    return ckpt


def _verify_comet(ckpt: Path, encoder_override: Path | None) -> None:
    import logging
    import math

    import comet
    from comet.models import UnifiedMetric

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if encoder_override is None:
        m = comet.load_from_checkpoint(str(ckpt), local_files_only=True)
    else:
        m = UnifiedMetric.load_from_checkpoint(
            str(ckpt), pretrained_model=str(encoder_override), load_pretrained_weights=False, strict=False
        )
    sents = corpus_lines([SOURCE_LANG, "fra_Latn"])
    data = [{"src": s, "mt": t} for s, t in zip(sents[SOURCE_LANG][:2], sents["fra_Latn"][:2], strict=True)]
    out = m.predict(data, batch_size=8, gpus=0, progress_bar=False)
    if len(out.scores) != 2 or not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in out.scores):
        raise RuntimeError(f"tiny CometKiwi gave bad scores: {out.scores}")


# ------------------------------------------------------------------------------------------------------------
# cached build of everything


def _versions() -> dict[str, str]:
    out = {}
    for dist in (
        "torch",
        "transformers",
        "tokenizers",
        "sentencepiece",
        "ctranslate2",
        "unbabel-comet",
        "safetensors",
        "pytorch-lightning",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _corpus_digest() -> str:
    h = hashlib.sha256()
    for code in CORPUS_CODES:
        h.update(code.encode() + b"\0" + (CORPUS_DIR / f"{code}.txt").read_bytes() + b"\0")
    return h.hexdigest()


def _source_digest() -> str:
    return hashlib.sha256(Path(inspect.getfile(_source_digest)).read_bytes()).hexdigest()


def _spec_hash(name: str, config: dict[str, Any], final_dir: Path) -> str:
    spec = {
        "name": name,
        "config": config,
        "source": _source_digest(),
        "corpus": _corpus_digest(),
        "versions": _versions(),
        # COMET stores an absolute encoder path, so the location is part of the identity.
        "location": str(final_dir.resolve()),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def read_stamp(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_cached(
    root: Path, name: str, config: dict[str, Any], builder: Callable[[Path, Path], Any], force: bool = False
) -> Path:
    final = root / name
    digest = _spec_hash(name, config, final)
    stamp = read_stamp(final)
    if not force and final.is_dir() and stamp is not None and stamp.get("hash") == digest:
        return final
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        builder(tmp, final)
        (tmp / STAMP_FILE).write_text(
            json.dumps({"name": name, "hash": digest, "versions": _versions()}, indent=1, sort_keys=True)
        )
        old = None
        if final.exists():
            old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    BUILD_COUNTER[name] += 1
    return final


def build_all(root: Path, *, force: bool = False) -> dict[str, str]:
    """Build (or reuse) every tiny model under ``root``; return absolute paths.

    Keys: ``nllb_ct2`` (CTranslate2 dir, ``root/nllb/ct2``), ``vlm`` (``root/aya_vision/vlm``), ``llm``
    (``root/aya_vision/llm``), ``comet`` (``root/comet/cometkiwi/checkpoints/model.ckpt``).

    Each of ``root/{nllb,aya_vision,comet}`` carries a stamp file (``.babelsynth-stamp.json``) with a hash of
    the
    builder config, this module's source, the corpus, the library versions and the location; a directory is
    rebuilt only when missing or when the hash differs (or ``force``). Builds happen in ``root/.<name>.tmp-*``
    and
    are renamed into place only after verification, so a crash never leaves a valid-looking half model. A file
    lock (``root/.build.lock``) serialises concurrent callers (e.g. pytest-xdist workers).
    """
    root = Path(root).resolve()
    with _locked(root):
        for stale in root.glob(".*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(".*.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        nllb = _build_cached(root, "nllb", NLLB_CONFIG, lambda tmp, fin: build_nllb(tmp), force)
        aya = _build_cached(root, "aya_vision", AYA_CONFIG, lambda tmp, fin: build_aya_vision(tmp), force)
        comet = _build_cached(
            root, "comet", COMET_CONFIG, lambda tmp, fin: build_comet(tmp, final_dir=fin), force
        )
    return {
        "nllb_ct2": str(nllb / "ct2"),
        "vlm": str(aya / "vlm"),
        "llm": str(aya / "llm"),
        "comet": str(comet / "cometkiwi" / "checkpoints" / "model.ckpt"),
    }
