"""Quality gates on hand-written text in all 23 targets: each gate passes the good and stops the bad.

The metrics are the real ones (ICU word breaker, lexicalrichness MTLD, lingua restricted to the Aya
languages); no model is involved: gates are pure functions of the scores stored on a row. The corpus
files hold 12 hand-written sentences per language, parallel to English.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from babelsynth import metrics
from babelsynth.config import load_config
from babelsynth.languages import AYA_TARGETS, SOURCE_LANG
from babelsynth.stages.score import apply_gates, comet_thresholds, gate_results, quantile
from tests.conftest import ROOT
from tinymodels.corpus import CORPUS_DIR as CORPUS

# One more hand-written sentence per language: "The train to the city leaves every hour from platform two."
TRAIN = {
    "eng_Latn": "The train to the city leaves every hour from platform two.",
    "arb_Arab": "يغادر القطار المتجه إلى المدينة كل ساعة من الرصيف رقم اثنين.",
    "ces_Latn": "Vlak do města odjíždí každou hodinu z druhého nástupiště.",
    "deu_Latn": "Der Zug in die Stadt fährt jede Stunde von Gleis zwei ab.",
    "ell_Grek": "Το τρένο για την πόλη αναχωρεί κάθε ώρα από την αποβάθρα δύο.",
    "fra_Latn": "Le train pour la ville part toutes les heures du quai numéro deux.",
    "heb_Hebr": "הרכבת לעיר יוצאת כל שעה מרציף מספר שתיים.",
    "hin_Deva": "शहर जाने वाली ट्रेन हर घंटे प्लेटफ़ॉर्म नंबर दो से निकलती है।",
    "ind_Latn": "Kereta ke kota berangkat setiap jam dari peron dua.",
    "ita_Latn": "Il treno per la città parte ogni ora dal binario due.",
    "jpn_Jpan": "街へ行く電車は毎時二番線から出発します。",
    "kor_Hang": "시내로 가는 기차는 매시간 2번 승강장에서 출발합니다.",
    "nld_Latn": "De trein naar de stad vertrekt elk uur van spoor twee.",
    "pes_Arab": "قطار شهر هر ساعت از سکوی شماره دو حرکت می‌کند.",
    "pol_Latn": "Pociąg do miasta odjeżdża co godzinę z peronu drugiego.",
    "por_Latn": "O trem para a cidade sai a cada hora da plataforma dois.",
    "ron_Latn": "Trenul spre oraș pleacă în fiecare oră de la peronul doi.",
    "rus_Cyrl": "Поезд в город отправляется каждый час со второй платформы.",
    "spa_Latn": "El tren a la ciudad sale cada hora desde el andén dos.",
    "tur_Latn": "Şehre giden tren her saat başı ikinci perondan kalkıyor.",
    "ukr_Cyrl": "Потяг до міста вирушає щогодини з другої платформи.",
    "vie_Latn": "Chuyến tàu vào thành phố khởi hành mỗi giờ từ sân ga số hai.",
    "zho_Hans": "开往市区的火车每小时从二号站台出发。",
    "zho_Hant": "開往市區的火車每小時從二號月台出發。",
}
# Off-target: the closest language the detector could confuse (same script where there is one).
NEIGHBOUR = {
    "spa_Latn": "por_Latn",
    "por_Latn": "spa_Latn",
    "ita_Latn": "spa_Latn",
    "fra_Latn": "ita_Latn",
    "ron_Latn": "ita_Latn",
    "deu_Latn": "nld_Latn",
    "nld_Latn": "deu_Latn",
    "ces_Latn": "pol_Latn",
    "pol_Latn": "ces_Latn",
    "rus_Cyrl": "ukr_Cyrl",
    "ukr_Cyrl": "rus_Cyrl",
    "arb_Arab": "pes_Arab",
    "pes_Arab": "arb_Arab",
    "jpn_Jpan": "zho_Hans",
    "kor_Hang": "jpn_Jpan",
    "zho_Hans": "jpn_Jpan",
    "zho_Hant": "jpn_Jpan",
    "ind_Latn": "tur_Latn",
    "tur_Latn": "ind_Latn",
    "vie_Latn": "ind_Latn",
    "heb_Hebr": "arb_Arab",
    "hin_Deva": "pes_Arab",
    "ell_Grek": "rus_Cyrl",
}
# Wrong script: the right language written in another script.
WRONG_SCRIPT = {
    "zho_Hans": TRAIN["zho_Hant"],
    "zho_Hant": TRAIN["zho_Hans"],
    "hin_Deva": "Shahar jaane wali train har ghante platform number do se nikalti hai.",
    "rus_Cyrl": "Poezd v gorod otpravlyaetsya kazhdyj chas so vtoroj platformy.",
    "jpn_Jpan": "Machi e iku densha wa maiji nibansen kara shuppatsu shimasu.",
    "ell_Grek": "To treno gia tin poli anachorei kathe ora apo tin apovathra dyo.",
}


def _corpus(lang: str) -> list[str]:
    return [x for x in (CORPUS / f"{lang}.txt").read_text("utf-8").splitlines() if x]


def _join(lang: str, sents: list[str]) -> str:
    return ("" if lang in ("zho_Hans", "zho_Hant", "jpn_Jpan") else " ").join(sents)


DOC = {lang: _join(lang, _corpus(lang)) for lang in (*AYA_TARGETS, SOURCE_LANG)}


@pytest.fixture(scope="module")
def cfg():
    over = {
        f"score.gates.{g}.mode": "enforce" for g in ("comet", "mtld", "langid", "length_ratio", "repetition")
    }
    over |= {"score.gates.mtld.min": 20, "score.gates.repetition.max": 0.4}  # as configs/production.yaml
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BABELSYNTH_WORK", "/tmp/w")
        mp.setenv("BABELSYNTH_MODELS", "/tmp/m")
        return load_config("configs/demo.yaml", over)


def scored(text: str, lang: str, source: str) -> dict:
    """A row as the score stage stores it (same metric calls), without COMET."""
    cand = metrics.langid_candidates(AYA_TARGETS)
    ((lid, conf),) = metrics.langid([text], [lang], cand)
    m, n = metrics.mtld(text, lang)
    return {
        "lang": lang,
        "answer": text,
        "answer_en": source,
        "comet_final": None,
        "mtld": m,
        "mtld_tokens": n,
        "langid_lang": lid,
        "langid_conf": conf,
        "langid_chars": metrics.langid_chars(text),
        "length_ratio": None if lang == SOURCE_LANG else metrics.length_ratio(text, source),
        "repetition": metrics.repetition(text, lang),
    }


def _fails(cfg, row) -> set[str]:
    return {g for g, ok in gate_results(row, cfg, None).items() if ok is False}


@pytest.mark.parametrize("lang", AYA_TARGETS)
def test_good_document_and_sentence_pass_every_gate(cfg, lang):
    doc = scored(DOC[lang], lang, DOC[SOURCE_LANG])
    res = gate_results(doc, cfg, None)
    assert res == {"comet": None, "mtld": True, "langid": True, "length_ratio": True, "repetition": True}, doc
    assert doc["langid_lang"] == lang and doc["langid_conf"] > 0.9
    sent = scored(TRAIN[lang], lang, TRAIN[SOURCE_LANG])
    assert gate_results(sent, cfg, None) | {"mtld": True} == res, sent  # one sentence: MTLD not applicable
    assert (
        gate_results(sent, cfg, None)["mtld"] is None
        and sent["mtld_tokens"] < cfg.score.gates.mtld.min_tokens
    )


@pytest.mark.parametrize("lang", AYA_TARGETS)
def test_off_target_and_copied_english_fail_langid(cfg, lang):
    other = NEIGHBOUR[lang]
    for text in (TRAIN[other], DOC[other], TRAIN[SOURCE_LANG], DOC[SOURCE_LANG]):
        row = scored(text, lang, DOC[SOURCE_LANG])
        assert "langid" in _fails(cfg, row), (other, text, row["langid_lang"], row["langid_conf"])
        assert row["langid_lang"] != lang


@pytest.mark.parametrize("lang", sorted(WRONG_SCRIPT))
def test_wrong_script_fails_langid(cfg, lang):
    row = scored(WRONG_SCRIPT[lang], lang, TRAIN[SOURCE_LANG])
    assert "langid" in _fails(cfg, row) and row["langid_lang"] != lang, row
    if lang.startswith("zho_"):  # the right language in the wrong script scores zero
        assert (
            row["langid_lang"] == ("zho_Hant" if lang == "zho_Hans" else "zho_Hans")
            and row["langid_conf"] == 0.0
        )
    doc = (
        scored(DOC["zho_Hant" if lang == "zho_Hans" else "zho_Hans"], lang, DOC[SOURCE_LANG])
        if lang.startswith("zho_")
        else None
    )
    assert doc is None or "langid" in _fails(cfg, doc)


@pytest.mark.parametrize("lang", AYA_TARGETS)
def test_truncated_and_overlong_fail_length_ratio(cfg, lang):
    first = _corpus(lang)[0]
    truncated = scored(first, lang, DOC[SOURCE_LANG])  # NLLB kept one sentence of twelve
    assert _fails(cfg, truncated) == {"length_ratio"}, truncated
    cut = scored(TRAIN[lang][: max(2, len(TRAIN[lang]) // 3)], lang, TRAIN[SOURCE_LANG])  # cut mid-sentence
    assert "length_ratio" in _fails(cfg, cut), cut
    overlong = scored(DOC[lang], lang, _corpus(SOURCE_LANG)[0])  # a continuation the source never had
    assert "length_ratio" in _fails(cfg, overlong), overlong


@pytest.mark.parametrize("lang", AYA_TARGETS)
def test_repetition_loops_fail_and_low_diversity_fails_mtld(cfg, lang):
    toks = metrics.tokenize(TRAIN[lang], lang)
    sep = "" if lang in ("zho_Hans", "zho_Hant", "jpn_Jpan") else " "
    loop = TRAIN[lang] + sep + sep.join([sep.join(toks[:2])] * 6)  # the decoder's "sorry sorry sorry ..."
    row = scored(loop, lang, TRAIN[SOURCE_LANG] + " Thanks.")
    assert "repetition" in _fails(cfg, row) and row["repetition"] == 1.0, row
    cyclic = _join(
        lang, [_join(lang, _corpus(lang)[:1])] * 14
    )  # one sentence over and over: a loop and a poor doc
    row = scored(cyclic, lang, DOC[SOURCE_LANG])
    assert {"repetition", "mtld"} <= _fails(cfg, row), row
    assert row["mtld_tokens"] >= cfg.score.gates.mtld.min_tokens and row["mtld"] < cfg.score.gates.mtld.min


def test_im_sorry_loop_scores_one_and_fresh_text_zero():
    assert metrics.repetition("I'm sorry I'm sorry", SOURCE_LANG) == 1.0
    assert metrics.repetition("I'm sorry, but I'm not sure what you mean.", SOURCE_LANG) == 0.0
    assert metrics.repetition("very very good", SOURCE_LANG) == 0.0  # emphasis is not a loop
    assert metrics.repetition("| 0 | 0 | 0 | 0 | 0 |", SOURCE_LANG) == 0.0  # a table of zeros is not a loop
    assert (
        metrics.repetition(
            DOC["fra_Latn"] + " de la maison de la maison de la maison de la maison", "fra_Latn"
        )
        == 1.0
    )


def test_cjk_mtld_uses_real_words_not_one_blob_or_characters():
    from lexicalrichness import LexicalRichness

    assert metrics.tokenize("今天天气非常好。", "zho_Hans") == ["今天", "天气", "非常", "好"]
    assert metrics.tokenize("今日はとても良い天気です。", "jpn_Jpan")[:4] == ["今日", "は", "とても", "良い"]
    assert LexicalRichness(DOC["zho_Hans"]).mtld() == 1.0  # lexicalrichness's own splitter: one "word"
    m, n = metrics.mtld(DOC["zho_Hans"], "zho_Hans")
    assert n < len([c for c in DOC["zho_Hans"] if c.isalpha()]) and m > 50  # words, fewer than characters


def test_comet_gate_absolute_per_language_and_run_quantile(cfg):
    c = cfg.model_copy(deep=True)
    c.score.gates.comet.threshold = None
    c.score.gates.comet.quantile = 0.25
    c.score.gates.comet.per_lang = {"deu_Latn": 0.7}
    scores = {"fra_Latn": [0.1, 0.2, 0.3, 0.4, 0.5], "deu_Latn": [0.65, 0.75]}
    inside_shard = comet_thresholds(c, ["fra_Latn", "deu_Latn"])
    assert inside_shard == {"fra_Latn": None, "deu_Latn": 0.7}  # a quantile needs the whole run
    run = comet_thresholds(c, ["fra_Latn", "deu_Latn"], scores)
    assert run == {"fra_Latn": pytest.approx(0.2), "deu_Latn": 0.7}
    assert quantile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5
    rows = [
        {"lang": "fra_Latn", "source_id": str(i), "comet_final": s} for i, s in enumerate(scores["fra_Latn"])
    ]
    kept, rejected = apply_gates(rows, c, run)
    assert [r["comet_final"] for r in kept] == [0.2, 0.3, 0.4, 0.5] and [r["reason"] for r in rejected] == [
        "gate_comet"
    ]
    c.score.gates.comet.mode = "report"
    kept, rejected = apply_gates(rows, c, run)
    assert not rejected and kept[0]["gate_flags"] == ["gate_comet"] and kept[1]["gate_flags"] == []


def test_comet_gate_config_is_validated(monkeypatch):
    monkeypatch.setenv("BABELSYNTH_WORK", "/tmp/w")
    monkeypatch.setenv("BABELSYNTH_MODELS", "/tmp/m")
    with pytest.raises(ValueError, match="threshold or quantile"):
        load_config(
            "configs/demo.yaml", {"score.gates.comet.quantile": 0.1}
        )  # demo sets an absolute threshold
    with pytest.raises(ValueError, match="per_lang_quantile"):
        load_config(
            "configs/demo.yaml",
            {
                "score.gates.comet.per_lang": {"deu_Latn": 0.5},
                "score.gates.comet.per_lang_quantile": {"deu_Latn": 0.1},
            },
        )
    with pytest.raises(ValueError, match="min < max"):
        load_config("configs/demo.yaml", {"score.gates.length_ratio.per_lang": {"deu_Latn": [2.0, 1.0]}})


def test_report_mode_keeps_and_flags_enforce_mode_drops(cfg):
    bad = scored(TRAIN[SOURCE_LANG], "deu_Latn", TRAIN[SOURCE_LANG])  # English copied through
    kept, rejected = apply_gates([bad], cfg, {})
    assert not kept and rejected[0]["reason"] == "gate_langid" and rejected[0]["stage"] == "score"
    rep = cfg.model_copy(deep=True)
    rep.score.gates.langid.mode = "report"
    kept, rejected = apply_gates([bad], rep, {})
    assert not rejected and kept[0]["gate_flags"] == ["gate_langid"]


def test_language_summary_has_the_papers_shape_and_gate_pass_rates(cfg):
    from babelsynth.gating import LanguageSummary

    rows = [
        {
            "lang": "fra_Latn",
            "source_id": str(i),
            "comet_draft": d,
            "comet_rephrase": r,
            "comet_final": max(d, r),
            "selected": "rephrase" if r >= d else "draft",
            "mtld": 40.0 + i,
            "mtld_tokens": 60 if i else 10,
            "length_ratio": 1.0,
            "repetition": 0.0 if i < 3 else 0.9,
        }
        for i, (d, r) in enumerate([(0.5, 0.7), (0.6, 0.8), (0.7, 0.6), (0.4, 0.9)])
    ]
    kept, rejected = apply_gates(rows, cfg, {"fra_Latn": 0.75})  # finals 0.7 0.8 0.7 0.9; the last one loops
    s = LanguageSummary(cfg, {"fra_Latn": 0.75})
    s.add(kept, rejected)
    out = s.result()["fra_Latn"]
    assert out["rows"] == 4 and out["kept"] == 1 and [r["source_id"] for r in kept] == ["1"]
    assert out["comet_draft"] == pytest.approx(0.55) and out["comet_rephrase"] == pytest.approx(0.75)
    assert (
        out["comet_final"] == pytest.approx((0.7 + 0.8 + 0.7 + 0.9) / 4) and out["rephrase_selected"] == 0.75
    )
    assert (
        out["pass_rate"]["comet"] == 0.5
        and out["pass_rate"]["repetition"] == 0.75
        and out["comet_min"] == 0.75
    )
    assert out["pass_rate"]["langid"] is None and out["gate_rows"]["mtld"] == 3  # one doc too short for MTLD
    assert out["mtld"] == pytest.approx(42.0)


# ------------------------------------------------------------------------------------------------ regate
# Regate re-applies gates to stored scores: no model and no scoring library loads. lexicalrichness is not
# here because the re-commit writes report.html, which measures the English MTLD before/after recaption.
_MODEL_MODULES = (
    "torch",
    "comet",
    "ctranslate2",
    "transformers",
    "lingua",
    "icu4py",
    "httpx",
)


def _vllm_requests(server) -> float:
    import httpx

    text = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def _cache_rows(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as c:
        return c.execute("SELECT count(*) FROM kv").fetchone()[0]


def _regate_cli(cfg_file: Path, run_id: str, *sets: str) -> list[str]:
    """`babelsynth regate` in a fresh interpreter; returns the model libraries that process imported."""
    import json
    import subprocess
    import sys

    argv = ["regate", "--config", str(cfg_file), "--run-id", run_id] + [a for s in sets for a in ("--set", s)]
    code = (
        "import json, sys\nfrom babelsynth.cli import main\nmain(json.loads(sys.argv[1]))\n"
        f"print('LOADED=' + json.dumps(sorted(m for m in {list(_MODEL_MODULES)!r} if m in sys.modules)))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.rsplit("LOADED=", 1)[1])


def _samples(m: dict) -> dict[tuple[str, str], str]:
    import pyarrow.parquet as pq

    out = {}
    for f in m["files"]:
        if f["table"] == "samples":
            for r in pq.read_table(Path(m["path"], f["path"]), columns=["source_id", "lang"]).to_pylist():
                out[(r["source_id"], r["lang"])] = f["sha256"]
    return out


@pytest.fixture(scope="module")
def finished_run(models, vllm_servers, sample_input, tmp_path_factory):
    import yaml

    from babelsynth import runner
    from tests.conftest import make_config

    out = tmp_path_factory.mktemp("regate")
    cfg = make_config(
        models,
        vllm_servers,
        sample_input,
        str(out / "runs"),
        str(out / "cache"),
        **{
            "run.limit": 10,
            "run.shard_size": 4,
            "run.language_ratio": 1.0,
            "run.languages": ["deu_Latn", "jpn_Jpan", "zho_Hans", "zho_Hant"],
        },
    )
    manifest = runner.run_all(cfg, "regate-test")
    cfg_file = out / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, cfg_file, manifest, vllm_servers


@pytest.mark.slow
def test_regate_rewrites_kept_and_rejected_without_any_model_call(finished_run):
    import json

    import pyarrow.parquet as pq

    from babelsynth import runner, storage

    cfg, cfg_file, m0, servers = finished_run
    root = Path(m0["path"])
    assert m0["reconciliation"]["ok"] and m0["stages"]["score"]["rejected"] == 0  # demo: gates report
    lang_summary = m0["languages"]["deu_Latn"]
    assert lang_summary["rows"] == m0["samples_by_lang"]["deu_Latn"] and set(lang_summary["pass_rate"]) == {
        "comet",
        "mtld",
        "langid",
        "length_ratio",
        "repetition",
    }
    assert "quality (COMET mean draft -> final" in runner.summary(m0)
    # Expected outcome, from the stored float64 scores: per language drop comet_final < run median.
    scored = [
        r
        for s in range(m0["shards"])
        for r in runner.layout(cfg, "regate-test").read_stage_result("score", s)["rows"]
    ]
    from babelsynth.stages.score import quantile

    by_lang: dict[str, list[float]] = {}
    for r in scored:
        if r["lang"] != SOURCE_LANG:
            by_lang.setdefault(r["lang"], []).append(r["comet_final"])
    cut = {lg: quantile(v, 0.5) for lg, v in by_lang.items()}
    expect_kept = {
        (r["source_id"], r["lang"])
        for r in scored
        if r["lang"] == SOURCE_LANG or r["comet_final"] >= cut[r["lang"]]
    }
    assert 0 < len(expect_kept) < len(scored)
    before = (
        _vllm_requests(servers["teacher"]),
        _vllm_requests(servers["llm"]),
        _cache_rows(Path(cfg.cache_dir) / "requests.sqlite"),
    )
    assert min(before) > 0  # the counters are live: the run itself made requests and cached them
    loaded = _regate_cli(
        cfg_file,
        "regate-test",
        "score.gates.comet.mode=enforce",
        "score.gates.comet.threshold=null",
        "score.gates.comet.quantile=0.5",
    )
    assert loaded == []  # no model library was even imported
    after = (
        _vllm_requests(servers["teacher"]),
        _vllm_requests(servers["llm"]),
        _cache_rows(Path(cfg.cache_dir) / "requests.sqlite"),
    )
    assert after == before  # no request reached a model server, nothing new in the request cache
    m1 = json.loads((root / "manifest.json").read_text())
    assert m1["reconciliation"] == {"ok": True, "errors": []}
    assert set(_samples(m1)) == expect_kept
    assert m1["gates"]["comet_min"] == pytest.approx(cut)
    sc = m1["stages"]["score"]
    assert (
        sc["out"] == len(expect_kept)
        and sc["rejected"] == len(scored) - len(expect_kept) == sc["reasons"]["gate_comet"]
    )
    assert (
        m1["stages"]["ingest"] == m0["stages"]["ingest"]
        and m1["stages"]["translate"] == m0["stages"]["translate"]
    )
    rejected = [
        r
        for f in m1["files"]
        if f["table"] == "rejected"
        for r in pq.read_table(root / f["path"]).to_pylist()
    ]
    assert {(r["source_id"], r["lang"]) for r in rejected if r["reason"] == "gate_comet"} == {
        (r["source_id"], r["lang"]) for r in scored
    } - expect_kept
    on_disk = {str(p.relative_to(root)) for p in root.glob("samples/*/*.parquet")} | {
        str(p.relative_to(root)) for p in root.glob("rejected/*.parquet")
    }
    assert on_disk == {
        f["path"] for f in m1["files"] if f["table"] in ("samples", "rejected")
    }  # no stale file
    assert len(storage.list_prefix(str(root / "_stages" / "regate"))) == 1  # the replaced manifest is kept
    for lang, s in m1["languages"].items():
        assert (
            s["kept"] == sum(k[1] == lang for k in expect_kept) and s["rows"] == m0["languages"][lang]["rows"]
        )

    # Back to the run's own gates: the same files as the original run, byte for byte.
    assert _regate_cli(cfg_file, "regate-test") == []
    m2 = json.loads((root / "manifest.json").read_text())
    assert m2["reconciliation"]["ok"] and m2["samples_by_lang"] == m0["samples_by_lang"]
    sha = lambda m: {f["path"]: f["sha256"] for f in m["files"] if f["table"] in ("samples", "rejected")}  # noqa: E731
    assert sha(m2) == sha(m0)


@pytest.mark.slow
def test_regate_refuses_a_config_that_changes_more_than_gates(finished_run):
    from babelsynth.regate import regate

    cfg, _, _, _ = finished_run
    other = cfg.model_copy(deep=True)
    other.score.selection_margin = 0.5
    with pytest.raises(ValueError, match=r"score\.selection_margin"):
        regate(other, "regate-test")


def test_language_id_gives_the_same_answer_every_time():
    """lingua sums in hash-map order (last bits vary per call): a rerun must not change a gate's input."""
    texts = [
        "Het antwoord is 東京タワー (Tokyo Tower), 333 m hoog.",
        "Die Katze sitzt auf der Matte und schläft.",
        "Кошка сидит на коврике, а собака спит рядом.",
        "La réponse est dans le tableau : 42 %.",
        "Kedi paspasın üzerinde oturuyor ve uyuyor.",
    ]
    langs = ["nld_Latn", "deu_Latn", "rus_Cyrl", "fra_Latn", "tur_Latn"]
    cands = metrics.langid_candidates(langs)
    first = metrics.langid(texts, langs, cands)
    assert all(metrics.langid(texts, langs, cands) == first for _ in range(30))


_DEGENERATE_LANGID = """
import json, random, sys
from babelsynth import metrics
from babelsynth.languages import AYA_TARGETS
rng = random.Random(0)
pools = ["abcdežřšüéß", "λδσηθω", "КДЯвашуж", "कनटबम", "קבטעש", "شطقكم", "東京停在鲜の気を", "저를은한"]
def word(mix):  # what a random model writes: words from many alphabets, some mixing them
    ps = rng.sample(pools, 2) if rng.random() < mix else [rng.choice(pools)]
    return "".join(rng.choice("".join(ps)) for _ in range(rng.randint(1, 8)))
texts = []
for _ in range(int(sys.argv[1])):
    mix = rng.choice((0.0, 0.1, 0.3, 0.6))
    texts.append(" ".join(word(mix) for _ in range(rng.randint(2, 12))))
langs = [rng.choice(sorted(AYA_TARGETS)) for _ in texts]
print(json.dumps(metrics.langid(texts, langs, metrics.langid_candidates(langs))))
"""


def test_language_id_of_degenerate_text_is_the_same_in_every_process():
    """lingua breaks ties between alphabets in hash-map order, random per process: on text mixing alphabets
    (what a bad model writes) its answer changed between a run and its retry (CI saw a resumed run commit a
    different English shard). Four processes must agree on 300 such texts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    outs = {
        subprocess.run(
            [sys.executable, "-c", _DEGENERATE_LANGID, "300"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for _ in range(4)
    }
    assert len(outs) == 1
    found = json.loads(outs.pop())
    degenerate = sum(x == [None, 0.0] for x in found)  # no language, confidence 0
    assert 0 < degenerate < len(found) - 20  # and lingua answered the same on the others
