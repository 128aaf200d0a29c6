"""Safety stages on real engines: the tiny text classifier (tinymodels/toxicity.py, trained to flag planted
marker words) and the tiny Aya Vision served by vLLM as the image judge.

Planted, not found: a random classifier cannot tell unsafe text, so the tiny one was trained to flag one
marker word per category (`toxicity.MARKERS`) and nothing else; a record is made unsafe by inserting a marker.
"""

from __future__ import annotations

import io
import json
import socket
import sqlite3

import pytest

from babelsynth import runner, storage
from babelsynth.config import SAFETY_CATEGORIES
from babelsynth.stages.safety import parse_verdict, verdict_schema
from tests.conftest import make_config
from tinymodels.toxicity import MARKERS

LANGS = ["deu_Latn", "jpn_Jpan"]


def _write_input(uri: str, plant: dict[int, str], where: str) -> dict[str, str]:
    """Sample input (no bad records) with a marker planted in record i's `where` (question or answer);
    returns {source_id: category} of the planted records."""
    import pyarrow.parquet as pq

    from babelsynth.sample_data import make_samples
    from babelsynth.schema import to_table

    rows = make_samples(n_per_task=2, bad=False)
    planted = {}
    for i, cat in plant.items():
        turn = rows[i]["conversation"][0 if where == "question" else 1]
        turn["content"] = f"{turn['content']} {MARKERS[cat]}"
        planted[rows[i]["source_id"]] = cat
    buf = io.BytesIO()
    pq.write_table(to_table("input", rows), buf)
    storage.write_bytes(uri, buf.getvalue())
    return planted


def _cfg(models, servers, tmp_path, **over):
    return make_config(
        models,
        servers,
        str(tmp_path / "in.parquet"),
        str(tmp_path / "runs"),
        str(tmp_path / "cache"),
        **{
            "run.languages": LANGS,
            "run.language_ratio": 1.0,
            "safety.enabled": True,
            "models.toxicity": {
                "kind": "hf_sequence_classifier",
                "path": models["toxicity"],
                "device": "cpu",
            },
            **over,
        },
    )


def test_text_classifier_loads_from_its_local_path_with_no_network(models, monkeypatch):
    """The classifier dir is the real layout, loads with every socket refused, and scores a planted marker in
    any language over its category's threshold and clean text under it."""
    from pathlib import Path

    from babelsynth.backends.text_classifier import TextClassifier
    from babelsynth.config import TextClassifierBackend

    d = Path(models["toxicity"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in d.iterdir()
    }

    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    clf = TextClassifier(TextClassifierBackend(path=str(d), device="cpu", batch_size=4, max_length=16))
    assert clf.labels == list(SAFETY_CATEGORIES)
    clean = [
        "A red circle on a white background.",
        "Vielen Dank für Ihre Hilfe.",
        "今日はとても良い天気です。",
    ]
    long_clean = " ".join(clean * 6)  # longer than max_length=16 tokens: scored in windows
    planted = [f"Vielen Dank {MARKERS['hate']} für Ihre Hilfe.", f"{long_clean} {MARKERS['violence']}"]
    scores = clf.scores([*clean, long_clean, *planted])
    assert all(max(s.values()) < 0.5 for s in scores[:4]), scores[:4]
    assert scores[4]["hate"] > 0.5 and scores[5]["violence"] > 0.5  # the marker in the last window counts
    assert clf.calls >= 2  # batches of 4 windows


def test_a_planted_unsafe_caption_is_dropped_with_its_category_before_recaption(models, tmp_path):
    """safety_pre (position before_recaption) scores the ground truth: the planted records are rejected as
    unsafe_<category> with their score, nothing else is dropped; safety_post is inactive (writes nothing)."""
    planted = _write_input(str(tmp_path / "in.parquet"), {1: "violence", 4: "self_harm"}, "answer")
    servers = {"teacher": _NoServer(), "llm": _NoServer()}  # no model call in these stages
    cfg = _cfg(models, servers, tmp_path, **{"safety.position": "before_recaption", "safety.image": False})
    runner.plan(cfg, "pre")
    runner.run_stage(cfg, "pre", "ingest", 0)
    st = runner.run_stage(cfg, "pre", "safety_pre", 0)
    doc = runner.layout(cfg, "pre").read_stage_result("safety_pre", 0)
    got = {r["source_id"]: r for r in doc["rejected"]}
    assert {k: r["reason"] for k, r in got.items()} == {k: f"unsafe_{c}" for k, c in planted.items()}
    for r in got.values():
        assert "check=text" in r["detail"] and "field=answer_gt" in r["detail"]
        assert float(r["detail"].split("score=")[1].split()[0]) >= 0.5
    assert st["safety_drops"] == {"eng_Latn": {"violence": 1, "self_harm": 1}}
    assert st["out"] == st["in"] - 2
    assert runner.run_stage(cfg, "pre", "safety_post", 0) == {"stage": "safety_post", "inactive": True}
    assert not runner.layout(cfg, "pre").has_stage_result("safety_post", 0)


def test_allow_list_and_thresholds_keep_what_they_name(models, tmp_path):
    """An allow-listed category never drops (it is counted); a threshold above every score keeps the row."""
    _write_input(str(tmp_path / "in.parquet"), {1: "violence", 4: "self_harm"}, "answer")
    servers = {"teacher": _NoServer(), "llm": _NoServer()}
    cfg = _cfg(
        models,
        servers,
        tmp_path,
        **{
            "safety.position": "before_recaption",
            "safety.image": False,
            "safety.allow_categories": ["violence"],
            "safety.thresholds": {"self_harm": 1.0},
        },
    )
    runner.plan(cfg, "allow")
    runner.run_stage(cfg, "allow", "ingest", 0)
    st = runner.run_stage(cfg, "allow", "safety_pre", 0)
    assert st["rejected"] == 0 and st["allowed"] == {"violence": 1}


def test_image_judge_verdicts_parse_every_time(models, vllm_servers, tmp_path):
    """The tiny VLM (served by vLLM) judges every image; structured output makes each answer a verdict of the
    schema, so none fails to parse; unsafe verdicts are rejects named by their category."""
    _write_input(str(tmp_path / "in.parquet"), {}, "answer")
    cfg = _cfg(
        models,
        vllm_servers,
        tmp_path,
        **{
            "safety.position": "before_recaption",
            "safety.text": False,
            "models.safety_judge": {
                "kind": "openai_http",
                "base_url": vllm_servers["teacher"].url,
                "model": "tiny-aya-vision",
                "image_max_side": 224,
            },
        },
    )
    runner.plan(cfg, "img")
    ing = runner.run_stage(cfg, "img", "ingest", 0)
    st = runner.run_stage(cfg, "img", "safety_pre", 0)
    assert st["image_judged"] == ing["out"] > 0 and st["requests_sent"] == ing["out"]
    doc = runner.layout(cfg, "img").read_stage_result("safety_pre", 0)
    cats = {*SAFETY_CATEGORIES, "unspecified"}
    assert all(
        r["reason"].removeprefix("unsafe_") in cats and "check=image" in r["detail"] for r in doc["rejected"]
    )
    assert st["image_unsafe"] == st["rejected"]
    # what the server returned, read back from the request cache: each parses against the schema
    with sqlite3.connect(tmp_path / "cache" / "requests.sqlite") as db:
        texts = [json.loads(v)["text"] for (v,) in db.execute("SELECT v FROM kv")]
    assert len(texts) == ing["out"]
    assert all(parse_verdict(t, list(SAFETY_CATEGORIES)) for t in texts)


def test_verdict_parser_refuses_what_the_schema_forbids():
    cats = list(SAFETY_CATEGORIES)
    assert (
        parse_verdict('{"decision":"unsafe","category":"hate","rationale":"x"}', cats)["category"] == "hate"
    )
    for bad in ("YES", '{"decision":"maybe","category":"hate","rationale":""}', '{"decision":"safe"}'):
        with pytest.raises(RuntimeError, match="structured outputs"):
            parse_verdict(bad, cats)
    assert verdict_schema(cats)["properties"]["rationale"]["maxLength"] == 200


@pytest.mark.slow
def test_every_translated_output_is_checked_and_drops_are_counted_per_language(
    models, vllm_servers, tmp_path
):
    """A whole run: markers planted in two questions survive the copying translator into every language's
    draft; output_safety drops exactly those (record, language) rows with their category, the manifest
    counts them per language and category, and the report shows the table."""
    planted = _write_input(str(tmp_path / "in.parquet"), {0: "hate", 3: "violence"}, "question")
    cfg = _cfg(
        models,
        vllm_servers,
        tmp_path,
        **{
            "safety.image": False,
            "safety.text": False,  # the English check would drop them first
            "judge.mode": "report",
            "models.translator.path": models["nllb_copy_ct2"],
        },
    )
    m = runner.run_all(cfg, "outputs")
    st = m["stages"]["output_safety"]
    assert m["reconciliation"]["ok"] and m["models"]["toxicity"] == "toxicity"
    assert st["safety_drops"] == {lg: {"hate": 1, "violence": 1} for lg in LANGS}
    assert st["reasons"] == {"unsafe_hate": len(LANGS), "unsafe_violence": len(LANGS)}
    lay = runner.layout(cfg, "outputs")
    rej = [r for f in m["files"] if f["table"] == "rejected" for r in lay.read_table(f["path"]).to_pylist()]
    mine = {(r["source_id"], r["lang"]): r for r in rej if r["stage"] == "output_safety"}
    assert set(mine) == {(sid, lg) for sid in planted for lg in LANGS}
    assert all("field=draft_prompt" in r["detail"] for r in mine.values())
    html = storage.read_bytes(storage.join(m["path"], m["report"]["html"])).decode()
    section = html.split('<section id="safety">')[1].split("</section>")[0]
    for lg in LANGS:
        assert lg in section
    assert "hate" in section and "violence" in section


class _NoServer:
    url = "http://127.0.0.1:9/v1"  # never called: these stages make no chat request
