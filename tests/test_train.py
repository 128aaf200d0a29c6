"""Training recipe on tiny random models: loss, phases (FSDP2, one process), resume, merge, pipeline.

The models are the shared tiny Aya Vision VLM and its text LLM (tinymodels.aya, through the session
`models` fixture); the run is a fake manifest + shards (tests/train_helpers.py). Nothing is downloaded.
Multi-process runs under torchrun are in test_train_dist.py, the memory planner in test_train_plan.py,
the Airflow task and S3 output in test_train_airflow.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from babelsynth.train.config import MixtureConfig, PhaseConfig, Phases, Resources, TrainConfig
from babelsynth.train.data import (
    IGNORE_INDEX,
    BatchStream,
    Example,
    MixtureStream,
    RunData,
    collate,
    encode_example,
    is_heldout,
    mixture_weights,
    row_encoder,
)
from babelsynth.train.loss import LossModel, chunked_ce_sum
from babelsynth.train.merge import check_compatible, lerp, merge_llm
from babelsynth.train.outputs import Outputs
from babelsynth.train.parallel import part_of, process_group
from babelsynth.train.sft import run_phase
from babelsynth.train.weights import (
    LEGACY_VLM_LAYOUT,
    VLM_LAYOUT,
    Layout,
    detect_vlm_layout,
    is_text_only,
)
from tests.train_helpers import COLORS, LANG_TEXT, build_fake_run, family_configs

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="session")
def tiny(models) -> tuple[Path, Path]:
    """(VLM dir, text LLM dir): the shared tiny Aya Vision and the Cohere2 it starts from (same LLM
    weights, same tokenizer). Read-only: tests write only under their own tmp dirs."""
    return Path(models["vlm"]), Path(models["llm"])


@pytest.fixture(scope="session")
def run_root(tmp_path_factory):
    return str(build_fake_run(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="session")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny[0])


@pytest.fixture(scope="session")
def perturbed_text(tiny, tmp_path_factory):
    """The text LLM with its weights moved, so a merge has two different endpoints."""
    d = tmp_path_factory.mktemp("text2")
    sd = load_file(str(tiny[1] / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file(
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
        str(d / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for f in tiny[1].iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    return d


def _cfg(**phase_kw) -> TrainConfig:
    phase = dict(steps=2, warmup_steps=1, batch_size=2, max_seq_len=128, lr=1e-2, loss_chunk_tokens=8)
    phase.update(phase_kw)
    return TrainConfig.smoke(
        phases=Phases(alignment=PhaseConfig(**phase), sft=PhaseConfig(**phase)),
        checkpoint_every=2,
        save_dtype="float32",
        verify_checkpoints=True,
    )


def _phase(phase, src, processor, run_root, cfg, out_uri, scratch, stop_after=None):
    """run_phase in this process (a world of one, the same FSDP path as torchrun's N)."""
    with process_group("cpu") as d:
        return run_phase(
            phase,
            src_dir=src,
            processor=processor,
            run_uri=run_root,
            cfg=cfg,
            out=Outputs(str(out_uri), scratch),
            d=d,
            stop_after=stop_after,
        )


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------------------------------- config
def test_config_forbids_unknown_keys_and_caps_warmup():
    with pytest.raises(Exception, match="extra"):
        TrainConfig.model_validate({"phases": {"alignment": {"steps": 1, "lr": 1e-4, "bogus": 1}}})
    s = PhaseConfig(steps=50, lr=1e-4)
    assert s.effective_warmup == 50 and s.lr_factor(49) == pytest.approx(1.0)
    s = PhaseConfig(steps=1000, lr=1e-4)
    assert s.lr_factor(0) == pytest.approx(1 / 200) and s.lr_factor(199) == pytest.approx(1.0)
    assert s.lr_factor(999) == pytest.approx(0.1, abs=1e-4)  # cosine decays to 10% of peak
    # micro-batches default to one row per forward, never to the whole batch
    assert s.micro_batch_size == 1 and s.micro_for(8) == 1 and s.rows_per_rank(8) == 16
    with pytest.raises(ValueError, match=r"multiple of resources\.nproc_per_node"):
        PhaseConfig(steps=1, lr=1e-4, batch_size=12).rows_per_rank(8)


def test_mixture_renormalises_without_original():
    w = mixture_weights(MixtureConfig(), {"multilingual", "english_synthetic"})
    assert w == pytest.approx({"multilingual": 0.35 / 0.66, "english_synthetic": 0.31 / 0.66})


# ------------------------------------------------------------------------------------------- data
def test_streaming_joins_images_and_holds_out(run_root, processor):
    from PIL import Image

    data = RunData(run_root)
    assert data.buckets == {"multilingual", "english_synthetic"}
    by_id = {r["sample_id"]: r for r in data.rows("all", 0.0)}
    for row in by_id.values():  # every referenced image resolves to the colour the answer names
        color = next(c for c in COLORS if c in row["answer"])
        assert data.images.get(row["image_ids"][0]).getpixel((0, 0)) == COLORS[color]
    frac = 0.25
    stream = MixtureStream(
        data, row_encoder(processor, data.images, 256), MixtureConfig(), seed=3, heldout_fraction=frac
    )
    seen = [stream.next() for _ in range(40)]
    assert not any(is_heldout(s, frac) for e in seen for s in e.sample_ids)
    langs = {by_id[e.sample_ids[0]]["lang"] for e in seen}
    assert langs == set(LANG_TEXT)
    # pixel_values are exactly the processor's output for the joined image(s)
    ex, row = seen[0], by_id[seen[0].sample_ids[0]]
    imgs = [Image.open(io.BytesIO(data.images.get_bytes(i))).convert("RGB") for i in row["image_ids"]]
    ref = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
    assert torch.equal(ex.pixel_values, ref)
    n_img = sum(1 for t in ex.input_ids if t == processor.tokenizer.convert_tokens_to_ids("<|START_OF_IMG|>"))
    assert n_img == len(row["image_ids"])


def test_stream_state_resumes_exactly(run_root, processor):
    data = RunData(run_root)
    enc = row_encoder(processor, data.images, 64)

    def make():
        return BatchStream(MixtureStream(data, enc, MixtureConfig(), 7, 0.2), 2, 64, packing=True)

    a = make()
    [a.next_rows() for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # JSON round trip, as in a checkpoint
    want = [[r.sample_ids for r in a.next_rows()] for _ in range(4)]
    b = make()
    b.load_state_dict(state)
    assert [[r.sample_ids for r in b.next_rows()] for _ in range(4)] == want


def test_row_order_depends_on_the_run_not_on_where_it_lives(run_root, tmp_path):
    """The shuffle is seeded by the manifest's relative paths, so a run copied elsewhere (another tmp
    dir, another bucket) trains on the same rows in the same order (found when the draw order, seeded
    by absolute paths, changed with pytest's tmp dir number)."""
    import shutil

    def order(root: str) -> list[str]:
        data = RunData(root)
        stream = MixtureStream(
            data, lambda row: Example([0], [0], [0], None, [row["sample_id"]]), MixtureConfig(), 5, 0.1
        )
        return [stream.next().sample_ids[0] for _ in range(40)]

    copy = tmp_path / "somewhere" / "else"
    shutil.copytree(run_root, copy)
    assert order(str(copy)) == order(run_root)
    assert len(set(order(run_root))) > 10  # rows are really drawn, not one row repeated


def test_loss_mask_covers_only_assistant_tokens(processor):
    from PIL import Image

    tok = processor.tokenizer
    img = Image.new("RGB", (60, 40), COLORS["red"])
    ex = encode_example(processor, "What color is the picture?", "The picture is red.", [img], 256, "s1")
    targets = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tok.decode(targets) == "The picture is red.<|END_OF_TURN_TOKEN|>"
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:first])
    assert tok.convert_ids_to_tokens(ex.input_ids[first - 1]) == "<|CHATBOT_TOKEN|>"
    assert ex.labels[first:] == ex.input_ids[first:]
    # too-long answers are truncated, too-long prompts are dropped (image tokens are never cut)
    cut = encode_example(processor, "q", "red " * 200, [img], 40, "s2")
    assert len(cut) == 40 and cut.truncated == 1 and ex.truncated == 0
    assert encode_example(processor, "q " * 50, "a", [img], 20, "s3") is None
    # packing: positions restart per example, labels/pixels concatenate
    from babelsynth.train.data import pack

    p = pack([ex, ex])
    batch = collate([p, ex], tok.pad_token_id, packed=True)
    assert batch["position_ids"][0].tolist().count(0) == 2 and batch["pixel_values"].shape[0] == 3
    assert (batch["labels"][1, len(ex) :] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------- loss
def _batch(run_root, processor, n=4, packed=False):
    data = RunData(run_root)
    enc = row_encoder(processor, data.images, 128)
    rows = BatchStream(MixtureStream(data, enc, MixtureConfig(), 5, 0.0), n, 128, packed).next_rows()
    return collate(rows, processor.tokenizer.pad_token_id, packed)


def _full_logits_loss(model, batch, scale=1.0):
    """The reference: full-vocabulary logits from the HF forward, one cross-entropy over all of them."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits * scale
    tgt = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        tgt.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((tgt != IGNORE_INDEX).sum())


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny, run_root, processor, packed):
    """The chunked loss (3-token chunks, so every batch spans many) gives the HF forward's loss and the
    same gradients on every parameter, images included."""
    from transformers import AutoModelForImageTextToText

    batch = _batch(run_root, processor, packed=packed)
    assert "pixel_values" in batch
    # float64 weights: in float32 the summation-order noise on the vision tower's small attention
    # gradients reaches 1e-5 of their scale, which no tolerance separates from a real error
    batch["pixel_values"] = batch["pixel_values"].double()
    ref_model = AutoModelForImageTextToText.from_pretrained(tiny[0], dtype=torch.float64)
    ref, n_ref = _full_logits_loss(ref_model, batch)
    ref.backward()
    model = AutoModelForImageTextToText.from_pretrained(tiny[0], dtype=torch.float64)
    got, n = LossModel(model, chunk_tokens=3)(**batch)
    got.backward()
    assert n == n_ref > 3 * 4
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            ref_grad = grads[name].grad  # both cross-entropies run in fp32: measured <= 3e-7 of scale
            assert (p.grad - ref_grad).abs().max() <= 2e-6 * ref_grad.abs().max() + 1e-12, name


def test_full_vocabulary_logits_are_never_materialised(tiny, run_root, processor):
    """Every tensor created in forward and backward (observed at the dispatcher) that spans the
    vocabulary has at most `chunk` rows, apart from the LM head weight itself and its gradient (hidden x
    vocab); the reference HF forward creates (batch x seq x vocab)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForImageTextToText

    class Widest(TorchDispatchMode):
        def __init__(self, vocab: int, hidden: int):
            super().__init__()
            self.vocab, self.hidden, self.rows = vocab, hidden, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                    if t.numel() != self.vocab * self.hidden:  # not the head weight / its gradient
                        self.rows = max(self.rows, t.numel() // self.vocab)
            return out

    batch = _batch(run_root, processor, packed=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny[0], dtype=torch.float32)
    vocab, hidden = model.config.text_config.vocab_size, model.config.text_config.hidden_size
    with Widest(vocab, hidden) as seen:
        loss, n = LossModel(model, chunk_tokens=8)(**batch)
        loss.backward()
    assert n > 8 * 3 and 0 < seen.rows <= 8
    with Widest(vocab, hidden) as ref:
        _full_logits_loss(model, batch)
    assert ref.rows >= batch["input_ids"].numel()


def test_chunked_loss_applies_the_language_models_logit_scale(tiny, run_root, processor):
    """Cohere LMs scale logits by logit_scale (Cohere2ForCausalLM does; HF's AyaVision head does not):
    the loss uses the LM's own scale, for the text model and the VLM alike."""
    from transformers import AutoModelForCausalLM

    batch = {k: v for k, v in _batch(run_root, processor).items() if k != "pixel_values"}
    text = AutoModelForCausalLM.from_pretrained(tiny[1], dtype=torch.float32)
    text.config.logit_scale = text.logit_scale = 0.5  # the config (LossModel) and the module's forward
    got, _ = LossModel(text, chunk_tokens=5)(**batch)
    ref, _ = _full_logits_loss(text, batch)  # Cohere2ForCausalLM's forward applies the scale itself
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    head = text.lm_head
    h = torch.randn(7, head.in_features)
    y = torch.randint(0, head.out_features, (7,))
    lab = torch.cat([torch.full((1, 1), IGNORE_INDEX), y[None]], dim=1)
    s, k = chunked_ce_sum(torch.cat([h, h[:1]])[None], lab, head, 0.5, 2)
    assert k == 7
    torch.testing.assert_close(
        s, torch.nn.functional.cross_entropy(head(h).float() * 0.5, y, reduction="sum")
    )


def test_text_only_micro_batch_still_runs_vision_and_connector(tiny, run_root, processor):
    """Every rank runs the same graph: without images the tower and connector run on a blank tile and
    contribute exactly zero, so the loss is the text-only loss and the connector gets zero gradients."""
    from transformers import AutoModelForImageTextToText

    batch = {k: v for k, v in _batch(run_root, processor).items() if k != "pixel_values"}
    batch["input_ids"] = batch["input_ids"].masked_fill(
        batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"), 20
    )
    plain = AutoModelForImageTextToText.from_pretrained(tiny[0], dtype=torch.float32)
    ref, _ = LossModel(plain, 4)(**batch)
    model = AutoModelForImageTextToText.from_pretrained(tiny[0], dtype=torch.float32)
    got, _ = LossModel(model, 4, always_run_vision=True)(**batch)
    got.backward()
    assert torch.equal(got, ref)
    conn = [p for n, p in model.named_parameters() if part_of(n) == "connector"]
    assert conn and all(p.grad is not None and not p.grad.any() for p in conn)


# ------------------------------------------------------------------------------------------- phases
def _diff_parts(base: dict, after: dict) -> dict[str, bool]:
    """Which parts changed; frozen parts are stored in bf16 during training, so compare to base in bf16."""
    changed = {"vision": False, "connector": False, "llm": False}
    for k, v in base.items():
        if not torch.equal(v.bfloat16().float(), after[k]):
            changed[part_of(k)] = True
    return changed


@pytest.mark.parametrize(
    "phase, changed",
    [
        ("alignment", {"vision": False, "connector": True, "llm": False}),
        ("sft", {"vision": False, "connector": True, "llm": True}),
    ],
)
def test_phase_trains_only_its_parts(tiny, run_root, processor, tmp_path, phase, changed):
    res = _phase(
        phase, tiny[0], processor, run_root, _cfg(packing=phase == "sft"), tmp_path / "out", tmp_path / "s"
    )
    assert res.completed and res.steps == 2 and res.world == 1 and all(x == x for x in res.losses)
    out = tmp_path / "out" / phase
    assert (out / "model.safetensors").exists() and (out / "phase_result.json").exists()
    assert _diff_parts(_tensors(tiny[0]), _tensors(out)) == changed
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_cpu_offload_path_trains(tiny, run_root, processor, tmp_path):
    """resources.cpu_offload (FSDP2 CPUOffloadPolicy) runs the same phase with the states in host RAM."""
    cfg = _cfg(steps=1).model_copy(update={"resources": Resources(cpu_offload=True, gpu_memory_gib=4)})
    res = _phase("sft", tiny[0], processor, run_root, cfg, tmp_path / "out", tmp_path / "s")
    assert res.completed and res.losses and res.losses[0] == res.losses[0]


@pytest.fixture(scope="module")
def uninterrupted(tiny, run_root, processor, tmp_path_factory):
    cfg = _cfg(steps=5, packing=True, max_seq_len=96, batch_size=4, micro_batch_size=2, weight_decay=0.1)
    root = tmp_path_factory.mktemp("uninterrupted")
    res = _phase("sft", tiny[0], processor, run_root, cfg, root / "out", root / "s")
    return cfg, root / "out" / "sft", res


@pytest.mark.parametrize("how", ["stop_at_3", "crash_after_3", "fresh_node"])
def test_resume_is_bit_identical(tiny, run_root, processor, tmp_path, uninterrupted, how):
    """stop_at_3: a time-boxed stop checkpoints step 3 and resumes there. crash_after_3: the step-3
    checkpoint is lost, so it resumes from step 2 and redoes step 3. fresh_node: the scratch dir is gone
    and the uploaded checkpoint is downloaded. Each ends bit-identical to the uninterrupted run."""
    cfg, ref_dir, ref = uninterrupted
    out, scratch = tmp_path / "out", tmp_path / "s"
    part = _phase("sft", tiny[0], processor, run_root, cfg, out, scratch, stop_after=3)
    assert not part.completed and part.steps == 3 and part.losses == ref.losses[:3]
    assert sorted(p.name for p in (out / "checkpoints" / "sft").iterdir()) == ["step-0000002", "step-0000003"]
    if how == "crash_after_3":
        for root in (out, scratch):
            shutil.rmtree(root / "checkpoints" / "sft" / "step-0000003")
    if how == "fresh_node":
        shutil.rmtree(scratch)
    rest = _phase("sft", tiny[0], processor, run_root, cfg, out, scratch)
    start = 2 if how == "crash_after_3" else 3
    assert rest.resumed_from == start and rest.completed and rest.resume_verified is True
    assert rest.losses == ref.losses[start:]
    a, b = _tensors(ref_dir), _tensors(out / "sft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = _phase("sft", tiny[0], processor, run_root, cfg, out, scratch)  # completed: not trained again
    assert again.completed and again.ran == 0 and again.steps == 5


# ------------------------------------------------------------------------------------------- merge
def test_lerp_is_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(lerp(a, w, 0.0), w) and torch.equal(lerp(a, w, 1.0), a)
    assert torch.equal(lerp(a, w, 0.4), 0.4 * a + 0.6 * w)
    ab, wb = a.bfloat16(), w.bfloat16()
    out = lerp(ab, wb, 0.4)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (0.4 * ab.float() + 0.6 * wb.float()).bfloat16())
    assert torch.equal(lerp(a, w, 0.4, torch.bfloat16), (0.4 * a + 0.6 * w).bfloat16())
    with pytest.raises(ValueError, match="shape"):
        lerp(a, w.T, 0.5)


@pytest.mark.parametrize("layout, outer", [(LEGACY_VLM_LAYOUT, ""), (VLM_LAYOUT, "model.")])
def test_weight_names_map_both_vlm_layouts(layout: Layout, outer: str):
    """transformers 4.57 files (legacy) and state_dict() / transformers 5 names map to the same text names."""
    body, text_body = layout.lm_prefix + "layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    vision, projector = (
        outer + "vision_tower.vision_model.post_layernorm.weight",
        outer + "multi_modal_projector.w",
    )
    assert layout.text_name(body) == text_body and layout.vlm_name(text_body) == body
    assert (
        layout.text_name(layout.lm_head) == "lm_head.weight"
        and layout.vlm_name("lm_head.weight") == layout.lm_head
    )
    assert layout.text_name(vision) is None and layout.text_name(projector) is None
    keys = [vision, projector, body, layout.lm_head]
    assert detect_vlm_layout(keys) == layout
    assert not is_text_only(keys) and is_text_only([text_body, "lm_head.weight"])
    with pytest.raises(KeyError, match="not a text-LLM parameter"):
        layout.vlm_name("encoder.layers.0.weight")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_tiny_model_math_and_layout(tiny, perturbed_text, tmp_path, dtype):
    vlm, text = _tensors(tiny[0]), _tensors(perturbed_text)
    target = getattr(torch, dtype)
    for alpha in (0.0, 0.4, 1.0):
        d = merge_llm(
            tiny[0], perturbed_text, tmp_path / f"m{alpha}", alpha, max_shard_bytes=64 << 10, dtype=dtype
        )
        assert (d / "model.safetensors.index.json").exists()  # small shards force an index
        merged = _tensors(d)
        assert merged.keys() == vlm.keys()
        for k, v in merged.items():
            assert v.dtype == target, k
            if k.startswith("language_model.model."):
                w = text["model." + k[len("language_model.model.") :]]
                want = {0.0: w, 1.0: vlm[k]}.get(alpha, alpha * vlm[k] + (1 - alpha) * w)
                assert torch.equal(v, want.to(target)), k
            else:  # vision tower + connector copied (bit for bit in fp32)
                assert part_of(k) in ("vision", "connector") and torch.equal(v, vlm[k].to(target)), k
        assert json.loads((d / "merge.json").read_text())["alpha"] == alpha
        assert json.loads((d / "config.json").read_text())["dtype"] == dtype
    assert (d / "preprocessor_config.json").exists() and (d / "tokenizer.json").exists()


def test_merged_model_loads_and_generates(tiny, perturbed_text, processor, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = merge_llm(tiny[0], perturbed_text, tmp_path / "m", 0.4, max_shard_bytes=64 << 10)
    model = AutoModelForImageTextToText.from_pretrained(d, dtype="auto").eval()
    assert model.dtype == torch.bfloat16  # merged weights are bf16 by default, and the config says so
    proc = AutoProcessor.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(
        text=text,
        images=[Image.new("RGB", (50, 50), COLORS["blue"])],
        return_tensors="pt",
        add_special_tokens=False,
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    want = (
        _tensors(perturbed_text)["model.norm.weight"] * 0.6
        + 0.4 * _tensors(tiny[0])["language_model.model.norm.weight"]
    ).bfloat16()
    assert torch.equal(model.model.language_model.norm.weight.detach(), want)


def test_merge_other_layout_and_untied_head(tmp_path):
    """transformers>=5 names (model.language_model.*, lm_head.weight) with an untied VLM head and a
    tied text model: the head is merged against the text embeddings."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    vlm, text = tmp_path / "vlm", tmp_path / "text"
    vlm.mkdir()
    text.mkdir()
    v = {
        "model.language_model.embed_tokens.weight": r(10, 4),
        "model.language_model.norm.weight": r(4),
        "lm_head.weight": r(10, 4),
        "model.vision_tower.x": r(3),
        "model.multi_modal_projector.y": r(2, 2),
    }
    t = {"model.embed_tokens.weight": r(10, 4), "model.norm.weight": r(4)}
    save_file(v, str(vlm / "model.safetensors"), metadata={"format": "pt"})
    save_file(t, str(text / "model.safetensors"), metadata={"format": "pt"})
    family_configs(vlm, text, hidden=4, vocab=10, layers=0, tie_word_embeddings=True)
    got = _tensors(merge_llm(vlm, text, tmp_path / "out", 0.4, dtype="float32"))
    assert torch.equal(
        got["lm_head.weight"], 0.4 * v["lm_head.weight"] + 0.6 * t["model.embed_tokens.weight"]
    )
    assert torch.equal(
        got["model.language_model.norm.weight"],
        0.4 * v["model.language_model.norm.weight"] + 0.6 * t["model.norm.weight"],
    )
    assert torch.equal(got["model.vision_tower.x"], v["model.vision_tower.x"])
    family_configs(vlm, text, hidden=4, vocab=10, layers=0, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="not tied"):
        merge_llm(vlm, text, tmp_path / "out", 0.4)


def test_merge_rejects_mismatched_tensors(tiny, tmp_path):
    sd = load_file(str(tiny[1] / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1]
    del sd["model.layers.1.mlp.down_proj.weight"]
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tiny[1] / "config.json", bad / "config.json")
    with pytest.raises(ValueError) as e:
        merge_llm(tiny[0], bad, tmp_path / "out", 0.4)
    msg = str(e.value)
    assert "shape mismatch: language_model.model.layers.0.mlp.up_proj.weight" in msg
    assert "missing in text model: model.layers.1.mlp.down_proj.weight" in msg
    assert "no counterpart in the VLM: model.extra.weight" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="multimodal config"):
        merge_llm(tiny[0], tiny[0], tmp_path / "out", 0.4)


@pytest.mark.parametrize(
    "field, value",
    [("model_type", "cohere"), ("hidden_size", 128), ("vocab_size", 1999), ("num_hidden_layers", 3)],
)
def test_merge_refuses_a_text_model_of_another_family(tiny, tmp_path, field, value):
    """aya-expanse-8b (Cohere v1) has R7B's tensor shapes: only the configs tell them apart. The merge
    refuses on model_type, hidden size, vocabulary or layer count, naming the field, before any tensor."""
    other = tmp_path / "other"
    shutil.copytree(tiny[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg[field] = value
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes(b"not a safetensors file: never opened")
    with pytest.raises(ValueError, match=rf"{field}: VLM language model .* vs text model {value!r}"):
        check_compatible(tiny[0], other)
    with pytest.raises(ValueError, match=field):
        merge_llm(tiny[0], other, tmp_path / "out", 0.4)
    assert not (tmp_path / "out").exists()


MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, sys, threading, time
    import torch, safetensors.torch
    from babelsynth.train.merge import merge_llm

    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    gc.collect()
    base = anon()
    peak, done = [base], [False]
    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    t = threading.Thread(target=sample)
    t.start()
    merge_llm(sys.argv[1], sys.argv[2], sys.argv[3], 0.4, max_shard_bytes=int(sys.argv[4]), dtype="float32")
    done[0] = True
    t.join()
    print(json.dumps({"peak_delta": peak[0] - base}))
""")


def test_merge_peak_memory_is_a_few_tensors(tmp_path):
    """24 LLM tensors of 4 MiB (96 MiB per model): the merge must peak at a few tensors, not a model
    (fp32 output here, so the result is checked exactly)."""
    n, shape = 24, (1024, 1024)
    tensor_bytes = 4 * shape[0] * shape[1]
    vlm, text = tmp_path / "vlm", tmp_path / "text"
    vlm.mkdir()
    text.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n // 8):  # sharded inputs: 3 files per model, with an index for the VLM
        chunk = {f"layers.{j}.w": torch.randn(shape, generator=g) for j in range(8 * i, 8 * i + 8)}
        save_file(
            {f"language_model.model.{k}": v for k, v in chunk.items()}
            | ({"vision_tower.vision_model.w": torch.randn(256, 256, generator=g)} if i == 0 else {}),
            str(vlm / f"model-{i}.safetensors"),
            metadata={"format": "pt"},
        )
        save_file(
            {f"model.{k}": v + 1 for k, v in chunk.items()},
            str(text / f"model-{i}.safetensors"),
            metadata={"format": "pt"},
        )
    wm = {}
    for i in range(n // 8):
        with safe_open(str(vlm / f"model-{i}.safetensors"), "pt") as f:
            wm.update({k: f"model-{i}.safetensors" for k in f.keys()})
    (vlm / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (text / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {
                    k.replace("language_model.model.", "model."): v
                    for k, v in wm.items()
                    if k.startswith("language_")
                },
            }
        )
    )
    family_configs(vlm, text, hidden=shape[1], vocab=1, layers=n)

    env = dict(os.environ, PYTHONPATH=str(SRC), MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(vlm), str(text), str(out), str(40 << 20)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_delta"]
    model_bytes = n * tensor_bytes
    assert peak < 6 * tensor_bytes, f"peak {peak / 2**20:.1f} MiB vs tensor {tensor_bytes / 2**20:.0f} MiB"
    assert peak < model_bytes / 4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and len(index["weight_map"]) == n + 1
    with safe_open(str(out / index["weight_map"]["language_model.model.layers.5.w"]), "pt") as f:
        got = f.get_tensor("language_model.model.layers.5.w")
    a = load_file(str(vlm / "model-0.safetensors"))["language_model.model.layers.5.w"]
    assert torch.equal(got, 0.4 * a + 0.6 * (a + 1))


# ------------------------------------------------------------------------------------------- pipeline
def test_train_and_merge_end_to_end(tiny, run_root, tmp_path):
    """One process, local output: phases, the merge at alpha (bf16), the sweep scored in memory (its
    alpha=0.4 entry equals the written merge), skipped-for-length rows counted per phase in eval.json."""
    from babelsynth.train.pipeline import train_and_merge

    base = TrainConfig.smoke(steps=2)
    # two-image prompts are 33-37 tokens, one-image ones 26-30: alignment at 32 skips the former and
    # truncates the answers of the latter; SFT at 256 keeps everything
    cfg = base.model_copy(
        update={
            "phases": Phases(
                alignment=base.phases.alignment.model_copy(update={"max_seq_len": 32}), sft=base.phases.sft
            ),
            "merge": base.merge.model_copy(update={"sweep": [0.3, 0.4]}),
        }
    )
    out = tmp_path / "out"
    summary = train_and_merge(
        str(Path(run_root) / "manifest.json"),
        str(tiny[0]),
        str(tiny[1]),
        str(out),
        cfg,
        scratch=str(tmp_path / "s"),
    )
    for d in ("alignment", "sft", "merged"):
        assert (out / d / "config.json").exists(), d
    assert not list(out.glob("merged_a*")) and not list(
        (tmp_path / "s").glob("merged_a*")
    )  # sweep: nothing written
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["models"]) == {"text_base", "sft", "merged"} and set(ev["sweep"]) == {"0.30", "0.40"}
    assert ev["models"]["text_base"]["mm_loss"] is None and ev["models"]["text_base"]["text_loss"] > 0
    assert ev["models"]["sft"]["n_mm"] > 0 and ev["models"]["merged"]["mm_loss"] > 0
    for k in ("text_loss", "mm_loss"):
        assert ev["sweep"]["0.40"][k] == ev["models"]["merged"][k]
    assert ev["sweep"]["0.30"]["text_loss"] != ev["sweep"]["0.40"]["text_loss"]
    assert ev["skipped_for_length"]["alignment"] > 0 and ev["skipped_for_length"]["sft"] == 0
    assert ev["truncated_answers"]["alignment"] > 0 and ev["max_seq_len"]["alignment"] == 32
    assert ev["skipped_for_length"]["alignment"] == summary["phases"]["alignment"]["skipped_for_length"]
    assert summary["phases"]["sft"]["steps"] == 2 and summary["merged"]["alpha"] == 0.4
    assert json.loads((out / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "summary.json").read_text())["eval"] == summary["eval"]
    # re-running trains nothing again: completed phases are read back from the output
    again = train_and_merge(
        str(run_root), str(tiny[0]), str(tiny[1]), str(out), cfg, scratch=str(tmp_path / "s2")
    )
    assert again["phases"]["sft"]["ran"] == 0 and again["phases"]["alignment"]["ran"] == 0
    assert again["eval"]["merged"] == summary["eval"]["merged"]


@pytest.mark.slow
def test_merged_checkpoint_is_served_by_vllm(models, tmp_path):
    """The merge output keeps the VLM's names and files, so the production server loads it unchanged."""
    import base64

    import httpx
    from PIL import Image

    from babelsynth.vllm_server import VLLMServer

    d = merge_llm(models["vlm"], models["llm"], tmp_path / "merged", 0.4)
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), COLORS["red"]).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with VLLMServer(d, served_model_name="merged", work_dir=tmp_path / "vllm") as srv:
        r = httpx.post(
            f"{srv.url}/chat/completions",
            timeout=60,
            json={
                "model": "merged",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "What is this?"},
                        ],
                    }
                ],
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("name", ["train_demo", "train_aya_vision_8b", "train_aya_vision_32b"])
def test_training_recipes_validate(name, monkeypatch):
    from babelsynth.train.run import load_recipe

    monkeypatch.setenv("BABELSYNTH_MODELS", "/m")
    r = load_recipe(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert r.train.merge.alpha == 0.4 and r.train.phases.alignment.betas == (0.9, 0.95)
    assert (
        "micro_batch_size" in (Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").read_text()
    )
    if name == "train_aya_vision_8b":  # the merge base is the VLM's own LLM: Command R7B, not aya-expanse-8b
        assert r.text_dir.endswith("c4ai-command-r7b-12-2024") and r.train.resources.nproc_per_node == 8
    if name == "train_aya_vision_32b":
        assert (r.train.phases.alignment.lr, r.train.phases.sft.lr) == (1e-3, 5e-4)
        assert r.text_dir.endswith("aya-expanse-32b") and r.train.resources.cpu_offload


def test_recipe_with_phases_at_the_old_place_names_the_new_key(tmp_path):
    from babelsynth.train.run import load_recipe

    old = tmp_path / "old.yaml"
    old.write_text(
        "vlm_dir: /m/vlm\ntext_dir: /m/llm\ntrain:\n"
        "  alignment: {steps: 4, lr: 1.0e-3}\n  sft: {steps: 4, lr: 1.0e-3, packing: true}\n"
    )
    with pytest.raises(ValueError, match=r"train\.alignment moved.*under `phases:`"):
        load_recipe(old)
    with pytest.raises(ValueError, match="unknown phase"):
        TrainConfig().phase("stage1")
