"""`babelsynth estimate`: tokens, model calls and GPU-hours per stage from a sample of the input, checked
against counts worked out by hand; the budget cap refuses a run in plan, before anything is written.

No model is involved: the estimate reads the input and the prompt files only (the slow test that counts
requests at real vLLM servers is tests/test_report.py::test_the_budget_cap_stops_a_run_before_any_model_call).
"""

from __future__ import annotations

import io
import json
import math
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from babelsynth.config import load_config
from babelsynth.estimate import BudgetExceeded, check_budget, estimate, format_estimate, sample_input
from babelsynth.languages import language_name
from babelsynth.prompts import load_prompt
from babelsynth.schema import to_table

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"  # the estimate counts images, it never decodes them
RECORDS = [
    # 18 chars -> 5 tokens; "red" -> 1 token; one image
    {
        "source_id": "r1",
        "task_type": "vqa",
        "question": "What colour is it?",
        "answer": "red",
        "images": [PNG],
    },
    # 27 chars -> 7 tokens; 13 chars -> 4 tokens; two images
    {
        "source_id": "r2",
        "task_type": "captioning",
        "question": "Describe the image briefly.",
        "answer": "A red circle.",
        "images": [PNG, PNG],
    },
    # an unknown task type is quarantined by ingest: it costs no model work
    {"source_id": "r3", "task_type": "poem", "question": "Write a poem.", "answer": "No.", "images": [PNG]},
]
OVER = {
    "run.languages": ["deu_Latn", "jpn_Jpan"],
    "run.language_ratio": 1.0,
    "run.language_ratios": {"jpn_Jpan": 0.5},
    "estimate.chars_per_token": 4,
    "estimate.image_tokens": 100,
    "estimate.recaption_tokens": 40,  # below recaption.max_tokens (96): R = 40
    "estimate.judge_keep": 0.5,
    "estimate.throughput.teacher": {
        "unit": "output_tokens",
        "per_second": 10,
        "gpus_per_replica": 2,
        "source": "t",
    },
    "estimate.throughput.judge": {"unit": "output_tokens", "per_second": 7, "source": "j"},
    "estimate.throughput.rephraser": {"unit": "output_tokens", "per_second": 3, "source": "r"},
    "estimate.throughput.translator": {"unit": "output_tokens", "per_second": 23, "source": "n"},
    "estimate.throughput.comet": {"unit": "pairs", "per_second": 2, "source": "c"},
}


def v2(r: dict) -> dict:
    """A record of RECORDS in the input schema (v2): its question and answer as one exchange."""
    turns = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
    return {
        "source_id": r["source_id"],
        "task_type": r["task_type"],
        "conversation": turns,
        "images": r["images"],
        "source": "hand",
    }


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("BABELSYNTH_WORK", str(tmp_path))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(tmp_path / "models"))
    import pyarrow.parquet as pq

    pq.write_table(to_table("input", [v2(r) for r in RECORDS]), tmp_path / "in.parquet", row_group_size=2)
    return tmp_path


def _cfg(env, **more):
    return load_config(
        ROOT / "configs" / "demo.yaml",
        {**OVER, "input_uri": str(env / "in.parquet"), "output_uri": str(env / "out"), **more},
    )


def _prompt(messages) -> int:
    """A prompt's own tokens as the estimate counts them: ceil(chars / 4) per message."""
    return sum(math.ceil(len(m["content"]) / 4) for m in messages)


def test_the_sample_is_read_from_the_input_evenly_spaced(env):
    cfg = _cfg(env)
    got = sample_input(cfg)
    assert [(r["exchanges"][0][0], r["images"]) for r in got] == [
        ("What colour is it?", 1),
        ("Describe the image briefly.", 2),
        ("Write a poem.", 1),
    ]
    assert [r["exchanges"][0][0] for r in sample_input(cfg, size=2)] == [
        "What colour is it?",
        "Write a poem.",
    ]


def test_a_later_exchange_is_one_more_request_carrying_the_conversation_before_it(env):
    """Multi-turn: each exchange is recaptioned (and judged, translated, rephrased) on its own; the second
    exchange's recaption request also carries the first exchange's question and answer."""
    cfg = _cfg(env)
    one = {"task_type": "vqa", "exchanges": [("What colour is it?", "red")], "images": 1}
    two = {**one, "exchanges": [("What colour is it?", "red"), ("And its shape?", "round")]}
    e1, e2 = estimate(cfg, [one], 1), estimate(cfg, [two], 1)
    p2 = _prompt(load_prompt("recaption", "vqa").render(question="And its shape?", answer="round"))
    history = 5 + 1  # "What colour is it?" 5 tokens, "red" 1
    assert e2.stages["recaption"].calls == 2 * e1.stages["recaption"].calls == 2
    assert e2.stages["recaption"].tokens_in == e1.stages["recaption"].tokens_in + p2 + 100 + history
    assert e2.stages["judge"].calls == 2 * e1.stages["judge"].calls


def test_tokens_calls_and_gpu_hours_match_a_hand_count(env):
    cfg = _cfg(env)
    est = estimate(cfg, sample_input(cfg), records=3)
    s = {k: v for k, v in est.stages.items()}
    R = 40
    # jobs per record: judge_keep 0.5 x (deu 1.0 + jpn 0.5)
    assert est.jobs_per_record == 0.75

    rec = s["recaption"]  # r1 and r2 (r3 is quarantined); 1 + max_regenerations (1) calls at most
    assert (rec.calls, rec.calls_max, rec.tokens_out) == (2, 4, 2 * R)
    p1 = _prompt(load_prompt("recaption", "vqa").render(question="What colour is it?", answer="red"))
    p2 = _prompt(
        load_prompt("recaption", "captioning").render(
            question="Describe the image briefly.", answer="A red circle."
        )
    )
    assert rec.tokens_in == p1 + 1 * 100 + p2 + 2 * 100

    jd = s["judge"]  # explanation (48 tokens max) then the 1-token decision, per record
    j = load_prompt("judge", "hallucination")
    dec = math.ceil(len(j.spec["decision"]) / 4)
    t1 = _prompt(j.render(question="What colour is it?", answer_gt="red", response="")) + R
    t2 = _prompt(j.render(question="Describe the image briefly.", answer_gt="A red circle.", response="")) + R
    assert (jd.calls, jd.tokens_out) == (4, 2 * (48 + 1))
    assert jd.tokens_in == (t1 + t1 + 48 + dec) + (t2 + t2 + 48 + dec)

    tr = s["translate"]  # question + recaption per job, as many out; one engine call per shard
    assert tr.tokens_in == tr.tokens_out == 0.75 * (5 + R) + 0.75 * (7 + R) == 69.0
    assert tr.calls == 1

    rp = s["rephrase"]  # 2 calls per job; writes about the draft (question tokens, R)
    assert rp.calls == 2 * 0.75 * 2 == 3.0
    assert rp.tokens_out == 0.75 * (5 + R) + 0.75 * (7 + R) == 69.0
    frame = {
        lg: _prompt(
            load_prompt("rephrase", "translation").render(source="", draft="", language=language_name(lg))
        )
        for lg in ("deu_Latn", "jpn_Jpan")
    }
    w = {"deu_Latn": 0.5, "jpn_Jpan": 0.25}
    want = sum(w[lg] * (2 * frame[lg] + 2 * q + 2 * R) for lg in w for q in (5, 7))
    assert rp.tokens_in == pytest.approx(want)

    sc = s["score"]  # draft and rephrase of prompt and answer: 4 pairs per job
    assert sc.pairs == 4 * 0.75 * 2 == 6.0
    assert sc.tokens_in == 0.75 * 2 * (2 * 5 + 2 * R) + 0.75 * 2 * (2 * 7 + 2 * R) == 276.0

    hours = {
        "recaption": 80 / 10 / 3600 * 2,
        "judge": 98 / 7 / 3600,
        "translate": 69 / 23 / 3600,
        "rephrase": 69 / 3 / 3600,
        "score": 6 / 2 / 3600,
    }
    for name, h in hours.items():
        assert s[name].gpu_hours == pytest.approx(h), name
    assert est.gpu_hours == pytest.approx(sum(hours.values()))
    assert est.cost is None


def test_llm_translation_comet_choice_and_the_safety_judge_match_a_hand_count(env):
    """German on `both`, Japanese on `llm`, the image safety check on: one LLM request per segment (the
    question's, and the recaption's at 25 tokens a sentence), NLLB only for German, COMET scoring both
    candidates of German's segments, one safety verdict per record with images."""
    chat = {"kind": "openai_http", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
    cfg = _cfg(
        env,
        **{
            "translate.backend": "llm",
            "translate.per_lang": {"deu_Latn": "both"},
            "models.llm_translator": chat,
            "models.safety_judge": chat,
            "safety.enabled": True,
            "safety.text": False,
            "safety.outputs": False,
            "estimate.throughput.llm_translator": {"unit": "output_tokens", "per_second": 5, "source": "l"},
            "estimate.throughput.safety_judge": {"unit": "output_tokens", "per_second": 41, "source": "s"},
        },
    )
    s = estimate(cfg, sample_input(cfg), records=3).stages
    R, w = 40, {"deu_Latn": 0.5, "jpn_Jpan": 0.25}
    # each question is one sentence; a 40-token recaption is ceil(40 / 25) = 2 segments: 3 requests per job
    frame = {
        lg: _prompt(load_prompt("translate", "llm").render(source="", language=language_name(lg))) for lg in w
    }
    llm = s["translate_llm"]
    assert (llm.stage, llm.engine) == ("translate", "llm_translator")
    assert llm.calls == sum(3 * w[lg] for lg in w) * 2 == 4.5
    assert llm.tokens_out == 0.75 * (5 + R) + 0.75 * (7 + R) == 69.0
    assert llm.tokens_in == pytest.approx(
        sum(3 * w[lg] * frame[lg] + w[lg] * (q + R) for lg in w for q in (5, 7))
    )
    assert llm.gpu_hours == pytest.approx(69 / 5 / 3600)
    tr = s["translate"]  # NLLB translates German only (Japanese is llm: NLLB only where an answer fails)
    assert tr.tokens_out == 0.5 * (5 + R) + 0.5 * (7 + R) == 46.0
    duel = s["translate_comet"]  # both candidates of each German segment
    assert (duel.engine, duel.pairs, duel.calls) == ("comet", 2 * 3 * 0.5 * 2, 1)
    sj = s["safety"]
    pol = load_prompt("safety", "image_policy")
    cats = cfg.safety.categories
    desc = pol.spec.get("descriptions", {})
    f1 = _prompt(pol.render(n_images=1, categories=cats, descriptions=desc))
    f2 = _prompt(pol.render(n_images=2, categories=cats, descriptions=desc))
    assert (sj.engine, sj.calls) == ("safety_judge", 2)  # r3 (quarantined) costs nothing
    assert sj.tokens_in == f1 + 100 + f2 + 200
    assert sj.tokens_out == 2 * (32 + 50)  # keys and values, and a rationale of at most 200 chars
    assert sj.gpu_hours == pytest.approx(164 / 41 / 3600)
    nllb_only = estimate(_cfg(env), sample_input(_cfg(env)), records=3).stages
    assert not {"translate_llm", "translate_comet", "safety"} & set(nllb_only)


def test_a_pool_size_scales_the_sample_and_counts_one_translate_call_per_shard(env):
    cfg = _cfg(env)
    small = estimate(cfg, sample_input(cfg), records=3)
    big = estimate(cfg, sample_input(cfg), records=3000)
    assert big.shards == math.ceil(3000 / cfg.run.shard_size) and big.stages["translate"].calls == big.shards
    pool = estimate(cfg, sample_input(cfg), records=2_290_000)  # shards grow to respect run.max_shards
    assert pool.shards == cfg.run.max_shards == pool.stages["score"].calls
    for name in ("recaption", "judge", "rephrase"):
        assert big.stages[name].tokens_out == pytest.approx(1000 * small.stages[name].tokens_out)
    assert big.gpu_hours == pytest.approx(1000 * small.gpu_hours)


def test_disabled_stages_cost_nothing(env):
    cfg = _cfg(env, **{"judge.enabled": False, "rephrase.enabled": False})
    est = estimate(cfg, sample_input(cfg), records=3)
    assert set(est.stages) == {"recaption", "translate", "score"}
    assert est.stages["score"].pairs == 2 * 0.75 * 2  # draft only: prompt and answer


def test_budget_cap_names_the_figure_the_cap_and_the_fix(env):
    cfg = _cfg(env, **{"estimate.max_gpu_hours": 0.001})
    est = estimate(cfg, sample_input(cfg), records=3)
    with pytest.raises(BudgetExceeded, match=r"GPU-hours > estimate.max_gpu_hours=0.001.*Lower run.limit"):
        check_budget(cfg, est)
    priced = _cfg(env, **{"estimate.gpu_hour_price": 100.0, "estimate.max_cost": 0.5})
    est = estimate(priced, sample_input(priced), records=3)
    assert est.cost == pytest.approx(100 * est.gpu_hours)
    with pytest.raises(BudgetExceeded, match=r"cost .* > estimate.max_cost=0.5"):
        check_budget(priced, est)
    check_budget(_cfg(env, **{"estimate.max_gpu_hours": 10}), est)  # under the cap: no error


def test_a_cost_cap_without_a_price_is_a_config_error(env):
    with pytest.raises(ValueError, match=r"estimate\.max_cost needs estimate\.gpu_hour_price"):
        _cfg(env, **{"estimate.max_cost": 5})


def test_plan_refuses_a_run_over_the_cap_before_writing_anything(env, caplog):
    from babelsynth import runner

    cfg = _cfg(env, **{"estimate.max_gpu_hours": 0.001})
    with caplog.at_level("INFO", logger="babelsynth.runner"), pytest.raises(BudgetExceeded):
        runner.plan(cfg, "capped")
    assert "total GPU-hours" in caplog.text and "budget cap: max_gpu_hours=0.001" in caplog.text
    assert not (env / "out" / "capped").exists()  # no plan, no stage: the run never started
    ok = _cfg(env)
    with caplog.at_level("INFO", logger="babelsynth.runner"):
        assert runner.plan(ok, "fine") == [0]
    plan = json.loads((env / "out" / "fine" / "_stages" / "plan.json").read_text())
    assert plan["estimate"]["gpu_hours"] == pytest.approx(
        estimate(ok, sample_input(ok), 3).gpu_hours, abs=1e-4
    )


def test_cli_prints_the_table_with_every_source(env):
    from babelsynth.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        main(
            [
                "estimate",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                "--set",
                f"input_uri={env / 'in.parquet'}",
            ]
        )
    text = out.getvalue()
    for stage in ("recaption", "judge", "translate", "rephrase", "score"):
        assert re.search(rf"^{stage}\s", text, re.M), stage
    assert "datatrove" in text and "CTranslate2/issues/1140" in text and "ASSUMPTION" in text


def test_the_documented_paper_pool_figure_is_what_the_cli_prints(tmp_path, monkeypatch):
    """docs/estimate.md shows `babelsynth estimate` for the paper's pool (2.29M records, 23 languages) on
    configs/production.yaml; the figures there must be the ones the code computes."""
    from babelsynth.cli import main
    from babelsynth.sample_data import write_samples

    monkeypatch.setenv("VLLM_TEACHER_URL", "http://gpu:8000/v1")
    monkeypatch.setenv("VLLM_LLM_URL", "http://gpu:8001/v1")
    sample = tmp_path / "samples.parquet"
    write_samples(str(sample))
    out = io.StringIO()
    with redirect_stdout(out):
        main(
            [
                "estimate",
                "--config",
                str(ROOT / "configs" / "production.yaml"),
                "--set",
                f"input_uri={sample}",
                "--records",
                "2290000",
            ]
        )
    doc = (ROOT / "docs" / "estimate.md").read_text()
    total = re.search(r"total GPU-hours: [0-9.]+", out.getvalue()).group(0)
    assert total in doc, f"docs/estimate.md is stale: the CLI prints {total!r}"
    for line in out.getvalue().splitlines()[1:8]:
        assert line in doc, f"docs/estimate.md is stale: missing {line!r}"


def test_the_estimate_table_reads_well():
    from babelsynth.estimate import Estimate, StageEstimate

    est = Estimate(
        2_290_000, 51, 256, 5.5, {"recaption": StageEstimate("recaption", "teacher", 2.29e6, 6.87e6)}
    )
    text = format_estimate(est)
    assert "2.29M" in text and "6.87M" in text
