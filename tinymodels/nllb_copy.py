"""A tiny NLLB-200 (M2M100) that COPIES its input and stops: the end-to-end oracle for the translate stage.

With a translator whose output is its input, every draft must equal its English source byte for byte, whatever
segmentation, protected spans, batching, chunking and reassembly do on the way (tests/test_production.py).

Built by construction, not trained: a trained copier took more than 20 minutes of this 2-core box for inputs
of 128 tokens and still missed some, while these weights copy every input up to the position limit exactly,
in a second, deterministically. The mechanism, in the real architecture and through the real converter:

* token embeddings live in the dims of the slowest sinusoids (`token_dims`), positions are read from the
  fastest ones (`position_dims`), which token embeddings leave at zero;
* every layer's residual branches are zero except the decoder's cross-attention, whose query and key are the
  positional dims (the constant dim `CONST_DIM` cancels LayerNorm's mean shift), so decoder position t
  attends to encoder position t: `[src, x1..xn, </s>]` against `[</s>, tgt, x1..xn]`; the value carries the
  token, scaled to outweigh the decoder's own input token in the tied output projection.

Layout: ``hf/`` (transformers M2M100 + NLLB tokenizer with every FLORES-200 code) and two CTranslate2 dirs
written by the real converter, ``ct2-transformers-converter --quantization int8``: ``ct2/`` with
``--copy_files sentencepiece.bpe.model`` and ``ct2-tokenizer-json/`` with ``--copy_files tokenizer.json``
(as ready-made conversions ship). The sentencepiece model uses identity normalization so that what goes in
comes out (real NLLB normalizes, e.g. runs of spaces); its vocabulary covers the corpus and `COVERAGE`.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG
from tinymodels.common import offline_env
from tinymodels.corpus import CORPUS_CODES, corpus_lines

DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "sentencepiece", "ctranslate2", "safetensors")

# Characters the hostile test texts use beyond the corpus (emoji, math, symbols, typographic punctuation,
# Hebrew and Arabic letters are in the corpus): each must be a piece of its own, never <unk>.
COVERAGE = (
    "😀 🎉 👍 ❤️ ✅ 🚀 😂 🙏 🌍 🔥 ⭐ 📈 ✨ 👋 🤖 "
    "∫ ∑ √ π ≤ ≥ ≠ ± × ÷ ° ∞ ≈ → ← ∈ ∀ ∂ ∆ α β γ λ μ σ θ Ω € £ ¥ © ® ™ "
    "… — – « » „ “ ” ‘ ’ • · ¿ ¡ § ¶ † ‡ ‰ ′ ″ ½ ¼ ¾ ² ³ ¹ ‐ ‑ ٪ ، ؛ ؟ ־ ׳ ״ 0123456789 "
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
)

NLLB_COPY_CONFIG: dict[str, Any] = {
    "spm_vocab_size": 2000,
    "d_model": 128,
    "position_pairs": 40,  # sin/cos pairs of the fastest frequencies that carry the position
    "token_norm": 8.0,  # |embedding|: large against the positional leak into the token dims
    "query_gain": 25.0,  # attention sharpness, in units of LayerNorm's scale
    "copy_gain": 6.0,  # cross-attention output over the decoder's own input token
    "seed": 0,
    "quantization": "int8",
}
CONST_DIM_FROM_END = 1  # cos of the slowest frequency: ~1 at every position (cos(1e-4 t))


def train_copy_spm(model_file: Path, vocab_size: int) -> Path:
    """NLLB-style BPE sentencepiece (unk=0 bos=1 eos=2, no pad), identity normalization, corpus + coverage."""
    import sentencepiece as spm

    lines = [s for sents in corpus_lines(CORPUS_CODES).values() for s in sents] + [COVERAGE]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
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


def dims(d_model: int, pairs: int) -> tuple[list[int], list[int], int]:
    """(position dims, token dims, constant dim) in M2M100's sinusoid layout [sin(w_i t) | cos(w_i t)]."""
    half = d_model // 2
    const = d_model - CONST_DIM_FROM_END
    pos = [*range(pairs), *range(half, half + pairs)]
    tok = [i for i in range(d_model) if i not in pos and i != const]
    return pos, tok, const


def copy_weights(model, cfg: dict[str, Any] = NLLB_COPY_CONFIG) -> None:
    """Set every weight of an M2M100 (1+1 layers, 1 head) so that it copies its source (module docstring)."""
    import torch

    d = model.config.d_model
    pos, tok, const = dims(d, cfg["position_pairs"])
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(cfg["seed"])
    emb = torch.zeros(vocab, d)
    rows = torch.randn(vocab, len(tok), generator=g)
    rows -= rows.mean(1, keepdim=True)  # zero mean: LayerNorm's mean comes from the positions alone
    emb[:, tok] = rows / rows.norm(dim=1, keepdim=True) * cfg["token_norm"]
    emb[model.config.pad_token_id] = 0.0
    scale = math.sqrt(d) if model.config.scale_embedding else 1.0
    # LayerNorm's std: the token part dominates (every token has the same norm), the positions add d/2.
    sigma = math.sqrt((scale**2 * cfg["token_norm"] ** 2 + d / 2) / d)
    # CTranslate2's int8 also quantizes activations per row: wherever attention reads positions, LayerNorm's
    # gain shrinks the token dims to the positions' magnitude, so the positions keep their precision.
    token_gain = math.sqrt(len(tok)) / (math.sqrt(2) * scale * cfg["token_norm"])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)):
            ln.weight.fill_(1.0)
        for ln in (model.model.encoder.layer_norm, model.model.decoder.layers[0].encoder_attn_layer_norm):
            ln.weight[tok] = token_gain
        model.model.shared.weight.copy_(emb)
        cross = model.model.decoder.layers[0].encoder_attn
        w = torch.zeros(d, d)  # positional dims minus the constant dim: LayerNorm's mean shift cancels
        bias = torch.zeros(d)
        for i in pos:
            w[i, i], w[i, const] = 1.0, -1.0
            bias[i] = 1.0 / sigma
        gain = cfg["query_gain"] * sigma**2 * math.sqrt(d)  # the attention scales q by d**-0.5
        cross.q_proj.weight.copy_(gain * w)
        cross.q_proj.bias.copy_(gain * bias)
        cross.k_proj.weight.copy_(w)
        cross.k_proj.bias.copy_(bias)
        carry = torch.zeros(d, d)
        for i in tok:
            carry[i, i] = 1.0
        cross.v_proj.weight.copy_(carry)
        cross.out_proj.weight.copy_(cfg["copy_gain"] * sigma / token_gain * carry)
    model.tie_weights()


def convert(hf_dir: Path, out_dir: Path, quantization: str, copy_files: list[str]) -> Path:
    """What `ct2-transformers-converter --model HF --output_dir OUT --quantization Q --copy_files F...` runs
    (the CLI's main() builds this converter from its arguments), without a second interpreter."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir), copy_files=copy_files).convert(str(out_dir), quantization=quantization)
    return out_dir


def build_nllb_copy(out_dir: Path) -> Path:
    """Build the copying NLLB; return ``out_dir/"ct2"`` (``ct2-tokenizer-json`` beside it)."""
    offline_env()
    import transformers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    cfg = NLLB_COPY_CONFIG
    out_dir = Path(out_dir)
    scratch = out_dir / "_build"
    spm_file = train_copy_spm(scratch / "spm" / "sentencepiece.bpe.model", cfg["spm_vocab_size"])
    if transformers.__version__.startswith("4."):
        from transformers import NllbTokenizerFast

        NllbTokenizer(vocab_file=str(spm_file), src_lang=SOURCE_LANG).save_pretrained(str(scratch / "slow"))
        tok = NllbTokenizerFast.from_pretrained(str(scratch / "slow"), src_lang=SOURCE_LANG)
    else:  # transformers 5.x: codes must be passed explicitly or they all map to <unk>
        from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

        tok = NllbTokenizer.from_pretrained(
            str(spm_file.parent), src_lang=SOURCE_LANG, extra_special_tokens=FAIRSEQ_LANGUAGE_CODES
        )
    for code in CORPUS_CODES:
        if tok.convert_tokens_to_ids(code) == tok.unk_token_id:
            raise RuntimeError(f"NLLB tokenizer lost language code {code}")
    mcfg = M2M100Config(
        vocab_size=len(tok),
        d_model=cfg["d_model"],
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=1,
        decoder_attention_heads=1,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=1024,
        activation_function="relu",
        scale_embedding=True,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    model = M2M100ForConditionalGeneration(mcfg).eval()
    copy_weights(model, cfg)
    hf_dir = out_dir / "hf"
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    tok.save_pretrained(str(hf_dir))
    if not (hf_dir / "sentencepiece.bpe.model").exists():
        shutil.copy2(spm_file, hf_dir / "sentencepiece.bpe.model")
    ct2 = convert(hf_dir, out_dir / "ct2", cfg["quantization"], ["sentencepiece.bpe.model"])
    convert(hf_dir, out_dir / "ct2-tokenizer-json", cfg["quantization"], ["tokenizer.json"])
    shutil.rmtree(scratch)
    verify_copy(ct2)
    return ct2


def verify_copy(ct2_dir: Path) -> None:
    """Every corpus sentence and the coverage line, in every target, batched and alone, come back verbatim."""
    import ctranslate2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ct2_dir / "sentencepiece.bpe.model"))
    tr = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="int8", inter_threads=1)
    texts = [s for sents in corpus_lines(CORPUS_CODES).values() for s in sents] + [COVERAGE, COVERAGE * 3]
    jobs = [(t, AYA_TARGETS[i % len(AYA_TARGETS)]) for i, t in enumerate(texts)]
    src = [[SOURCE_LANG, *sp.encode(t, out_type=str), "</s>"] for t, _ in jobs]
    if "<unk>" in {p for s in src for p in s} or any(sp.piece_to_id(p) == 0 for s in src for p in s[1:-1]):
        raise RuntimeError("the copy NLLB's vocabulary misses a character of its own verification text")
    res = tr.translate_batch(
        src,
        target_prefix=[[lang] for _, lang in jobs],
        beam_size=4,
        max_batch_size=2048,
        batch_type="tokens",
        max_decoding_length=1000,  # the long text is ~650 tokens: far beyond any chunk the translator sends
    )
    for (text, lang), r in zip(jobs, res, strict=True):
        hyp = r.hypotheses[0]
        if hyp[0] != lang or sp.decode(hyp[1:]) != text:
            raise RuntimeError(
                f"the copy NLLB did not copy into {lang}: {text[:60]!r} -> {sp.decode(hyp[1:])[:60]!r}"
            )
