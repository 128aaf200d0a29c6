"""Translation stage on the real tiny CTranslate2 NLLB: nothing dropped, truncated or mangled; cached reruns
free.

The engine is the real one. `EngineSpy` only records what reaches it and forwards every call unchanged, so the
tests can count engine calls and read the exact source tokens independently of the translator's own counters.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from babelsynth.backends import nllb_ct2
from babelsynth.backends.nllb_ct2 import NLLBTranslator, chunk_tokens, clean_hypothesis, select_device
from babelsynth.cache import Cache
from babelsynth.config import CT2NLLBBackend
from babelsynth.languages import AYA_TARGETS, FLORES_200, SOURCE_LANG
from babelsynth.segment import reassemble, segments, split
from babelsynth.stages.base import Context
from babelsynth.stages.translate import languages_for, translate
from tests.conftest import make_config

CODE_RE = re.compile("|".join(sorted(FLORES_200)))

PROTECTED = [
    "```python\nprint('Hello world. This is code.')\nx = {'a': 1}\n```",
    "`pip install babelsynth`",
    "$E = mc^2$",
    "$$\n\\int_0^1 x\\,dx = \\frac{1}{2}\n$$",
    "\\frac{a}{b}",
    "https://example.com/docs/page_(v2)?q=1&lang=en",
    "jane.doe@example.org",
    "<answer>",
    "</answer>",
    "{user_name}",
    "%s",
    "%(count)d",
]
RICH = f"""# Results of the test

The red car is parked in front of the old library. Please read {PROTECTED[1]} first!
Install it, then run:
{PROTECTED[0]}
The energy is {PROTECTED[2]} and the area is

{PROTECTED[3]}
so the ratio is {PROTECTED[4]} in the end.
- Visit {PROTECTED[5]} for details.
- Write to {PROTECTED[6]} if it fails.
1. {PROTECTED[7]}The children are playing in the park.{PROTECTED[8]}
2. Hello {PROTECTED[9]}, you have {PROTECTED[10]} new messages and {PROTECTED[11]} files.

| Item | Price | Note |
|:-----|------:|------|
| Fresh vegetables | 12.50 | Bought at the market. |
| A cup of coffee | 3 | Every morning. |

> Thank you very much for your help.
"""


class EngineSpy:
    """Records every translate_batch call (source token lists) and forwards it to the real engine."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[list[list[str]]] = []
        self.results: list[int] = []

    def translate_batch(self, source, *args, **kw):
        self.calls.append([list(s) for s in source])
        res = self.engine.translate_batch(source, *args, **kw)
        self.results.append(len(res))
        return res


def _translator(models, cache=None, **over) -> tuple[NLLBTranslator, EngineSpy]:
    cfg = CT2NLLBBackend(
        path=models["nllb_ct2"],
        model_id="tiny-nllb-200",
        device="cpu",
        beam_size=2,
        max_decoding_length=32,
        max_input_tokens=64,
        **over,
    )
    tr = NLLBTranslator(cfg, cache)
    tr.engine = spy = EngineSpy(tr.engine)
    return tr, spy


def _source_text(tr: NLLBTranslator, tokens: list[str]) -> str:
    assert tokens[0] == SOURCE_LANG and tokens[-1] == "</s>"
    return tr.sp.decode(tokens[1:-1])


# ------------------------------------------------------------------------------------------------ pure parts


def test_device_auto_picks_cuda_int8_float16_with_a_gpu_and_cpu_int8_without():
    assert select_device("auto", None, cuda_devices=1) == ("cuda", "int8_float16")
    assert select_device("auto", None, cuda_devices=0) == ("cpu", "int8")
    assert select_device("cpu", None, cuda_devices=2) == ("cpu", "int8")
    assert select_device("auto", "float16", cuda_devices=1) == ("cuda", "float16")
    with pytest.raises(ValueError, match="no CUDA device"):
        select_device("cuda", None, cuda_devices=0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["▁the", "s", "▁cat", ",", "▁;", "ing", "▁a", ":"]), max_size=300),
    st.integers(min_value=1, max_value=40),
)
def test_chunks_cover_every_token_within_the_limit(pieces, limit):
    chunks = chunk_tokens(pieces, limit)
    assert [t for c in chunks for t in c] == pieces
    assert all(1 <= len(c) <= limit for c in chunks) or chunks == [[]]


def test_chunks_prefer_clause_then_word_boundaries():
    toks = ["▁a", "b", "▁c", ",", "▁d", "e", "▁f", "g"]
    assert chunk_tokens(toks, 5) == [["▁a", "b", "▁c", ","], ["▁d", "e", "▁f", "g"]]  # after the comma
    assert chunk_tokens(["▁a", "b", "c", "▁d", "e", "f"], 4) == [
        ["▁a", "b", "c"],
        ["▁d", "e", "f"],
    ]  # word start
    assert chunk_tokens(["▁a", "b", "c", "d", "e"], 2) == [["▁a", "b"], ["c", "d"], ["e"]]  # hard cut


def test_clean_hypothesis_drops_prefix_and_language_codes_and_reads_the_end_token():
    assert clean_hypothesis(["fra_Latn", "▁Bon", "jour", "hin_Deva", "</s>"], "fra_Latn") == (
        ["▁Bon", "jour"],
        True,
    )
    assert clean_hypothesis(["fra_Latn", "▁Bon", "fra_Latn", "jour"], "fra_Latn") == (["▁Bon", "jour"], False)
    assert clean_hypothesis([], "fra_Latn") == ([], False)


def test_each_language_takes_its_own_stable_random_subset(models, tmp_path):
    cfg = _run_config(
        models, tmp_path, **{"run.language_ratio": 0.5, "run.language_ratios": {"deu_Latn": 1.0}}
    )
    ids = [f"src-{i}" for i in range(400)]
    picked = {lang: {s for s in ids if lang in languages_for(cfg, s)} for lang in cfg.run.languages}
    assert picked["deu_Latn"] == set(ids)
    for lang in ("fra_Latn", "jpn_Jpan"):
        assert 150 < len(picked[lang]) < 250
    assert picked["fra_Latn"] != picked["jpn_Jpan"]
    assert picked == {lang: {s for s in ids if lang in languages_for(cfg, s)} for lang in cfg.run.languages}


# ------------------------------------------------------------------------------------------------ real engine


def test_protected_spans_never_reach_the_model_and_come_back_byte_identical(models):
    tr, spy = _translator(models)
    res = tr.translate_many([(RICH, lang) for lang in ("fra_Latn", "zho_Hans", "arb_Arab")])
    sent = [_source_text(tr, s) for call in spy.calls for s in call]
    assert sent, "nothing reached the engine"
    for inner in (
        "print",
        "mc^2",
        "int_0",
        "frac",
        "example",
        "jane",
        "answer",
        "user_name",
        "%",
        "pip install",
    ):
        assert not any(inner in s for s in sent), inner
    for span in PROTECTED:
        for t in res:
            assert t.text.count(span) == RICH.count(span), span
    for t in res:  # the structure comes back: lines, markers, table pipes and separator row
        out_lines, in_lines = t.text.split("\n"), RICH.split("\n")
        assert len(out_lines) == len(in_lines)
        for a, b in zip(in_lines, out_lines):
            for marker in ("# ", "- ", "1. ", "2. ", "> ", "|", "|:-----|------:|------|"):
                if a.startswith(marker):
                    assert b.startswith(marker) and a.count("|") == b.count("|"), (a, b)
        assert "12.50" in t.text and reassemble(split(RICH), t.parts) == t.text


def test_table_cells_and_list_items_are_separate_segments():
    segs = segments(RICH)
    for s in (
        "Fresh vegetables",
        "Bought at the market.",
        "Price",
        "Every morning.",
        "for details.",
        "The children are playing in the park.",
        "Thank you very much for your help.",
        "Results of the test",
    ):
        assert s in segs
    assert "12.50" not in segs and not any("|" in s for s in segs)


def test_all_23_codes_produce_output_through_the_stage_without_code_tokens(models, tmp_path):
    ctx = Context(
        _run_config(models, tmp_path, **{"run.language_ratio": 1.0}), "t", 0, Cache(tmp_path / "c.sqlite")
    )
    rows = [
        {"source_id": f"s{i}", "question": q, "answer_en": a, "filter_flags": []}
        for i, (q, a) in enumerate(
            [
                ("What is in the picture?", "A dog is sleeping under the kitchen table."),
                ("Describe the image.", "The red car is parked.\n- It is old."),
            ]
        )
    ]
    res = translate(ctx, rows)
    assert not res.rejected
    by_lang = Counter(r["lang"] for r in res.rows)
    assert by_lang == Counter({SOURCE_LANG: 2, **{lang: 2 for lang in AYA_TARGETS}})
    assert res.stats["engine_calls"] == 1  # every language of the shard in one batched call
    tr = ctx.translator()
    for r in res.rows:
        if r["lang"] == SOURCE_LANG:
            assert r["draft_answer"] is None
            continue
        assert (
            r["draft_prompt"].strip()
            and r["draft_answer"].strip()
            and r["translator_model"] == "tiny-nllb-200"
        )
        assert not CODE_RE.search(r["draft_prompt"] + r["draft_answer"]), r["lang"]
        assert r["prompt_en"] == r["question"] and "translation_truncated" in r["filter_flags"]  # report mode
        # roles kept: the prompt and the answer are translated separately, each from its own English text
        solo = tr.translate([r["question"], r["answer_en"]], r["lang"])
        assert (r["draft_prompt"], r["draft_answer"]) == (solo[0].text, solo[1].text)
        assert r["draft_answer"].count("\n- ") == r["answer_en"].count("\n- ")
    # the same inputs through the raw engine DO carry language-code tokens: the suppression is what removes
    # them
    src = [
        [SOURCE_LANG, *tr.sp.encode(a, out_type=str), "</s>"]
        for a in ("A dog is sleeping under the kitchen table.",)
    ]
    raw = nllb_ct2.load_engine(models["nllb_ct2"], "cpu", "int8", 1, 1).translate_batch(
        src * len(AYA_TARGETS),
        target_prefix=[[lang] for lang in AYA_TARGETS],
        beam_size=2,
        max_decoding_length=48,
    )
    assert any(t in FLORES_200 for r in raw for t in r.hypotheses[0][1:])


def test_truncated_outputs_are_rejected_in_enforce_mode(models, tmp_path):
    cfg = _run_config(
        models,
        tmp_path,
        **{
            "translate.mode": "enforce",
            "run.languages": ["fra_Latn", "deu_Latn"],
            "run.language_ratio": 1.0,
        },
    )
    ctx = Context(cfg, "t", 0, Cache(tmp_path / "c.sqlite"))
    rows = [
        {"source_id": "s0", "question": "Describe it.", "answer_en": "A dog is sleeping.", "filter_flags": []}
    ]
    res = translate(ctx, rows)  # the random model never emits </s> within 48 tokens
    assert [r["lang"] for r in res.rows] == [SOURCE_LANG]
    assert sorted((r["lang"], r["reason"]) for r in res.rejected) == [
        ("deu_Latn", "translation_truncated"),
        ("fra_Latn", "translation_truncated"),
    ]
    assert sorted(res.counted_in) == [("s0", "deu_Latn"), ("s0", SOURCE_LANG), ("s0", "fra_Latn")]


def _long_answer(words: int = 5000) -> str:
    """~5,000 words of distinct sentences in paragraphs, list items and a table, plus a 700-word run-on."""
    from tinymodels.corpus import corpus_lines

    vocab = sorted(
        {w.strip(".?,").lower() for s in corpus_lines((SOURCE_LANG,))[SOURCE_LANG] for w in s.split()}
    )
    rng = random.Random(7)

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 16))).capitalize() + rng.choice(".!?")

    blocks = [
        " ".join(rng.choice(vocab) for _ in range(700)).capitalize() + "."
    ]  # no punctuation to split on
    n = 700
    while n < words:
        kind = rng.random()
        if kind < 0.6:
            block = " ".join(sentence() for _ in range(rng.randint(2, 6)))
        elif kind < 0.85:
            block = "\n".join(f"- {sentence()}" for _ in range(rng.randint(2, 5)))
        else:
            block = "| A | B |\n|---|---|\n" + "\n".join(f"| {sentence()} | {sentence()} |" for _ in range(3))
        blocks.append(block)
        n += len(re.findall(r"[a-z]+", block, re.I))
    return "\n\n".join(blocks)


def test_a_5000_word_answer_is_translated_whole(models):
    text = _long_answer()
    assert len(text.split()) >= 5000
    tr, spy = _translator(models)
    segs = segments(text)
    (t,) = tr.translate([text], "deu_Latn")
    # every segment in has exactly one non-empty translation out, put back in place
    assert len(t.parts) == len(segs) and all(t.parts) and t.empty == 0
    assert reassemble(split(text), t.parts) == t.text
    # what reached the engine: every unique segment, whole, in chunks within the input limit; one result each
    assert spy.results == [len(c) for c in spy.calls] and len(spy.calls) == 1
    sent = spy.calls[0]
    assert max(map(len, sent)) <= tr.cfg.max_input_tokens
    assert len(sent) > len(set(segs)) == tr.stats["segments_translated"]  # the run-on was cut, not truncated
    pieces = Counter(p for s in sent for p in s[1:-1])
    assert pieces == Counter(p for s in set(segs) for p in tr.sp.encode(s, out_type=str))
    assert (
        t.truncated
    )  # the random model never ends within max_decoding_length: flagged, not passed as complete


def test_cache_hits_make_no_engine_call_and_duplicates_go_once(models, tmp_path):
    cache = Cache(tmp_path / "c.sqlite")
    texts = [
        "The weather is very nice today. I will call you tomorrow evening.",
        "I will call you tomorrow evening.\n- The weather is very nice today.",
    ]
    tr, spy = _translator(models, cache)
    first = tr.translate_many([(t, lang) for t in texts for lang in ("fra_Latn", "kor_Hang")])
    assert len(spy.calls) == 1 and len(spy.calls[0]) == 2 * 2  # 2 unique sentences x 2 targets, once each
    tr2, spy2 = _translator(models, cache)  # a rerun: new process state, same persistent cache
    again = tr2.translate_many([(t, lang) for t in texts for lang in ("fra_Latn", "kor_Hang")])
    assert spy2.calls == [] and [a.text for a in again] == [f.text for f in first]
    assert tr2.stats["cache_hits"] == 4 and tr2.engine_calls == 0
    tr2.translate(["The weather is very nice today. A dog is sleeping under the kitchen table."], "fra_Latn")
    assert len(spy2.calls) == 1 and [_source_text(tr2, s) for s in spy2.calls[0]] == [
        "A dog is sleeping under the kitchen table."
    ]


class EmptyOutputFault:
    """FAULT INJECTION: forwards to the real engine, then empties the output of sources holding `word`."""

    def __init__(self, engine, sp, word: str):
        self.engine, self.sp, self.word = engine, sp, word

    def translate_batch(self, source, target_prefix, **kw):
        res = self.engine.translate_batch(source, target_prefix, **kw)
        out = []
        for src, pre, raw in zip(source, target_prefix, res):
            r = raw.result() if kw.get("asynchronous") else raw
            if self.word in self.sp.decode(src[1:-1]):
                r = SimpleNamespace(hypotheses=[[pre[0], "</s>"]])
            out.append(SimpleNamespace(result=lambda r=r: r) if kw.get("asynchronous") else r)
        return out


def test_an_empty_output_is_flagged_or_rejected_not_passed_on(models, tmp_path):
    for mode in ("report", "enforce"):
        cfg = _run_config(
            models,
            tmp_path / mode,
            **{"translate.mode": mode, "run.languages": ["fra_Latn"], "run.language_ratio": 1.0},
        )
        ctx = Context(cfg, "t", 0, Cache(tmp_path / mode / "c.sqlite"))
        tr = ctx.translator()
        tr.engine = EmptyOutputFault(tr.engine, tr.sp, "sleeping")
        rows = [
            {
                "source_id": "s0",
                "question": "Describe it.",
                "answer_en": "A dog is here. It is sleeping.",
                "filter_flags": [],
            }
        ]
        res = translate(ctx, rows)
        if mode == "report":
            (row,) = [r for r in res.rows if r["lang"] == "fra_Latn"]
            assert "translation_empty" in row["filter_flags"]
        else:
            assert [(r["lang"], r["reason"]) for r in res.rejected] == [("fra_Latn", "translation_empty")]


def test_big_shards_go_to_the_engine_in_bounded_calls(models, monkeypatch):
    monkeypatch.setattr(nllb_ct2, "MAX_SEGMENTS_PER_CALL", 3)
    tr, spy = _translator(models)
    text = " ".join(f"Sentence number {w} is here." for w in "one two three four five six seven".split())
    (t,) = tr.translate([text], "ita_Latn")
    assert [len(c) for c in spy.calls] == [3, 3, 1] and len(t.parts) == 7 and all(t.parts)


def _run_config(models, tmp_path, **over):
    servers = {k: SimpleNamespace(url="http://127.0.0.1:9/v1") for k in ("teacher", "llm")}  # never contacted
    return make_config(
        models, servers, str(tmp_path / "in.parquet"), str(tmp_path / "out"), str(tmp_path / "cache"), **over
    )
