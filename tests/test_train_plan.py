"""The memory planner: exact parameter counts, hand-computed per-rank figures, the setting it names, and
a refusal that happens before any weight file is opened. docs/training.md's 8B/32B tables are checked
against the planner here, so the docs cannot drift from the code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from babelsynth.train.config import PhaseConfig, Phases, Resources, TrainConfig
from babelsynth.train.plan import (
    GIB,
    PlanError,
    dims_from_config,
    format_plan,
    param_counts,
    plan_phase,
    plan_recipe,
    read_dims,
)
from tests.train_helpers import AYA_VISION_CONFIGS

ROOT = Path(__file__).resolve().parents[1]

# A small Aya-Vision-shaped config whose figures are worked out by hand below.
SMALL = {
    "downsample_factor": 2,
    "alignment_intermediate_size": 64,
    "text_config": {
        "model_type": "cohere2",
        "vocab_size": 1000,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "patch_size": 14,
        "image_size": 28,
    },
}


def test_param_counts_match_the_tiny_models(models):
    """The planner's arithmetic equals the real module's parameter count (VLM and text LLM)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    counts = param_counts(read_dims(models["vlm"]))
    vlm = AutoModelForImageTextToText.from_pretrained(models["vlm"], dtype=torch.float32)
    parts = {"vision": 0, "connector": 0, "llm": 0}
    for n, p in vlm.named_parameters():
        parts[
            "vision" if "vision_tower" in n else "connector" if "multi_modal_projector" in n else "llm"
        ] += p.numel()
    assert parts == {k: counts[k] for k in parts}
    text = AutoModelForCausalLM.from_pretrained(models["llm"], dtype=torch.float32)
    assert param_counts(read_dims(models["llm"]))["llm"] == sum(p.numel() for p in text.parameters())


def test_small_config_parameter_counts_by_hand():
    c = param_counts(dims_from_config(SMALL))
    # decoder layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288; MLP 3*64*128 = 24576; one norm 64
    assert c["llm_layer"] == 12288 + 24576 + 64 == 36928
    assert c["llm_root"] == 1000 * 64 + 64 == 64064  # tied embedding = LM head, final norm
    assert c["llm"] == 64064 + 2 * 36928 == 137920
    # SigLIP layer: 2 layernorms 2*(2*32), attention 4*(32*32+32), fc1 32*64+64, fc2 64*32+32
    assert c["vision_layer"] == 128 + 4224 + 2112 + 2080 == 8544
    # patch conv 3*14*14*32 + 32, 4 position embeddings * 32, post-layernorm 2*32
    assert c["vision_root"] == 18816 + 32 + 128 + 64 == 19040
    # connector on 32*2*2 = 128 channels: layernorm 2*128, 128->64 (+64), 32->64 (+64)
    assert c["connector"] == 256 + 8256 + 2112 == 10624


def _phase_cfg(**kw) -> PhaseConfig:
    base = dict(steps=1, lr=1e-4, batch_size=4, micro_batch_size=1, max_seq_len=128, loss_chunk_tokens=16)
    return PhaseConfig(**{**base, **kw})


def test_small_config_per_rank_figures_by_hand():
    """World 2, SFT (connector + LLM trainable = 10624 + 137920 = 148544; vision frozen = 27584), one
    packed row of 128 tokens per micro-batch, activation checkpointing, 16-token loss chunks."""
    d = dims_from_config(SMALL)
    res = Resources(nproc_per_node=2, gpu_memory_gib=1.0)
    p = plan_phase(d, "sft", _phase_cfg(), res)
    assert (p.trainable_params, p.frozen_params, p.accumulation_steps) == (148544, 27584, 2)
    assert p.gpu == {
        "weights": (4 * 148544 + 2 * 27584) // 2,  # fp32 masters + bf16 frozen, sharded: 324672
        "grads": 4 * 148544 // 2,  # 297088
        "optimizer": 8 * 148544 // 2,  # AdamW m + v in fp32: 594176
        # root (64064 + 19040 + 10624 = 93728) gathered in bf16, plus two decoder layers in flight
        "gathered_weights": 2 * (93728 + 2 * 36928),  # 335168
        # trainable root (10624 + 64064) and one layer (36928): bf16 grad + fp32 reduce-scatter input
        "unsharded_grads": 6 * (74688 + 36928),  # 669696
        # checkpoint boundaries 2 layers * 128 * 64 * 2 B, then one layer recomputed with its gradients:
        # per token (2*64 + 3*64 + 3*32 + 4*128) * 2 B = 1856 B, twice, for 128 tokens
        "activations": 2 * 128 * 64 * 2 + 2 * 128 * 1856,  # 507904
        "logits": 16 * 1000 * 12,  # 192000
        # up to 128 tiles of 1 token; one vision layer: 4 patches * (4*32 + 64) * 2 B per tile
        "vision": 128 * 4 * 192 * 2,  # 196608
    }
    assert p.total == 3117312 and p.usable == int(0.9 * GIB) and p.fits

    no_ac = plan_phase(d, "sft", _phase_cfg(activation_checkpointing=False), res)
    assert no_ac.gpu["activations"] == 2 * 128 * 1856  # every layer keeps its 1856 B per token

    al = plan_phase(d, "alignment", _phase_cfg(micro_batch_size=2, max_seq_len=64), res)
    assert (al.trainable_params, al.frozen_params, al.accumulation_steps) == (10624, 165504, 1)
    assert al.gpu["weights"] == (4 * 10624 + 2 * 165504) // 2 == 186752
    assert (al.gpu["grads"], al.gpu["optimizer"], al.gpu["unsharded_grads"]) == (21248, 42496, 6 * 10624)
    assert al.total == 1545920

    off = plan_phase(d, "sft", _phase_cfg(), res.model_copy(update={"cpu_offload": True}))
    assert off.host == {k: p.gpu[k] for k in ("weights", "grads", "optimizer")}
    assert off.total == p.total - sum(off.host.values())


def test_plan_names_the_setting_to_change():
    d = dims_from_config(SMALL)
    # usable 2,500,000 B: the per-step part (1,901,376 B) fits, the sharded states (1,215,936 B at
    # world 2) do not: ranks needed = ceil(1215936 * 2 / (2500000 - 1901376)) = 5
    tight = Resources(nproc_per_node=2, gpu_memory_gib=2_500_000 / GIB, reserve_fraction=0.0)
    p = plan_phase(d, "sft", _phase_cfg(), tight)
    assert not p.fits
    assert "resources.nproc_per_node x resources.nnodes to at least 5 (now 2)" in p.hint
    assert "resources.cpu_offload: true" in p.hint
    # activations dominate: the micro-batch is named
    big = plan_phase(d, "sft", _phase_cfg(micro_batch_size=2, activation_checkpointing=False), tight)
    assert "train.phases.sft.micro_batch_size (now 2)" in big.hint
    assert "train.phases.sft.activation_checkpointing: true" in big.hint
    cfg = TrainConfig(
        phases=Phases(alignment=_phase_cfg(), sft=_phase_cfg(micro_batch_size=2)), resources=tight
    )
    with pytest.raises(PlanError, match="refusing before loading weights"):
        plan_recipe(d, cfg).check()


REFUSAL = """
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.fsdecode(args[0]))
sys.addaudithook(hook)
from babelsynth.cli import main
try:
    rc = main(sys.argv[1:])
except Exception as e:
    rc = f"{type(e).__name__}: {e}"
print(json.dumps({"rc": rc, "opened": opened}))
"""


def test_refusal_happens_before_any_weight_is_read(tmp_path, models):
    """An 8B-shaped VLM on one 80 GiB GPU cannot fit. Its weight files are garbage that would fail to
    load; the run is refused by the planner, and the only files opened under the model dirs are config.json
    (an audit hook records every open())."""
    vlm, text = tmp_path / "vlm", tmp_path / "text"
    for d, cfg in ((vlm, AYA_VISION_CONFIGS["8b"]), (text, AYA_VISION_CONFIGS["8b"]["text_config"])):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file
    from contextlib import ExitStack

    from babelsynth.train.merge import TensorSource

    with pytest.raises(Exception, match="header"), ExitStack() as stack:  # the weights would not load
        TensorSource(vlm, stack)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"vlm_dir: {vlm}\ntext_dir: {text}\ntrain:\n  resources: {{nproc_per_node: 1, gpu_memory_gib: 80}}\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    env.pop("WORLD_SIZE", None)
    argv = ["train", "--manifest", str(tmp_path / "manifest.json"), "--recipe", str(recipe)]
    out = subprocess.run(
        [sys.executable, "-c", REFUSAL, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"].startswith(
        "PlanError: the recipe does not fit in memory, refusing before loading weights"
    )
    assert "set resources.nproc_per_node x resources.nnodes to at least" in res["rc"]
    touched = {p for p in res["opened"] if p.startswith(str(tmp_path)) and not p.endswith("r.yaml")}
    assert touched == {str(vlm / "config.json")}


def test_cli_plan_prints_the_table_and_exits_by_fit(tmp_path):
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps(AYA_VISION_CONFIGS["8b"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (ROOT / "configs" / "train_aya_vision_8b.yaml")
        .read_text()
        .replace("/models/aya-vision-8b-init", str(vlm))
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}

    def cli(*extra):
        return subprocess.run(
            [sys.executable, "-m", "babelsynth.cli", "train", "--plan", "--recipe", str(recipe), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    ok = cli()
    assert ok.returncode == 0, ok.stderr[-2000:]
    for word in ("weights", "grads", "optimizer", "activations", "alignment", "sft", "fits"):
        assert word in ok.stdout
    bad = cli("--nproc-per-node", "1")
    assert bad.returncode == 1 and "NO" in bad.stdout and "at least" in bad.stdout

    (
        vlm / "config.json"
    ).unlink()  # the model's config.json not downloaded yet: one line, exit 2, no traceback
    missing = cli()
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "config.json not found" in missing.stderr and "Traceback" not in missing.stderr


def _doc_plan(size: str, **resources) -> str:
    from babelsynth.train.run import load_recipe

    os.environ.setdefault("BABELSYNTH_MODELS", "/models")
    cfg = load_recipe(ROOT / "configs" / f"train_aya_vision_{size}.yaml").train
    if resources:
        cfg = cfg.model_copy(update={"resources": cfg.resources.model_copy(update=resources)})
    return format_plan(plan_recipe(dims_from_config(AYA_VISION_CONFIGS[size]), cfg))


@pytest.mark.parametrize(
    "size, resources",
    [
        ("8b", {}),
        ("32b", {}),
        ("32b", {"cpu_offload": False}),
        ("32b", {"cpu_offload": False, "nnodes": 2}),
    ],
    ids=["8b-recipe", "32b-recipe-offload", "32b-8gpu-no-offload", "32b-16gpu"],
)
def test_docs_show_the_planners_8b_and_32b_figures(size, resources):
    """docs/training.md quotes these tables; regenerate them with `babelsynth train --plan` if this fails."""
    doc = (ROOT / "docs" / "training.md").read_text()
    table = _doc_plan(size, **resources)
    assert table in doc, f"docs/training.md is missing this planner output:\n{table}"


def test_recipes_fit_where_the_docs_say():
    assert "fits                             yes               yes" in _doc_plan("8b")
    assert "yes" in _doc_plan("32b").splitlines()[-1]
    no = _doc_plan("32b", cpu_offload=False)
    assert "NO" in no and "at least 15 (now 8)" in no
    assert _doc_plan("32b", cpu_offload=False, nnodes=2).splitlines()[-1].endswith("yes")
