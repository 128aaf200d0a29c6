"""A tiny Aya Vision trained to echo, and its text twin: the teacher, judge and rephraser of the production
rehearsal (tests/test_production.py), which need models that answer in the expected shape.

Trained on CPU for a fixed number of steps on the released prompts (prompts/) rendered with random contents:

* recaption (every task type, one image): ``<answer>`` + the ground truth + ``</answer>``;
* rephrase: ``<translation>`` + the draft + ``</translation>``;
* judge: a one-sentence explanation, then ``YES`` to the decision turn (the server constrains it to YES|NO).

The tokenizer is trained on the corpus, the prompt templates and `nllb_copy.COVERAGE`, so a template costs
few tokens and hostile text has no <unk>. The VLM is saved SHARDED (``model-0000k-of-0000N.safetensors`` +
``model.safetensors.index.json``, like the hub's Aya Vision checkpoints), so the loaders read the real layout.
Echo quality on held-out contents is measured at build time and stored in ``echo_eval.json``: the share of
answers in the expected shape (the build fails below `MIN_SHAPE`) and the share echoed exactly. Copying is
learned in a few minutes of CPU, so it is partial: the rehearsal never needs it exact (its oracle is the
translate stage), only answers that the stage-1 rules and the judge keep or reject with a reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG, language_name
from babelsynth.paths import prompts_dir
from babelsynth.prompts import all_prompt_files, load_prompt
from babelsynth.train.weights import VLM_LAYOUT
from tinymodels.aya import AYA_SPECIAL_TOKENS, LLM_CHAT_TEMPLATE, VLM_CHAT_TEMPLATE, sample_image
from tinymodels.common import offline_env, seeded
from tinymodels.corpus import CORPUS_CODES, corpus_lines
from tinymodels.nllb_copy import COVERAGE

DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "safetensors")

TASKS = (
    "captioning",
    "vqa",
    "ocr",
    "chart",
    "table",
    "reasoning",
    "textbook",
    "two_image_difference",
    "screenshot_code",
)
EXPLANATION = "The response agrees with the ground truth."
MIN_SHAPE = 0.9  # held-out share of answers in the expected tags below which the build fails

ECHO_FAMILIES = ("recaption", "rephrase", "judge")  # the prompt families the echo models are trained on

ECHO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "vocab_size": 2000,
    "image_size": 56,
    "patch_size": 14,
    "downsample_factor": 2,
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,  # head_dim 32: vLLM's CPU attention supports it
        "num_key_value_heads": 2,
        "layer_types": ["full_attention", "full_attention"],
        "sliding_window": 4096,
        "max_position_embeddings": 4096,
        "logit_scale": 1.0,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
    },
    "train": {
        "examples": 3000,
        "steps": 800,
        "batch": 8,
        "lr": 3e-3,
        "warmup": 50,
        "max_words": 16,
        "threads": 1,
    },
    "max_shard_size": "400KB",
    # the training data is the released prompts of the families it answers, rendered: a new version of one
    # of them retrains (RELEASED.json pins every file's hash); a prompt of another family (translate/) does
    # not, so the rehearsal's models stay the same when a stage it does not serve gets a prompt
    "prompts": hashlib.sha256(
        json.dumps(
            {
                k: v
                for k, v in json.loads((prompts_dir() / "RELEASED.json").read_text()).items()
                if k.split("/")[0] in ECHO_FAMILIES
            },
            sort_keys=True,
        ).encode()
    ).hexdigest(),
}


# ------------------------------------------------------------------------------------------------ data
@functools.cache
def _corpus() -> dict[str, list[str]]:
    return corpus_lines(CORPUS_CODES)


@functools.cache
def _words() -> list[str]:
    return sorted({w for s in _corpus()[SOURCE_LANG] for w in s.split()})


def _contents(rng: random.Random) -> str:
    """A random answer: sentences, lists, a table, code, a URL, RTL text, emoji; up to max_words words."""
    lines = _corpus()
    en = lines[SOURCE_LANG]
    words = _words()
    kind = rng.random()
    n = rng.randint(3, ECHO_CONFIG["train"]["max_words"])
    if kind < 0.35:  # random words: nothing to memorize, only to copy
        return " ".join(rng.choice(words) for _ in range(n))
    if kind < 0.5:
        return " ".join(rng.sample(en, rng.randint(1, 2)))
    if kind < 0.6:
        return "\n".join(
            f"- {' '.join(rng.choice(words) for _ in range(rng.randint(2, 6)))}" for _ in range(3)
        )
    if kind < 0.67:
        a, b = rng.sample(words, 2)
        return f"| {a} | {b} |\n|---|---|\n| {rng.randint(1, 99)} | {rng.randint(1, 99)} |"
    if kind < 0.74:
        return f"{rng.choice(en)}\n```python\nprint({rng.randint(1, 9)} + {rng.randint(1, 9)})\n```"
    if kind < 0.8:
        return f"{rng.choice(en)} See https://example.com/{rng.choice(words).lower().strip('.?,')} for more."
    if kind < 0.88:
        code = rng.choice(("heb_Hebr", "arb_Arab", "pes_Arab", "ell_Grek", "rus_Cyrl", "hin_Deva"))
        return rng.choice(lines[code])
    if kind < 0.95:
        emoji = COVERAGE.split()[:15]
        return f"{rng.choice(en)} {rng.choice(emoji)} {rng.choice(emoji)}"
    short = (
        f"A {rng.choice(('red', 'blue', 'green'))} circle on a white background.",
        str(rng.randint(1, 9)),
    )
    return rng.choice(short)


def _question(rng: random.Random) -> str:
    en = _corpus()[SOURCE_LANG]
    return rng.choice(
        (
            "Describe the image briefly.",
            "How many circles are in the image?",
            "What word is written in the image?",
            "Which bar in the chart is the tallest?",
            rng.choice(en),
        )
    )


def example(rng: random.Random) -> tuple[str, list[dict], str]:
    """(kind, messages, target) rendered from the released prompts; kind 'image' needs one image part."""
    r = rng.random()
    if r < 0.45:
        task, q, a = rng.choice(TASKS), _question(rng), _contents(rng)
        msgs = load_prompt("recaption", task).render(question=q, answer=a)
        msgs[1] = {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": msgs[1]["content"]}],
        }
        return "image", msgs, f"<answer>{a}</answer>"
    if r < 0.8:
        d = _contents(rng)
        lang = language_name(rng.choice(AYA_TARGETS))
        return (
            "text",
            load_prompt("rephrase", "translation").render(source=d, draft=d, language=lang),
            (f"<translation>{d}</translation>"),
        )
    p = load_prompt("judge", "hallucination")
    a = _contents(rng)
    msgs = p.render(question=_question(rng), answer_gt=a, response=a)
    if r < 0.9:
        return "text", msgs, EXPLANATION
    msgs = [
        *msgs,
        {"role": "assistant", "content": EXPLANATION},
        {"role": "user", "content": p.spec["decision"]},
    ]
    return "text", msgs, "YES"


def _tokenizer_lines() -> list[str]:
    lines = [s for sents in corpus_lines(CORPUS_CODES).values() for s in sents] + [COVERAGE]
    for rel in all_prompt_files():
        if rel.split("/")[0] in ECHO_FAMILIES:
            lines += (prompts_dir() / rel).read_text(encoding="utf-8").splitlines()
    return [x for x in lines if x.strip()]


def train_tokenizer(vocab_size: int):
    """BPE with sentencepiece-style Metaspace (no byte fallback), Cohere special tokens, ids as in aya.py."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<UNK>"))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted({c for line in _tokenizer_lines() for c in line} | {"\n", "\t", "▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(AYA_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    lines = _tokenizer_lines()
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
        model_max_length=ECHO_CONFIG["text"]["max_position_embeddings"],
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    return tok


# ------------------------------------------------------------------------------------------------ model
def _build(cfg: dict[str, Any], tok):
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        Cohere2Config,
        GotOcr2ImageProcessor,
        SiglipVisionConfig,
    )

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
        tie_word_embeddings=True,
        **token_ids,
    )
    with seeded(cfg["seed"]):
        vlm = AyaVisionForConditionalGeneration(vlm_cfg)
    processor = AyaVisionProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": cfg["image_size"], "width": cfg["image_size"]},
            crop_to_patches=False,
            min_patches=1,
            max_patches=1,
        ),
        tokenizer=tok,
        patch_size=cfg["patch_size"],
        img_size=cfg["image_size"],
        downsample_factor=cfg["downsample_factor"],
        chat_template=VLM_CHAT_TEMPLATE,
    )
    return vlm, processor, text_cfg, token_ids


def encode(
    processor, tok, items: list[tuple[str, list[dict], str]]
) -> list[tuple[list[int], list[int], bool]]:
    """(ids, labels, has_image) per example: the rendered prompt, then the target and the end-of-turn token,
    labelled; the prompt is not. Image prompts are expanded by the processor (one sample image each)."""
    prompts = [
        processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for _, m, _ in items
    ]
    out = []
    for (kind, _, target), prompt in zip(items, prompts):
        if kind == "image":
            enc = processor(images=[sample_image(0)], text=[prompt], add_special_tokens=False)
            ids = list(enc["input_ids"][0])
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if target else []
        out.append((ids + t, [-100] * len(ids) + t, kind == "image"))
    return out


def collate(rows: list[tuple[list[int], list[int], bool]], pad_id: int, pixel) -> dict:
    """Right-padded tensors; `pixel` (one image's pixel_values) repeated for image rows."""
    import torch

    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    lab = torch.full((len(rows), n), -100)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (s, y, _) in enumerate(rows):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": att, "labels": lab}
    if rows[0][2]:
        out["pixel_values"] = pixel.repeat(len(rows), 1, 1, 1)
    return out


def target_loss(vlm, batch: dict):
    """Cross-entropy on the target tokens only, the output projection applied to those positions alone (the
    prompts are long, the targets short: most of the logits a full forward computes would be thrown away)."""
    import torch

    labels = batch.pop("labels")
    hidden = vlm.model(**batch).last_hidden_state[:, :-1]
    want = labels[:, 1:]
    keep = want != -100
    logits = vlm.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), want[keep])


def train(vlm, processor, tok, cfg: dict[str, Any], log=None) -> dict[str, float]:
    """Fixed-step AdamW training (deterministic: seeded data, one thread count). The examples are rendered and
    tokenized once, up front; a step is tensor work only."""
    import torch

    tc = cfg["train"]
    threads = torch.get_num_threads()
    torch.set_num_threads(tc["threads"])  # one fixed count: the same floats on every run; restored after
    try:
        return _train(vlm, processor, tok, cfg, tc, log)
    finally:
        torch.set_num_threads(threads)


def _train(vlm, processor, tok, cfg: dict[str, Any], tc: dict[str, Any], log) -> dict[str, float]:
    import torch

    rng = random.Random(cfg["seed"])
    t0 = time.perf_counter()
    data = encode(processor, tok, [example(rng) for _ in range(tc["examples"])])
    pixel = processor.image_processor(images=[sample_image(0)], return_tensors="pt")["pixel_values"]
    by_kind = {k: [r for r in data if r[2] == k] for k in (True, False)}
    t_data = time.perf_counter() - t0
    opt = torch.optim.AdamW(vlm.parameters(), lr=tc["lr"], weight_decay=0.0)
    vlm.train()
    loss_avg = None
    with seeded(cfg["seed"]):
        for step in range(1, tc["steps"] + 1):
            lr = tc["lr"] * min(1.0, step / tc["warmup"]) * (0.1 + 0.9 * (1 - step / tc["steps"]))
            for g in opt.param_groups:
                g["lr"] = lr
            rows = rng.sample(by_kind[step % 2 == 0], tc["batch"])  # image and text batches alternate
            loss = target_loss(vlm, collate(rows, tok.pad_token_id, pixel))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            if log and step % 50 == 0:
                log(f"step {step} loss {loss_avg:.4f} {time.perf_counter() - t0:.0f}s")
    vlm.eval()
    return {
        "steps": tc["steps"],
        "final_loss": round(loss_avg or 0.0, 4),
        "data_seconds": round(t_data, 1),
        "train_seconds": round(time.perf_counter() - t0 - t_data, 1),
    }


def evaluate(vlm, processor, tok, n: int = 24, seed: int = 12345) -> dict[str, float]:
    """Greedy answers on held-out contents: share with the right shape and share echoed exactly."""
    import torch

    rng = random.Random(seed)
    pixel = processor.image_processor(images=[sample_image(0)], return_tensors="pt")["pixel_values"]
    shaped = exact = 0
    for _ in range(n):
        kind, msgs, target = example(rng)
        (row,) = encode(processor, tok, [(kind, msgs, "")])
        inputs = collate([row], tok.pad_token_id, pixel)
        inputs.pop("labels")
        n_prompt = len(row[0])
        with torch.no_grad():
            out = vlm.generate(**inputs, max_new_tokens=len(tok(target).input_ids) + 8, do_sample=False)
        text = tok.decode(out[0, n_prompt:], skip_special_tokens=True)
        exact += text.strip() == target
        tag = target.split(">")[0] + ">" if target.startswith("<") else target[:3]
        shaped += text.startswith(tag)
    return {"held_out": n, "shape": shaped / n, "exact": exact / n}


def build_aya_echo(out_dir: Path, log=None) -> tuple[Path, Path]:
    """Train and save ``out_dir/vlm`` (sharded safetensors) and ``out_dir/llm`` (its text twin)."""
    offline_env()
    import logging

    import torch
    from transformers import Cohere2ForCausalLM, GenerationConfig

    # never stdout: `python -m tinymodels build` prints its JSON there
    log = log or logging.getLogger(__name__).info
    cfg = ECHO_CONFIG
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(cfg["vocab_size"])
    vlm, processor, text_cfg, token_ids = _build(cfg, tok)
    stats = train(vlm, processor, tok, cfg, log)
    stats.update(evaluate(vlm, processor, tok))
    log(f"aya_echo: {stats}")
    if stats["shape"] < MIN_SHAPE:
        raise RuntimeError(
            f"the echo model answers in shape {stats['shape']:.0%} of the time (< {MIN_SHAPE:.0%})"
        )
    gen_cfg = GenerationConfig(**token_ids)
    vlm.generation_config = gen_cfg
    vlm_dir = out_dir / "vlm"
    vlm.save_pretrained(str(vlm_dir), safe_serialization=True, max_shard_size=cfg["max_shard_size"])
    processor.save_pretrained(str(vlm_dir))
    tok.chat_template = VLM_CHAT_TEMPLATE
    tok.save_pretrained(str(vlm_dir))
    if not (vlm_dir / "model.safetensors.index.json").exists():
        raise RuntimeError("the echo VLM was not saved sharded")

    llm = Cohere2ForCausalLM(text_cfg).eval()
    mapped = {}
    for k, v in vlm.state_dict().items():
        new = VLM_LAYOUT.text_name(k)
        if new is not None:
            mapped[new] = v.detach().clone()
    missing, unexpected = llm.load_state_dict(mapped, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"VLM->LLM mapping mismatch: missing={missing} unexpected={unexpected}")
    llm.tie_weights()
    llm.generation_config = gen_cfg
    llm_dir = out_dir / "llm"
    llm.save_pretrained(str(llm_dir), safe_serialization=True)
    tok.chat_template = LLM_CHAT_TEMPLATE
    tok.save_pretrained(str(llm_dir))
    with torch.no_grad():
        ids = tok.apply_chat_template([{"role": "user", "content": "Hello."}], add_generation_prompt=True)
        a = llm(input_ids=torch.tensor([ids])).logits[0, -1]
        b = vlm(input_ids=torch.tensor([ids])).logits[0, -1]
    if not torch.allclose(a, b, atol=1e-5):
        raise RuntimeError("the echo LLM and VLM disagree on a text-only prompt")
    (out_dir / "echo_eval.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    shutil.rmtree(out_dir / "_build", ignore_errors=True)
    return vlm_dir, llm_dir
