"""Tiny offline models (tinymodels: builders + per-builder cache) and the vLLM server wrapper
(babelsynth.vllm_server)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG
from babelsynth.train.weights import VLM_LAYOUT
from babelsynth.vllm_server import VLLMServer, VLLMServerError, default_vllm_python
from tinymodels import aya, nllb
from tinymodels import build as B
from tinymodels import comet as tiny_comet
from tinymodels.corpus import CORPUS_CODES, corpus_lines

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def seed_cache(src: Path, dest: Path, names) -> None:
    """Copy built models (with their stamps) so a build under `dest` reuses them instead of retraining."""
    for name in names:
        if (src / name).is_dir() and not (dest / name).exists():
            shutil.copytree(src / name, dest / name, symlinks=True)


@pytest.fixture(scope="module")
def models(models: dict[str, str], models_root: Path) -> dict[str, str]:
    """This module's own cache root (its tests rebuild, edit and crash builders there), seeded with the
    session's models: nothing is location-bound, so every builder is a cache hit until a test changes it."""
    seed_cache(Path(models["nllb_ct2"]).parents[1], models_root, [b.name for b in B.BUILDERS])
    return B.build_all(models_root)


# ------------------------------------------------------------------------------------------------------
# corpus

# The dominant Unicode script (first word of the character name) expected in each corpus file.
_SCRIPT = {
    "Arab": "ARABIC",
    "Latn": "LATIN",
    "Grek": "GREEK",
    "Hebr": "HEBREW",
    "Deva": "DEVANAGARI",
    "Cyrl": "CYRILLIC",
    "Hang": "HANGUL",
    "Hans": "CJK",
    "Hant": "CJK",
    "Jpan": "HIRAGANA",
}


@pytest.mark.parametrize("code", CORPUS_CODES)
def test_corpus_file_is_in_its_script(code: str) -> None:
    lines = corpus_lines([code])[code]
    assert len(lines) >= 10 and len(set(lines)) == len(lines)
    expected = _SCRIPT[code.split("_")[1]]
    for line in lines:
        letters = [unicodedata.name(c, "?").split()[0] for c in line if c.isalpha()]
        assert letters.count(expected) >= len(letters) // 2 or (code == "jpn_Jpan" and "CJK" in letters), line


def test_corpus_traditional_differs_from_simplified() -> None:
    c = corpus_lines(["zho_Hans", "zho_Hant"])
    for hans, hant in zip(c["zho_Hans"], c["zho_Hant"], strict=True):
        assert hans != hant
    assert "們" in "".join(c["zho_Hant"]) and "们" not in "".join(c["zho_Hant"])
    assert "pes_Arab" in CORPUS_CODES and "\u064a" not in "".join(corpus_lines(["pes_Arab"])["pes_Arab"])


# ------------------------------------------------------------------------------------------------------ NLLB
# / CT2


def test_ct2_translates_into_all_targets_without_torch(models: dict[str, str]) -> None:
    import ctranslate2
    import sentencepiece as spm

    ct2 = Path(models["nllb_ct2"])
    for f in ("model.bin", "sentencepiece.bpe.model", "tokenizer.json", "shared_vocabulary.json"):
        assert (ct2 / f).exists(), f
    sp = spm.SentencePieceProcessor(model_file=str(ct2 / "sentencepiece.bpe.model"))
    tr = ctranslate2.Translator(str(ct2), device="cpu", compute_type="int8", inter_threads=1, intra_threads=1)
    texts = corpus_lines([SOURCE_LANG])[SOURCE_LANG][:2]
    src = [[SOURCE_LANG] + sp.encode(t, out_type=str) + ["</s>"] for t in texts]
    batch = [s for s in src for _ in AYA_TARGETS]
    prefix = [[c] for _ in src for c in AYA_TARGETS]
    res = tr.translate_batch(batch, target_prefix=prefix, beam_size=2, max_decoding_length=32)
    vocab = set(json.loads((ct2 / "shared_vocabulary.json").read_text()))
    assert set(AYA_TARGETS) <= vocab
    for p, r in zip(prefix, res, strict=True):
        hyp = r.hypotheses[0]
        assert hyp[0] == p[0]
        assert sp.decode(hyp[1:]).strip(), (p, hyp)


def test_nllb_hf_tokenizer_carries_flores_codes(models: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(models["nllb_ct2"]).parent / "hf"), src_lang=SOURCE_LANG)
    for code in (*AYA_TARGETS, SOURCE_LANG, "zul_Latn", "ace_Arab"):
        assert tok.convert_tokens_to_ids(code) != tok.unk_token_id
    toks = tok.convert_ids_to_tokens(tok("The red car.").input_ids)
    assert toks[0] == SOURCE_LANG and toks[-1] == "</s>"


# ------------------------------------------------------------------------------------------------------ cache


def _tree_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def test_build_cache_skips_then_rebuilds_on_stamp_change(models: dict[str, str], models_root: Path) -> None:
    stamp = models_root / "nllb" / B.STAMP_FILE
    before = dict(B.BUILD_COUNTER)
    mtime = stamp.stat().st_mtime_ns
    assert B.build_all(models_root) == models
    assert dict(B.BUILD_COUNTER) == before and stamp.stat().st_mtime_ns == mtime

    data = json.loads(stamp.read_text())
    data["hash"] = "0" * 64  # as if the builder config or source had changed
    stamp.write_text(json.dumps(data))
    assert B.build_all(models_root) == models
    assert B.BUILD_COUNTER["nllb"] == before.get("nllb", 0) + 1
    assert B.BUILD_COUNTER["aya_vision"] == before.get("aya_vision", 0)
    assert B.BUILD_COUNTER["comet"] == before.get("comet", 0)
    assert B.read_stamp(models_root / "nllb")["hash"] != "0" * 64
    assert not list(models_root.glob(".*.tmp-*")) and not list(models_root.glob(".*.old-*"))


@pytest.mark.parametrize("builder", B.BUILDERS, ids=lambda b: b.name)
def test_builder_digest_covers_the_code_it_uses(builder: B.Builder) -> None:
    """Every in-repo module a builder's modules use is itself part of that builder's digest."""
    declared = {m.__name__ for m in builder.modules}
    used = set()
    for m in builder.modules:
        for v in vars(m).values():
            name = v.__name__ if isinstance(v, ModuleType) else getattr(v, "__module__", None)
            if isinstance(name, str) and name.split(".")[0] in ("tinymodels", "babelsynth"):
                used.add(name)
    assert used <= declared
    assert builder.modules[0].__name__ in (
        f"tinymodels.{builder.name}",
        f"tinymodels.{builder.name.split('_')[0]}",
    )


def test_editing_one_builder_rebuilds_only_that_model(
    models: dict[str, str], models_root: Path, tmp_path: Path
) -> None:
    """A copy of tinymodels with a changed COMET builder rebuilds COMET under the same root and reuses
    NLLB and Aya; back on the real source, COMET alone is rebuilt again."""
    copy = tmp_path / "tinymodels"
    shutil.copytree(Path(B.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "comet.py", "a", encoding="utf-8") as f:
        f.write("\n# an edit to the COMET builder\n")
    stamps = {n: (models_root / n / B.STAMP_FILE) for n in ("nllb", "aya_vision", "comet")}
    before = {n: (p.stat().st_mtime_ns, B.read_stamp(p.parent)["hash"]) for n, p in stamps.items()}
    src = Path(__import__("babelsynth").__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(src)]))
    proc = subprocess.run(
        [sys.executable, "-m", "tinymodels", "build", "--root", str(models_root)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == models
    after = {n: (p.stat().st_mtime_ns, B.read_stamp(p.parent)["hash"]) for n, p in stamps.items()}
    assert after["nllb"] == before["nllb"] and after["aya_vision"] == before["aya_vision"]
    assert after["comet"][1] != before["comet"][1]
    assert B.read_stamp(models_root / "comet")["spec"]["sources"]["tinymodels.comet"] != B.source_digest(
        tiny_comet
    )

    counts = dict(B.BUILD_COUNTER)
    assert B.build_all(models_root) == models
    assert B.BUILD_COUNTER["comet"] == counts.get("comet", 0) + 1
    assert B.BUILD_COUNTER["nllb"] == counts.get("nllb", 0)
    assert B.BUILD_COUNTER["aya_vision"] == counts.get("aya_vision", 0)
    assert B.read_stamp(models_root / "comet")["hash"] == before["comet"][1]


def test_crashed_build_leaves_no_valid_looking_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, models_root: Path, models: dict[str, str]
) -> None:
    def boom(out_dir: Path) -> Path:
        (Path(out_dir) / "ct2").mkdir(parents=True)
        (Path(out_dir) / "ct2" / "model.bin").write_bytes(b"half")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(nllb, "build_nllb", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        B.build_all(tmp_path)
    assert not (tmp_path / "nllb").exists()
    assert not list(tmp_path.glob(".nllb.tmp-*"))
    monkeypatch.undo()

    # A clean build at another root is byte-identical to the fixture's (deterministic, seeded builders). The
    # slow builders (a constructed NLLB, a CPU-trained VLM and classifier) are seeded from the fixture's
    # cache, not rebuilt.
    seed_cache(models_root, tmp_path, ["nllb_copy", "aya_echo", "comet", "toxicity"])
    before = dict(B.BUILD_COUNTER)
    paths = B.build_all(tmp_path)
    built = {k: B.BUILD_COUNTER[k] - before.get(k, 0) for k in B.BUILD_COUNTER}
    assert {k for k, n in built.items() if n} == {"nllb", "aya_vision"}
    assert Path(paths["nllb_ct2"]).is_dir()
    for name in ("nllb", "aya_vision"):
        a, b = _tree_digest(models_root / name), _tree_digest(tmp_path / name)
        a.pop(B.STAMP_FILE), b.pop(B.STAMP_FILE)
        assert a == b, name


# ------------------------------------------------------------------------------------------------------ COMET


def test_cometkiwi_loads_offline_and_scores(models: dict[str, str]) -> None:
    import logging

    import comet
    import yaml

    ckpt = Path(models["comet"])
    hp = yaml.safe_load((ckpt.parents[1] / "hparams.yaml").read_text())
    assert hp["input_segments"] == ["mt", "src"] and hp["class_identifier"] == "unified_metric"
    assert hp["pretrained_model"] == "microsoft/infoxlm-large"  # the hub id, as the real checkpoint stores it
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # COMET's own loader, offline: the encoder's config and tokenizer come from the session's HF cache
    assert os.environ["HF_HUB_OFFLINE"] == "1" and Path(os.environ["HF_HUB_CACHE"]).is_dir()
    model = comet.load_from_checkpoint(str(ckpt), local_files_only=True)
    c = corpus_lines([SOURCE_LANG, "deu_Latn"])
    data = [{"src": c[SOURCE_LANG][i], "mt": c["deu_Latn"][i]} for i in range(2)]
    out = model.predict(data, batch_size=8, gpus=0, progress_bar=False)
    assert len(out.scores) == 2 and all(0.0 <= s <= 1.0 for s in out.scores)
    again = model.predict(data, batch_size=8, gpus=0, progress_bar=False)
    assert again.scores == pytest.approx(out.scores, abs=1e-6)


# ------------------------------------------------------------------------------------------------------ Aya
# Vision


def test_vlm_generates_from_image_in_transformers(models: dict[str, str]) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(models["vlm"])
    model = AutoModelForImageTextToText.from_pretrained(models["vlm"]).eval()
    assert type(model).__name__ == "AyaVisionForConditionalGeneration"
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}
    ]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<image>") == 1 and prompt.endswith("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    inputs = proc(images=[aya.sample_image()], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 4
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 4
    # plain string content renders too
    s = proc.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "hi" in s and "<image>" not in s


def test_text_llm_weights_equal_vlm_language_model(models: dict[str, str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    vlm = AutoModelForImageTextToText.from_pretrained(models["vlm"])
    llm = AutoModelForCausalLM.from_pretrained(models["llm"])
    assert type(llm).__name__ == "Cohere2ForCausalLM"
    vsd, lsd = vlm.state_dict(), llm.state_dict()
    assert set(lsd) == {VLM_LAYOUT.text_name(k) for k in vsd if VLM_LAYOUT.text_name(k) is not None}
    for k, v in lsd.items():
        assert torch.equal(v, vsd[VLM_LAYOUT.vlm_name(k)]), k
    # tied embeddings in both
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    assert vlm.lm_head.weight.data_ptr() == vlm.model.language_model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(models["llm"])
    assert tok.chat_template and "image" not in tok.chat_template
    assert tok.eos_token == "<|END_OF_TURN_TOKEN|>" and llm.config.eos_token_id == tok.eos_token_id


def test_aya_tokenizer_is_multilingual_bpe(models: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["llm"])
    assert 300 <= len(tok) <= 2000
    for code, lines in corpus_lines().items():
        ids = tok(lines[0], add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, code
        assert tok.decode(ids) == lines[0], code
        assert len(ids) < len(lines[0]), code  # merges were learned for every language


# ------------------------------------------------------------------------------------------------------ vLLM
# server


def test_vllm_server_command_and_env(models: dict[str, str], tmp_path: Path) -> None:
    srv = VLLMServer(models["vlm"], served_model_name="aya", port=8123, work_dir=tmp_path, python="/x/python")
    cmd = srv.command()
    assert cmd[:3] == ["/x/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--enforce-eager", "--kv-cache-memory-bytes", "--max-model-len", "--seed", "--dtype"):
        assert flag in cmd
    assert cmd[cmd.index("--limit-mm-per-prompt") + 1] == '{"image": 2}'
    assert json.loads(cmd[cmd.index("--structured-outputs-config") + 1])["disable_any_whitespace"] is True
    assert srv.url == "http://127.0.0.1:8123/v1"
    env = srv.child_env()
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CACHE_ROOT"].startswith(str(tmp_path)) and env["XDG_CACHE_HOME"].startswith(
        str(tmp_path)
    )
    text = VLLMServer(models["llm"], python="/x/python", work_dir=tmp_path)
    assert "--limit-mm-per-prompt" not in text.command() and text.port > 0


def test_vllm_server_reports_early_death_with_log_tail(models: dict[str, str], tmp_path: Path) -> None:
    # The test interpreter has no vllm: the child dies at once and the error must carry the log tail.
    srv = VLLMServer(models["llm"], python=sys.executable, work_dir=tmp_path, startup_timeout=60)
    with pytest.raises(VLLMServerError, match=r"No module named .?vllm"):
        srv.start()
    assert not srv.is_running()
    with pytest.raises(VLLMServerError, match="vLLM python not found"):
        VLLMServer(models["llm"], python=tmp_path / "nope", work_dir=tmp_path).start()


def _vllm_python() -> Path:
    py = default_vllm_python()  # $BABELSYNTH_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python
    if not py.exists():
        pytest.fail(f"vLLM python {py} does not exist (set BABELSYNTH_VLLM_PYTHON or run `make setup`)")
    return py


def _png_data_url() -> str:
    buf = io.BytesIO()
    aya.sample_image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_vllm_serves_vlm_with_image(models: dict[str, str], tmp_path: Path) -> None:
    import httpx

    with VLLMServer(models["vlm"], served_model_name="aya", python=_vllm_python(), work_dir=tmp_path) as srv:
        body = {
            "model": "aya",
            "temperature": 1.0,
            "seed": 3,
            "max_tokens": 32,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _png_data_url()}},
                        {"type": "text", "text": "Describe this image."},
                    ],
                }
            ],
        }
        r = httpx.post(f"{srv.url}/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["choices"][0]["message"]["content"].strip()
        assert j["usage"]["prompt_tokens"] > 20  # the image expanded into 7 image tokens
        r2 = httpx.post(f"{srv.url}/chat/completions", json=body, timeout=120)
        assert r2.json()["choices"][0]["message"]["content"] == j["choices"][0]["message"]["content"]
        pid = srv.pid
        srv.kill()  # fault injection: SIGKILL the whole group
        assert not srv.is_running() and not srv.health()
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the whole group is gone (orphans are reaped by init)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"process group {pid} survived kill()")


@pytest.mark.slow
def test_vllm_serves_text_llm_with_structured_choice(models: dict[str, str], tmp_path: Path) -> None:
    import httpx

    with VLLMServer(
        models["llm"], served_model_name="aya-text", python=_vllm_python(), work_dir=tmp_path
    ) as srv:
        msg = [{"role": "user", "content": "Write a caption for a red car."}]
        r = httpx.post(
            f"{srv.url}/chat/completions",
            timeout=120,
            json={"model": "aya-text", "messages": msg, "temperature": 1.0, "seed": 1, "max_tokens": 32},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
        answers = set()
        for seed in range(4):
            r = httpx.post(
                f"{srv.url}/chat/completions",
                timeout=120,
                json={
                    "model": "aya-text",
                    "messages": [{"role": "user", "content": "Is this good? YES or NO."}],
                    "temperature": 1.0,
                    "seed": seed,
                    "max_tokens": 8,
                    "structured_outputs": {"choice": ["YES", "NO"]},
                },
            )
            assert r.status_code == 200, r.text
            answers.add(r.json()["choices"][0]["message"]["content"])
        assert answers <= {"YES", "NO"} and answers
        schema = {
            "type": "object",
            "required": ["caption", "ok"],
            "additionalProperties": False,
            "properties": {"caption": {"type": "string", "maxLength": 40}, "ok": {"type": "boolean"}},
        }
        r = httpx.post(
            f"{srv.url}/chat/completions",
            timeout=120,
            json={
                "model": "aya-text",
                "messages": msg,
                "temperature": 1.0,
                "seed": 0,
                "max_tokens": 96,
                "structured_outputs": {"json": schema},
            },
        )
        obj = json.loads(r.json()["choices"][0]["message"]["content"])
        assert set(obj) == {"caption", "ok"} and isinstance(obj["ok"], bool)
    assert srv.proc is not None and srv.proc.returncode is not None
