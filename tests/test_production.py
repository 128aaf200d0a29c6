"""The production rehearsal: configs/production.yaml end to end on CPU, every rule and gate enforced.

Only locations and endpoints are swapped: the vLLM servers (VLLM_TEACHER_URL, VLLM_LLM_URL, serving under the
production served-model names), the S3 endpoint (a moto server: the input and output URIs are the file's own
s3://my-bucket/...), the cache dir (BABELSYNTH_CACHE_DIR) and the two model paths (overrides). The models
behave: the translator copies its input and stops (tinymodels/nllb_copy.py), the teacher and the LLM were
trained to echo inside the expected tags (tinymodels/aya_echo.py), COMET names its encoder by hub id and
finds it in the Hugging Face cache.

The oracle: with a copying translator every draft equals its English source byte for byte, whatever
segmentation, protected spans, batching, chunking and reassembly did. A copied English text then fails
target-language ID: the gates reject it, each row with its reason, and the counts reconcile.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from babelsynth import runner, storage
from babelsynth.config import load_config
from babelsynth.languages import SOURCE_LANG
from babelsynth.layout import RunLayout
from tests.conftest import ROOT, WORK, start_all
from tests.proxies import moto_s3
from tests.test_translate import RICH, _long_answer

# The run (two vLLM servers, six stages, COMET) takes about two minutes on a 2-core box; a rephrase the tiny
# echo model does not end stops at its budget (rephrase.tokens_per_char), not at production's 2048 tokens.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PRODUCTION = ROOT / "configs" / "production.yaml"
RUN_ID = "rehearsal"
SWAPPED = {  # what the rehearsal changes, and nothing else
    "models.teacher.base_url",
    "models.judge.base_url",
    "models.rephraser.base_url",
    "models.translator.path",
    "models.comet.path",
    "cache_dir",
}

# Hostile texts: each is an answer (echoed by the teacher) and its question carries hostile text too, so the
# translate stage sees them even where the tiny teacher's echo is imperfect.
HOSTILE = {
    "table": (
        "Summarize the table at https://example.com/report?id=7 please.",
        "| Item | Price |\n|:-----|------:|\n| Fresh vegetables | 12.50 |\n| A cup of coffee | 3 |",
    ),
    "list": (
        "List the steps shown, as `- item` lines.",
        "The steps are:\n- Open the door.\n- Turn on the light.\n1. Sit down at the table.",
    ),
    "code": (
        "What does `print(2 + 3)` output in the screenshot?",
        "The code prints five:\n```python\nprint(2 + 3)\n```\nIt runs in any Python shell.",
    ),
    "math": (
        "Solve $x^2 = 4$ as shown on the page.",
        "The page shows $x = 2$ or $x = -2$, because $2^2 = 4$.",
    ),
    "url_email": (
        "Where can I ask about the sign? Write to jane.doe@example.org if unsure.",
        "Visit https://example.com/docs/page_(v2)?q=1&lang=en or write to help@example.org for details.",
    ),
    "rtl_hebrew": (
        "What does the Hebrew sign say? שלום",
        "The sign says שלום עולם, which means hello world.",
    ),
    "rtl_arabic": ("Read the Arabic text: مرحبا", "The text reads مرحبا بالعالم and greets the reader."),
    "emoji": ("Which emoji are on the card? 😀", "The card shows 😀 and 🎉 next to a red heart ❤️ today."),
}


def hostile_texts() -> dict[str, str]:
    """Every hostile text the translate stage must copy: the questions, the answers, the test suite's RICH
    markdown (code blocks, math, URLs, e-mails, tags, placeholders, a table) and a 5,000-word answer."""
    out = {f"{k}.q": q for k, (q, _) in HOSTILE.items()} | {f"{k}.a": a for k, (_, a) in HOSTILE.items()}
    return {**out, "rich": RICH, "5000_words": _long_answer()}


def rehearsal_input() -> list[dict]:
    from babelsynth.sample_data import make_samples

    rows = [r for r in make_samples(n_per_task=3, bad=True) if r["task_type"] == "captioning"]
    image = rows[0]["images"]
    for i, (kind, (q, a)) in enumerate(HOSTILE.items()):
        task = {"table": "table", "code": "screenshot_code", "math": "textbook"}.get(kind, "vqa")
        rows.append(
            {
                "source_id": f"hostile-{i:02d}-{kind}",
                "task_type": task,
                "conversation": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "images": image,
                "source": "rehearsal",
            }
        )
    return rows


@pytest.fixture(scope="module")
def echo_servers(models):
    """The echo models served under the names configs/production.yaml sends (404 otherwise)."""
    from babelsynth.vllm_server import VLLMServer

    prod = yaml.safe_load(PRODUCTION.read_text())["models"]
    py = os.environ["BABELSYNTH_VLLM_PYTHON"]
    # Context for production's token budgets: a rephrase may generate 2 x recaption.max_tokens = 2048.
    common = {"python": py, "work_dir": WORK / "vllm", "max_model_len": 4096}
    servers = {
        "teacher": VLLMServer(models["echo_vlm"], served_model_name=prod["teacher"]["model"], **common),
        "llm": VLLMServer(models["echo_llm"], served_model_name=prod["judge"]["model"], **common),
    }
    try:
        start_all(servers.values())
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3("my-bucket", key="rehearsal", set_env=False) as (env, client):
        yield env, client


@pytest.fixture(scope="module")
def rehearsal(models, echo_servers, s3, tmp_path_factory):
    import pyarrow.parquet as pq

    from babelsynth.schema import to_table

    s3_env, client = s3
    env = {
        **s3_env,
        "VLLM_TEACHER_URL": echo_servers["teacher"].url,
        "VLLM_LLM_URL": echo_servers["llm"].url,
        "BABELSYNTH_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    over = {"models.translator.path": models["nllb_copy_ct2"], "models.comet.path": models["comet"]}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = load_config(PRODUCTION, over)
        buf = io.BytesIO()
        rows = rehearsal_input()
        pq.write_table(to_table("input", rows), buf)
        storage.write_bytes(cfg.input_uri, buf.getvalue())
        manifest = runner.run_all(cfg, RUN_ID)
        lay = runner.layout(cfg, RUN_ID)
        results = {s: [lay.read_stage_result(s, sh) for sh in manifest_shards(manifest)] for s in STAGES}
        yield {
            "cfg": cfg,
            "manifest": manifest,
            "results": results,
            "rows": rows,
            "layout": lay,
            "s3": client,
        }
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


STAGES = ("ingest", "recaption", "judge", "translate", "rephrase", "score")


def manifest_shards(m: dict) -> list[int]:
    return list(range(m["shards"]))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) and v and k != "per_lang" else {key: v})
    return out


# ------------------------------------------------------------------------------------------------ the run
@pytest.mark.rehearsal
def test_only_locations_and_endpoints_differ_from_the_production_file(rehearsal, monkeypatch):
    cfg = rehearsal["cfg"]
    monkeypatch.setenv("VLLM_TEACHER_URL", "http://vllm-teacher:8000/v1")
    monkeypatch.setenv("VLLM_LLM_URL", "http://vllm-llm:8000/v1")
    monkeypatch.delenv("BABELSYNTH_CACHE_DIR", raising=False)
    as_deployed = load_config(PRODUCTION)
    a, b = _flatten(as_deployed.model_dump()), _flatten(cfg.model_dump())
    assert {k for k in a if a[k] != b[k]} == SWAPPED
    assert cfg.input_uri.startswith("s3://my-bucket/") and cfg.output_uri.startswith("s3://my-bucket/")
    modes = [cfg.recaption.mode, cfg.judge.mode, cfg.translate.mode]
    modes += [
        getattr(cfg.score.gates, g).mode for g in ("comet", "mtld", "langid", "length_ratio", "repetition")
    ]
    assert set(modes) == {"enforce"}


@pytest.mark.rehearsal
def test_every_draft_equals_its_english_source_byte_for_byte(rehearsal):
    translated = [
        r for doc in rehearsal["results"]["translate"] for r in doc["rows"] if r["lang"] != SOURCE_LANG
    ]
    assert translated, "nothing reached the translate stage"
    for r in translated:
        assert r["draft_prompt"] == r["prompt_en"], (r["lang"], r["source_id"])
        assert r["draft_answer"] == r["answer_en"], (r["lang"], r["source_id"])
    assert all(
        not doc["rejected"] for doc in rehearsal["results"]["translate"]
    )  # complete copies: no truncation
    # Hostile text reached the engine path end to end (rows the enforced rules dropped before translation
    # do not; tests below copy every hostile text through the stage directly).
    seen = "\n".join(r["prompt_en"] + "\n" + r["answer_en"] for r in translated)
    kinds = {
        "code": r"`[^`]+`",
        "url": r"https://",
        "e-mail": r"@example\.org",
        "hebrew": r"[\u0590-\u05ff]",
        "arabic": r"[\u0600-\u06ff]",
        "emoji": r"😀",
        "math": r"\$[^$]+\$",
    }
    reached = sorted(k for k, p in kinds.items() if re.search(p, seen))
    assert len(reached) >= 4, f"only {reached} of the hostile kinds reached the translate stage"


@pytest.mark.rehearsal
def test_every_record_is_kept_or_rejected_with_its_reason_and_counts_reconcile(rehearsal):
    m = rehearsal["manifest"]
    assert m["reconciliation"] == {"ok": True, "errors": []}
    assert m["input_records"] == len(rehearsal["rows"])
    known = {
        "ingest": {
            "missing_id",
            "unknown_task_type",
            "empty_text",
            "text_too_long",
            "missing_image",
            "corrupt_image",
        },
        "recaption": {
            "truncated",
            "missing_answer_tag",
            "empty_output",
            "refusal",
            "prompt_echo",
            "gt_contradiction",
            "repetition_loop",
            "teacher_request_rejected",
        },
        "judge": {"judge_rejected", "judge_request_rejected"},
        "translate": {"translation_empty", "translation_truncated"},
        "rephrase": set(),
        "score": {f"gate_{g}" for g in ("comet", "mtld", "langid", "length_ratio", "repetition")},
    }
    for stage, s in m["stages"].items():
        assert s["in"] == s["out"] + s["rejected"], stage
        assert set(s["reasons"]) <= known[stage], (stage, s["reasons"])
    lay: RunLayout = rehearsal["layout"]
    rejected = [
        r for f in m["files"] if f["table"] == "rejected" for r in lay.read_table(f["path"]).to_pylist()
    ]
    assert len(rejected) == m["rejected_total"] and all(r["reason"] and r["stage"] for r in rejected)
    listed = rehearsal["s3"].list_objects_v2(Bucket="my-bucket", Prefix=f"babelsynth/runs/{RUN_ID}/")
    assert f"babelsynth/runs/{RUN_ID}/manifest.json" in {o["Key"] for o in listed["Contents"]}


@pytest.mark.rehearsal
def test_copied_english_fails_target_language_id(rehearsal):
    """Every translated row whose answer is its English source, copied, and that langid can judge is flagged
    gate_langid (English is not the target language); a row rejected first by another gate still carries the
    flag in its record."""
    cfg = rehearsal["cfg"]
    lid = cfg.score.gates.langid
    score_rej = [r for doc in rehearsal["results"]["score"] for r in doc["rejected"]]
    score_kept = [r for doc in rehearsal["results"]["score"] for r in doc["rows"]]
    assert not [r for r in score_kept if r["lang"] != SOURCE_LANG], (
        "a copied English text passed as a translation"
    )
    judged = 0
    for r in score_rej:
        rec = json.loads(r["record"])
        if (
            rec["lang"] == SOURCE_LANG
            or rec["answer"] != rec["answer_en"]  # the echo rephraser's imperfect copy was selected
            or rec.get("langid_conf") is None
            or rec["langid_chars"] < lid.min_chars
        ):
            continue
        judged += 1
        assert rec["langid_lang"] == SOURCE_LANG and "gate_langid" in rec["gate_flags"], rec["source_id"]
    assert judged > 0
    english = [r for r in score_kept if r["lang"] == SOURCE_LANG]
    assert english, "no English row survived the enforced rules and gates"


@pytest.mark.rehearsal
def test_funnel_is_reported(rehearsal, capsys):
    """The closing note's funnel: kept and rejected per stage and reason (printed; asserted consistent)."""
    m = rehearsal["manifest"]
    lines = ["stage       in   kept  rejected  reasons"]
    for stage, s in m["stages"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reasons"].items())) or "-"
        lines.append(f"{stage:<10}{s['in']:>4}{s['out']:>7}{s['rejected']:>10}  {reasons}")
    lines.append(f"samples by lang: {m['samples_by_lang']}")
    with capsys.disabled():
        print("\nproduction rehearsal funnel\n" + "\n".join(lines))
    assert sum(m["samples_by_lang"].values()) == m["stages"]["score"]["out"]


# ------------------------------------------------------------------------------------------------ oracle
ORACLE_LANGS = [
    "zho_Hans",
    "jpn_Jpan",
    "arb_Arab",
    "heb_Hebr",
    "ell_Grek",
    "hin_Deva",
    "rus_Cyrl",
    "fra_Latn",
]


@pytest.mark.parametrize("layout", ["nllb_copy_ct2", "nllb_copy_ct2_tokenizer_json"])
def test_the_translate_stage_copies_every_hostile_text_with_production_settings(models, layout, tmp_path):
    """The translate stage of configs/production.yaml (beam 4, int8, 128 input / 384 output tokens, enforce)
    on every hostile text, the 5,000-word answer included, into scripts with and without spaces, through both
    tokenizer layouts: every draft is its source, byte for byte; nothing is truncated, emptied or dropped."""
    from babelsynth.cache import Cache
    from babelsynth.stages.base import Context
    from babelsynth.stages.translate import translate

    os.environ.setdefault("VLLM_TEACHER_URL", "http://unused/v1")
    os.environ.setdefault("VLLM_LLM_URL", "http://unused/v1")
    cfg = load_config(
        PRODUCTION,
        {
            "models.translator.path": models[layout],
            "cache_dir": str(tmp_path),
            "run.languages": ORACLE_LANGS,  # every target of these rows (production draws 25% per language)
            "run.language_ratio": 1.0,
        },
    )
    texts = hostile_texts()
    rows = [
        {"source_id": name, "question": text, "answer_en": text, "filter_flags": []}
        for name, text in texts.items()
    ]
    ctx = Context(cfg, "oracle", 0, Cache(tmp_path / "c.sqlite"))
    res = translate(ctx, rows)
    assert not res.rejected, Counter(r["reason"] for r in res.rejected)
    drafts = [r for r in res.rows if r["lang"] != SOURCE_LANG]
    assert len(drafts) == len(rows) * len(ORACLE_LANGS)
    for r in drafts:
        assert r["draft_answer"] == texts[r["source_id"]], (r["source_id"], r["lang"])
        assert r["draft_prompt"] == texts[r["source_id"]] and r["filter_flags"] == []
    tr = ctx.translator()
    assert tr.stats["max_source_tokens"] == cfg.models.translator.max_input_tokens  # the run-on was chunked
    assert Path(tr.cfg.path).name == Path(models[layout]).name
