"""Rephrase answers parsed robustly; COMET QE on the real tiny CometKiwi checkpoint, long inputs by
segments; selection of rephrase vs draft with the margin."""

from __future__ import annotations

import pytest

from babelsynth.stages.rephrase import parse_translation, structure_problem
from tinymodels.corpus import CORPUS_DIR as CORPUS

FENCE = "```"


@pytest.mark.parametrize(
    "raw, finish, draft, expected",
    [
        ("<translation>Bonjour le monde.</translation>", "stop", "", ("Bonjour le monde.", "ok")),
        ("Voici :\n<translation>Bonjour le monde.", "stop", "", ("Bonjour le monde.", "ok")),  # no close tag
        ("<translation>Bonjour le mon", "length", "", (None, "truncated")),  # no close tag, cut at the limit
        (
            '< Translation lang="fr" >\n  Bonjour.\n</ translation >',
            "stop",
            "",
            ("Bonjour.", "ok"),
        ),  # attrs/space
        ("<TRANSLATION>Bonjour.</TRANSLATION>", "stop", "", ("Bonjour.", "ok")),
        (
            "Put it between <translation> and </translation>.\n<translation>Salut.</translation>",
            "stop",
            "",
            ("Salut.", "ok"),
        ),  # echoed instruction tags, then the answer: the last tag with text wins
        (
            "<translation>Brouillon.</translation> Mieux : <translation>Salut.</translation>",
            "stop",
            "",
            ("Salut.", "ok"),
        ),
        ("<translation>Salut.</translation><translation>  </translation>", "stop", "", ("Salut.", "ok")),
        (
            f"{FENCE}xml\n<translation>Salut.</translation>\n{FENCE}",
            "stop",
            "",
            ("Salut.", "ok"),
        ),  # fence around
        (
            f"<translation>\n{FENCE}\nSalut.\n{FENCE}\n</translation>",
            "stop",
            "Bonjour.",
            ("Salut.", "ok"),
        ),  # inside
        (
            f"<translation>{FENCE}py\nx = 1\n{FENCE}</translation>",
            "stop",
            f"{FENCE}py\nx = 1\n{FENCE}",
            (f"{FENCE}py\nx = 1\n{FENCE}", "ok"),
        ),  # the draft is code: its fence stays
        (
            "<translation>“Salut.”</translation>",
            "stop",
            "Bonjour.",
            ("Salut.", "ok"),
        ),  # quotes the draft lacks
        (
            "<translation>Salut.</translation>",
            "stop",
            "  Bonjour.\n",
            ("  Salut.\n", "ok"),
        ),  # draft's outer space
        ("<translation>A\n- b\n- c</translation>", "stop", "", ("A\n- b\n- c", "ok")),  # line breaks kept
        ("<translation></translation>", "stop", "", (None, "empty")),
        ("<translation>   </translation>", "length", "", (None, "empty")),
        ("Bonjour le monde.", "stop", "", (None, "no_tag")),
        ("", "length", "", (None, "no_tag")),
    ],
)
def test_parse_translation(raw, finish, draft, expected):
    assert parse_translation(raw, finish, draft) == expected


def test_structure_check_keeps_protected_spans_and_lines_but_lets_unk_go():
    src = "Run `pip install x` and open https://example.org/a?b=1 for {name}.\n- red\n- blue"
    draft = "Lancez `pip install x` et ouvrez https://example.org/a?b=1 pour {name}.\n- rouge\n- bleu"
    assert structure_problem(src, draft, draft) is None
    assert (
        structure_problem(src, draft, draft.replace("`pip install x`", "pip install x"))
        == "lost_protected_span"
    )
    assert structure_problem(src, draft, draft.replace("{name}", "{nom}")) == "lost_protected_span"
    assert structure_problem(src, draft, draft.replace("\n- bleu", ", bleu")) == "line_structure_changed"
    assert structure_problem(src, draft, draft.replace("- rouge", "* rouge")) == "line_structure_changed"
    assert structure_problem("A cat.", "Un <unk> chat.", "Un chat.") is None  # an NLLB artefact is no span


# ------------------------------------------------------------------------------------------------ COMET


def _lines(lang: str) -> list[str]:
    return [x for x in (CORPUS / f"{lang}.txt").read_text("utf-8").splitlines() if x]


@pytest.fixture(scope="module")
def scorer(models):
    from babelsynth.backends.comet_qe import CometScorer
    from babelsynth.config import CometBackend

    return CometScorer(CometBackend(path=models["comet"], model_id="tiny-cometkiwi", batch_size=8, gpus=0))


@pytest.mark.slow
def test_tiny_cometkiwi_loads_from_checkpoint_and_scores_real_batches(scorer):
    import comet

    assert isinstance(scorer.model, comet.models.UnifiedMetric) and scorer.window == 512
    en, fr, de = _lines("eng_Latn"), _lines("fra_Latn"), _lines("deu_Latn")
    pairs = list(zip(en, fr)) + list(zip(en, de))
    got = scorer.score(pairs)
    raw = scorer.model.predict(
        [{"src": s, "mt": t} for s, t in pairs], batch_size=8, gpus=0, progress_bar=False
    )
    assert got == pytest.approx(raw.scores, abs=1e-6)  # short pairs: exactly what COMET says
    assert scorer.score(pairs[::-1]) == pytest.approx(got[::-1], abs=1e-6)  # length sorting restores order


@pytest.mark.slow
def test_inputs_beyond_the_window_are_scored_by_segments_not_truncated(scorer):
    from babelsynth.backends.comet_qe import plan_chunks

    en, fr, ja = _lines("eng_Latn"), _lines("fra_Latn"), _lines("jpn_Jpan")
    src = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(en * 3))
    mt = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(fr * 3))
    assert scorer.count_tokens(src) + scorer.count_tokens(mt) > scorer.window
    plan = plan_chunks(src, mt, scorer.count_tokens, scorer.budget)
    assert len(plan) >= 2 and "".join(c.mt for c in plan) == mt and "".join(c.src for c in plan) == src
    assert all(scorer.count_tokens(c.src) + scorer.count_tokens(c.mt) <= scorer.budget for c in plan)
    # A translation whose last third is wrong (Japanese for French): COMET alone never sees that part.
    bad_tail = "\n".join(mt.split("\n")[:24] + [f"{i + 25}. {s}" for i, s in enumerate(ja)])
    raw = scorer.model.predict(
        [{"src": src, "mt": mt}, {"src": src, "mt": bad_tail}], gpus=0, progress_bar=False
    )
    assert raw.scores[0] == raw.scores[1]  # silent truncation
    before = scorer.split_pairs
    whole, tail = scorer.score([(src, mt), (src, bad_tail)])
    assert scorer.split_pairs == before + 2 and whole != pytest.approx(tail, abs=1e-7)
    weighted = sum(s * c.weight for s, c in zip(scorer.score([(c.src, c.mt) for c in plan]), plan))
    assert whole == pytest.approx(weighted / sum(c.weight for c in plan), abs=1e-6)  # length-weighted mean


@pytest.mark.slow
def test_scores_are_cached_by_content(scorer, tmp_path):
    from babelsynth.backends.comet_qe import CometScorer
    from babelsynth.cache import Cache

    cached = CometScorer(scorer.cfg, Cache(tmp_path / "c.sqlite"))
    pairs = list(zip(_lines("eng_Latn")[:4], _lines("ita_Latn")[:4]))
    first = cached.score(pairs)
    calls = cached.calls
    assert cached.score(pairs) == first and cached.calls == calls  # no model call for known pairs


@pytest.mark.slow
def test_selection_keeps_rephrase_unless_worse_by_more_than_margin(models, scorer, tmp_path, monkeypatch):
    import json

    from babelsynth.cache import Cache
    from babelsynth.config import load_config
    from babelsynth.stages.base import Context
    from babelsynth.stages.score import score

    monkeypatch.setenv("BABELSYNTH_WORK", str(tmp_path))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(tmp_path))
    en, fr, es = _lines("eng_Latn"), _lines("fra_Latn"), _lines("spa_Latn")
    rows = []
    for i in range(6):
        rows.append(
            {
                "source_id": f"s{i}",
                "lang": "fra_Latn",
                "prompt_en": en[i],
                "answer_en": en[i + 6],
                "draft_prompt": fr[i],
                "draft_answer": es[i + 6],  # a poor draft: Spanish
                "rephrase_prompt": fr[i] if i % 3 else None,
                "rephrase_answer": fr[i + 6] if i != 5 else None,
                "rephrase_status": "ok" if i % 3 and i != 5 else "no_tag",
            }
        )
    for margin in (0.0, 0.5):
        cfg = load_config(
            "configs/demo.yaml",
            {
                "models.comet.path": models["comet"],
                "score.selection_margin": margin,
                "cache_dir": str(tmp_path),
            },
        )
        ctx = Context(cfg, "t", 0, Cache(tmp_path / "c.sqlite"))
        res = score(ctx, rows)
        out = sorted(
            res.rows + [json.loads(r["record"]) for r in res.rejected], key=lambda r: r["score_index"]
        )
        for r, o in zip(rows, out):
            d = (
                scorer.score([(r["prompt_en"], r["draft_prompt"])])[0] / 2
                + scorer.score([(r["answer_en"], r["draft_answer"])])[0] / 2
            )
            assert o["comet_draft"] == pytest.approx(d, abs=1e-6)
            if r["rephrase_prompt"] is None and r["rephrase_answer"] is None:
                assert (
                    o["selected"] == "draft"
                    and o["comet_rephrase"] is None
                    and "unusable" in o["selection_reason"]
                )
                continue
            want = "rephrase" if o["comet_rephrase"] >= o["comet_draft"] - margin else "draft"
            assert o["selected"] == want, (margin, o["selection_reason"])
            assert o["comet_final"] == (o["comet_rephrase"] if want == "rephrase" else o["comet_draft"])
            if want == "rephrase":  # a part without a rephrase falls back to its draft
                assert o["prompt"] == (r["rephrase_prompt"] or r["draft_prompt"])
                assert o["answer"] == (r["rephrase_answer"] or r["draft_answer"])
        if margin == 0.5:
            assert all(
                o["selected"] == "rephrase"
                for o, r in zip(out, rows)
                if r["rephrase_answer"] or r["rephrase_prompt"]
            )


def test_token_budget_grows_with_the_text_and_never_passes_max_tokens():
    from babelsynth.stages.rephrase import BUDGET_FLOOR, token_budget

    assert token_budget(2048, 2.0, "", "") == BUDGET_FLOOR  # tags and a short answer always fit
    assert token_budget(2048, 2.0, "a" * 100, "b" * 40) == 200 + BUDGET_FLOOR  # the longer text counts
    assert token_budget(2048, 2.0, "a" * 40, "東" * 100) == 200 + BUDGET_FLOOR
    assert token_budget(2048, 2.0, "a" * 5000, "b") == 2048
    assert token_budget(2048, None, "a", "b") == 2048
