"""Training recipe on tiny random models: phase freezing, resume, loss mask, streaming, merge, pipeline.

The models are the shared tiny Aya Vision VLM and its text LLM (tinymodels.aya, through the session
`models` fixture); the run is a fake manifest + shards built here. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from babelsynth.train.config import MixtureConfig, PhaseConfig, Phases, TrainConfig  # noqa: E402
from babelsynth.train.data import (  # noqa: E402
    IGNORE_INDEX,
    BatchStream,
    MixtureStream,
    RunData,
    collate,
    encode_example,
    is_heldout,
    mixture_weights,
    row_encoder,
)
from babelsynth.train.merge import lerp, merge_llm, sweep  # noqa: E402
from babelsynth.train.sft import load_vlm, part_of, run_phase  # noqa: E402
from babelsynth.train.weights import (  # noqa: E402
    LEGACY_VLM_LAYOUT,
    VLM_LAYOUT,
    Layout,
    detect_vlm_layout,
    is_text_only,
)

SRC = Path(__file__).resolve().parents[1] / "src"

# ------------------------------------------------------------------------------------------- run data
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
    phase = dict(steps=2, warmup_steps=1, batch_size=2, max_seq_len=128, lr=1e-2)
    phase.update(phase_kw)
    return TrainConfig.smoke(
        phases=Phases(alignment=PhaseConfig(**phase), sft=PhaseConfig(**phase)), checkpoint_every=2
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- config
def test_config_forbids_unknown_keys_and_caps_warmup():
    with pytest.raises(Exception, match="extra"):
        TrainConfig.model_validate({"phases": {"alignment": {"steps": 1, "lr": 1e-4, "bogus": 1}}})
    s = PhaseConfig(steps=50, lr=1e-4)
    assert s.effective_warmup == 50 and s.lr_factor(49) == pytest.approx(1.0)
    s = PhaseConfig(steps=1000, lr=1e-4)
    assert s.lr_factor(0) == pytest.approx(1 / 200) and s.lr_factor(199) == pytest.approx(1.0)
    assert s.lr_factor(999) == pytest.approx(0.1, abs=1e-4)  # cosine decays to 10% of peak


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
    assert len(encode_example(processor, "q", "red " * 200, [img], 40, "s2")) == 40
    assert encode_example(processor, "q " * 50, "a", [img], 20, "s3") is None
    # packing: positions restart per example, labels/pixels concatenate
    from babelsynth.train.data import pack

    p = pack([ex, ex])
    batch = collate([p, ex], tok.pad_token_id, packed=True)
    assert batch["position_ids"][0].tolist().count(0) == 2 and batch["pixel_values"].shape[0] == 3
    assert (batch["labels"][1, len(ex) :] == IGNORE_INDEX).all()


# ------------------------------------------------------------------------------------------- phases
def _diff_parts(before, after) -> dict[str, bool]:
    changed = {"vision": False, "connector": False, "llm": False}
    for k, v in before.items():
        if not torch.equal(v, after[k]):
            changed[part_of(k)] = True
    return changed


def test_alignment_trains_only_the_connector(tiny, run_root, processor, tmp_path):
    model = load_vlm(tiny[0])
    before = _state(model)
    res = run_phase(model, "alignment", processor=processor, run_uri=run_root, cfg=_cfg(), out_dir=tmp_path)
    assert res.completed and res.steps == 2 and all(x == x for x in res.losses)
    assert _diff_parts(before, _state(model)) == {"vision": False, "connector": True, "llm": False}
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "phase_result.json").exists()


def test_sft_trains_connector_and_llm_not_vision(tiny, run_root, processor, tmp_path):
    model = load_vlm(tiny[0])
    before = _state(model)
    run_phase(model, "sft", processor=processor, run_uri=run_root, cfg=_cfg(packing=True), out_dir=tmp_path)
    assert _diff_parts(before, _state(model)) == {"vision": False, "connector": True, "llm": True}


@pytest.fixture(scope="module")
def uninterrupted(tiny, run_root, processor, tmp_path_factory):
    cfg = _cfg(steps=5, packing=True, max_seq_len=96, micro_batch_size=1, weight_decay=0.1)
    model = load_vlm(tiny[0])
    res = run_phase(
        model,
        "sft",
        processor=processor,
        run_uri=run_root,
        cfg=cfg,
        out_dir=tmp_path_factory.mktemp("uninterrupted"),
    )
    return cfg, model, res


@pytest.mark.parametrize("stop_after", [2, 3])  # right at the step-2 checkpoint, or one step past it
def test_resume_after_checkpoint_is_bit_identical(
    tiny, run_root, processor, tmp_path, uninterrupted, stop_after
):
    cfg, full, ref = uninterrupted
    first = load_vlm(tiny[0])
    part = run_phase(
        first, "sft", processor=processor, run_uri=run_root, cfg=cfg, out_dir=tmp_path, stop_after=stop_after
    )
    assert not part.completed and part.steps == stop_after
    del first
    second = load_vlm(tiny[0])  # a fresh process would start from the base weights again
    rest = run_phase(second, "sft", processor=processor, run_uri=run_root, cfg=cfg, out_dir=tmp_path)
    assert rest.resumed_from == 2 and rest.completed
    assert rest.losses == ref.losses[2:]
    a, b = full.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- merge
def test_lerp_is_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(lerp(a, w, 0.0), w) and torch.equal(lerp(a, w, 1.0), a)
    assert torch.equal(lerp(a, w, 0.4), 0.4 * a + 0.6 * w)
    ab, wb = a.bfloat16(), w.bfloat16()
    out = lerp(ab, wb, 0.4)
    assert out.dtype == torch.bfloat16 and torch.equal(out, (0.4 * ab.float() + 0.6 * wb.float()).bfloat16())
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


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_merge_tiny_model_math_and_layout(tiny, perturbed_text, tmp_path):
    vlm, text = _tensors(tiny[0]), _tensors(perturbed_text)
    outs = sweep(tiny[0], perturbed_text, tmp_path, [0.0, 0.4, 1.0], max_shard_bytes=64 << 10)
    assert (outs[0.4] / "model.safetensors.index.json").exists()  # small shards force an index
    for alpha, d in outs.items():
        merged = _tensors(d)
        assert merged.keys() == vlm.keys()
        for k, v in merged.items():
            if k.startswith("language_model.model."):
                w = text["model." + k[len("language_model.model.") :]]
                assert torch.equal(v, {0.0: w, 1.0: vlm[k]}.get(alpha, alpha * vlm[k] + (1 - alpha) * w)), k
            else:  # vision tower + connector copied bit for bit
                assert part_of(k) in ("vision", "connector") and torch.equal(v, vlm[k]), k
    assert json.loads((outs[0.4] / "merge.json").read_text())["alpha"] == 0.4
    assert (outs[0.4] / "preprocessor_config.json").exists() and (outs[0.4] / "tokenizer.json").exists()


def test_merged_model_loads_and_generates(tiny, perturbed_text, processor, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = merge_llm(tiny[0], perturbed_text, tmp_path / "m", 0.4, max_shard_bytes=64 << 10)
    model = AutoModelForImageTextToText.from_pretrained(d).eval()
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
    )
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
    (text / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    got = _tensors(merge_llm(vlm, text, tmp_path / "out", 0.4))
    assert torch.equal(
        got["lm_head.weight"], 0.4 * v["lm_head.weight"] + 0.6 * t["model.embed_tokens.weight"]
    )
    assert torch.equal(
        got["model.language_model.norm.weight"],
        0.4 * v["model.language_model.norm.weight"] + 0.6 * t["model.norm.weight"],
    )
    assert torch.equal(got["model.vision_tower.x"], v["model.vision_tower.x"])
    (text / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="not tied"):
        merge_llm(vlm, text, tmp_path / "out", 0.4)


def test_merge_rejects_mismatched_models(tiny, tmp_path):
    sd = load_file(str(tiny[1] / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1]
    del sd["model.layers.1.mlp.down_proj.weight"]
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        merge_llm(tiny[0], bad, tmp_path / "out", 0.4)
    msg = str(e.value)
    assert "shape mismatch: language_model.model.layers.0.mlp.up_proj.weight" in msg
    assert "missing in text model: model.layers.1.mlp.down_proj.weight" in msg
    assert "no counterpart in the VLM: model.extra.weight" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="text-only"):
        merge_llm(tiny[0], tiny[0], tmp_path / "out", 0.4)


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
    merge_llm(sys.argv[1], sys.argv[2], sys.argv[3], 0.4, max_shard_bytes=int(sys.argv[4]))
    done[0] = True
    t.join()
    print(json.dumps({"peak_delta": peak[0] - base}))
""")


def test_merge_peak_memory_is_a_few_tensors(tmp_path):
    """24 LLM tensors of 4 MiB (96 MiB per model): the merge must peak at a few tensors, not a model."""
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
    (vlm / "config.json").write_text("{}")

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
    from babelsynth.train.pipeline import train_and_merge

    cfg = TrainConfig.smoke(steps=2)
    summary = train_and_merge(
        str(Path(run_root) / "manifest.json"), str(tiny[0]), str(tiny[1]), str(tmp_path / "out"), cfg
    )
    out = tmp_path / "out"
    for d in ("alignment", "sft", "merged", "merged_a0.30", "merged_a0.50"):
        assert (out / d / "config.json").exists(), d
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"text_base", "sft", "merged", "merged_a0.30", "merged_a0.50"}
    assert ev["text_base"]["mm_loss"] is None and ev["text_base"]["text_loss"] > 0
    assert ev["sft"]["n_mm"] > 0 and ev["merged"]["mm_loss"] > 0
    assert (out / "sft" / "eval.json").exists()
    assert summary["phases"]["sft"]["steps"] == 2 and summary["merged"]["merged"]["alpha"] == 0.4
    # re-running resumes every phase from its final checkpoint instead of training again
    again = train_and_merge(str(run_root), str(tiny[0]), str(tiny[1]), str(out), cfg)
    assert again["phases"]["sft"]["resumed_from"] == 2
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
    if name == "train_aya_vision_32b":
        assert (r.train.phases.alignment.lr, r.train.phases.sft.lr) == (1e-3, 5e-4)


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
