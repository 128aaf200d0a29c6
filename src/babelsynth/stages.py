"""The pipeline stages. Each is a function over one shard's rows with declared reads/writes columns.

Stages never touch storage: the runner loads their input, gives them a context with lazily built
backends, and writes what they return (kept rows, rejected rows with a reason code, stats).
Units: ingest, recaption and judge count English records; translate and later count (record, lang).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from babelsynth.cache import Cache
from babelsynth.config import TASK_TYPES, RunConfig
from babelsynth.filters import Candidate, check_recaption, extract_tag
from babelsynth.languages import SOURCE_LANG, language_name
from babelsynth.prompts import load_prompt

log = logging.getLogger(__name__)

VERDICT_CHOICE = {"structured_outputs": {"choice": ["YES", "NO"]}}


@dataclass
class StageResult:
    rows: list[dict]
    rejected: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    cfg: RunConfig
    run_id: str
    shard: int
    cache: Cache
    images: Callable[[], dict[str, bytes]] = lambda: {}
    _backends: dict[str, Any] = field(default_factory=dict)

    def _get(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._backends:
            self._backends[name] = build()
        return self._backends[name]

    def chat(self, role: str):
        from babelsynth.backends.chat_http import ChatClient

        return self._get(role, lambda: ChatClient(getattr(self.cfg.models, role), self.cache))

    def translator(self):
        from babelsynth.backends.nllb_ct2 import NLLBTranslator

        return self._get("translator", lambda: NLLBTranslator(self.cfg.models.translator, self.cache))

    def comet(self):
        from babelsynth.backends.comet_qe import CometScorer

        return self._get("comet", lambda: CometScorer(self.cfg.models.comet, self.cache))


def reject(row: dict, stage: str, reason: str, detail: str = "") -> dict:
    record = {k: v for k, v in row.items() if not isinstance(v, bytes)}
    return {"source_id": row.get("source_id") or "<missing>", "lang": row.get("lang"), "stage": stage,
            "reason": reason, "detail": detail, "record": json.dumps(record, ensure_ascii=False, default=str)}  # fmt: skip


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------- ingest
INGEST_READS = ("source_id", "task_type", "question", "answer", "images", "source")
INGEST_WRITES = ("source_id", "task_type", "question", "answer_gt", "image_ids", "source")


def ingest(ctx: Context, records: list[dict]) -> StageResult:
    """Validate raw input; bad records go to quarantine with a reason, never crash the shard.

    Drop reasons: missing_id, unknown_task_type, empty_text, text_too_long, missing_image, corrupt_image.
    """
    from PIL import Image

    rows, rejected, images = [], [], {}
    lim = ctx.cfg.run.max_text_chars
    for r in records:
        q, a = (r.get("question") or "").strip(), (r.get("answer") or "").strip()
        bad = None
        if not r.get("source_id"):
            bad = ("missing_id", "source_id is empty")
        elif r.get("task_type") not in TASK_TYPES:
            bad = ("unknown_task_type", f"{r.get('task_type')!r} not in {TASK_TYPES}")
        elif not q or not a:
            bad = ("empty_text", "question or answer is empty")
        elif len(q) > lim or len(a) > lim:
            bad = ("text_too_long", f"{max(len(q), len(a))} chars > max_text_chars={lim}")
        elif not r.get("images"):
            bad = ("missing_image", "no image")
        ids = []
        if bad is None:
            for data in r["images"]:
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                except Exception as e:  # PIL raises many types for bad bytes
                    bad = ("corrupt_image", f"{type(e).__name__}: {e}")
                    break
                iid = hashlib.sha256(data).hexdigest()
                images[iid] = data
                ids.append(iid)
        if bad:
            rejected.append(reject({k: v for k, v in r.items() if k != "images"}, "ingest", *bad))
            continue
        rows.append({"source_id": r["source_id"], "task_type": r["task_type"], "question": q, "answer_gt": a,
                     "image_ids": ids, "source": r.get("source") or ""})  # fmt: skip
    return StageResult(rows, rejected, {"images": images})


# ---------------------------------------------------------------- recaption (+ stage-1 rules)
RECAPTION_READS = ("source_id", "task_type", "question", "answer_gt", "image_ids")
RECAPTION_WRITES = ("answer_en", "recaption_prompt_id", "recaption_prompt_sha", "teacher_model", "filter_flags",
                    "recaption_attempts")  # fmt: skip


def recaption(ctx: Context, rows: list[dict]) -> StageResult:
    """Teacher VLM rewrites the answer anchored on the ground truth; stage-1 rules with regeneration.

    Drop reasons (enforce mode, after max_regenerations): truncated, missing_answer_tag, empty_output,
    refusal, prompt_echo, gt_contradiction.
    """
    from babelsynth.backends.chat_http import ChatRequest, user_with_images

    rc, rules = ctx.cfg.recaption, ctx.cfg.filter.rules
    teacher = ctx.chat("teacher")
    images = ctx.images()
    pending = list(range(len(rows)))
    done: dict[int, dict] = {}
    rejected = []
    flags_hist: dict[int, list[list[str]]] = {}
    for attempt in range(rules.max_regenerations + 1):
        if not pending:
            break
        reqs = []
        for i in pending:
            r = rows[i]
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            msgs = p.render(question=r["question"], answer=r["answer_gt"])
            imgs = [images[iid] for iid in r["image_ids"]]
            msgs[1] = user_with_images(msgs[1]["content"], imgs, teacher.cfg.image_max_side)
            reqs.append(ChatRequest(msgs, rc.max_tokens, rc.temperature, rc.top_p,
                                    seed=_seed(rc.seed, r["source_id"], attempt)))  # fmt: skip
        results = teacher.chat_many(reqs)
        retry = []
        for i, res in zip(pending, results):
            r = rows[i]
            if res.error:
                rejected.append(reject(r, "recaption", "teacher_request_rejected", res.error))
                continue
            text = extract_tag(res.text, "answer")
            text = res.text.strip() if text is None else text
            flags = check_recaption(Candidate(res.text, text, res.finish_reason, r["question"], r["answer_gt"]),
                                    rules.min_words)  # fmt: skip
            flags_hist.setdefault(i, []).append(flags)
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            out = {**r, "answer_en": text, "recaption_prompt_id": p.id, "recaption_prompt_sha": p.sha,
                   "teacher_model": teacher.model_id, "filter_flags": flags, "recaption_attempts": attempt + 1,
                   "recaption_tokens": res.completion_tokens}  # fmt: skip
            if not flags or rules.mode == "report":
                done[i] = out
            elif attempt < rules.max_regenerations:
                retry.append(i)
            else:
                rejected.append(reject(out, "recaption", flags[0], f"flags per attempt: {flags_hist[i]}"))
        pending = retry
    kept = [done[i] for i in sorted(done)]
    return StageResult(kept, rejected, {"requests_sent": teacher.sent, "regenerated": sum(
        1 for h in flags_hist.values() if len(h) > 1)})  # fmt: skip


# ---------------------------------------------------------------- judge (stage-2)
JUDGE_READS = ("question", "answer_gt", "answer_en")
JUDGE_WRITES = ("judge_decision", "judge_explanation")


def judge(ctx: Context, rows: list[dict]) -> StageResult:
    """Text-only LLM judge compares the recaption with the ground truth (no image).

    Turn 1 asks for a brief explanation; turn 2 asks for the decision, constrained by structured output
    to exactly YES or NO, so the verdict always parses. Drop reason: judge_rejected (explanation kept)."""
    from babelsynth.backends.chat_http import ChatRequest

    jc = ctx.cfg.filter.judge
    if not jc.enabled:
        return StageResult([{**r, "judge_decision": None, "judge_explanation": ""} for r in rows])
    client = ctx.chat("judge")
    p = load_prompt("judge", "hallucination", jc.prompt_version)
    convs = [p.render(question=r["question"], answer_gt=r["answer_gt"], response=r["answer_en"]) for r in rows]
    seeds = [_seed("judge", r["source_id"]) for r in rows]
    expl = client.chat_many([ChatRequest(m, jc.max_tokens, jc.temperature, seed=s) for m, s in zip(convs, seeds)])
    decide = [ChatRequest([*m, {"role": "assistant", "content": e.text}, {"role": "user", "content": p.spec["decision"]}],
                          4, jc.temperature, seed=s, extra=VERDICT_CHOICE) for m, e, s in zip(convs, expl, seeds)]  # fmt: skip
    kept, rejected = [], []
    for r, e, d in zip(rows, expl, client.chat_many(decide)):
        if e.error or d.error:
            rejected.append(reject(r, "judge", "judge_request_rejected", e.error or d.error))
            continue
        dec = d.text.strip().upper()
        if dec not in ("YES", "NO"):  # a server without structured outputs: fail loudly, never guess
            raise RuntimeError(f"judge returned {d.text!r}; the server must support structured outputs (choice)")
        out = {**r, "judge_decision": dec, "judge_explanation": e.text.strip()}
        if dec == "YES":
            kept.append(out)
        elif jc.mode == "report":
            kept.append({**out, "filter_flags": [*r["filter_flags"], "judge_rejected"]})
        else:
            rejected.append(reject(out, "judge", "judge_rejected", e.text.strip()))
    return StageResult(kept, rejected, {"requests_sent": client.sent})


# ---------------------------------------------------------------- translate
TRANSLATE_READS = ("source_id", "question", "answer_en")
TRANSLATE_WRITES = ("lang", "prompt_en", "draft_prompt", "draft_answer", "translator_model")


def languages_for(cfg: RunConfig, source_id: str) -> list[str]:
    """Each language draws its own random subset of the English pool (paper section 2.4), stably."""
    out = []
    for lang in cfg.run.languages:
        ratio = cfg.run.language_ratios.get(lang, cfg.run.language_ratio)
        if ratio >= 1.0 or _seed(cfg.run.seed, source_id, lang) / 0xFFFFFFFF < ratio:
            out.append(lang)
    return out


def translate(ctx: Context, rows: list[dict]) -> StageResult:
    """NLLB drafts of prompt and answer, translated separately; the English row passes through.

    Drop reasons: translation_truncated (enforce mode)."""
    by_lang: dict[str, list[dict]] = {}
    out, rejected = [], []
    for r in rows:
        out.append({**r, "lang": SOURCE_LANG, "prompt_en": r["question"], "draft_prompt": None,
                    "draft_answer": None, "translator_model": None})  # fmt: skip
        for lang in languages_for(ctx.cfg, r["source_id"]):
            by_lang.setdefault(lang, []).append(r)
    if by_lang:
        tr = ctx.translator()
        for lang, group in by_lang.items():
            texts = [t for r in group for t in (r["question"], r["answer_en"])]
            res = tr.translate(texts, lang)
            for k, r in enumerate(group):
                p, a = res[2 * k], res[2 * k + 1]
                row = {**r, "lang": lang, "prompt_en": r["question"], "draft_prompt": p.text, "draft_answer": a.text,
                       "translator_model": tr.model_id}  # fmt: skip
                if p.truncated or a.truncated:
                    if ctx.cfg.translate.truncation == "enforce":
                        rejected.append(reject(row, "translate", "translation_truncated", "hit max_decoding_length"))
                        continue
                    row["filter_flags"] = [*r["filter_flags"], "translation_truncated"]
                out.append(row)
        extra = {"engine_calls": tr.engine_calls, "segments_translated": tr.segments_translated}
    else:
        extra = {}
    assigned = Counter(r["lang"] for r in out) + Counter(r["lang"] for r in rejected)
    return StageResult(out, rejected, {**extra, "assigned": dict(assigned)})


# ---------------------------------------------------------------- rephrase
REPHRASE_READS = ("lang", "prompt_en", "answer_en", "draft_prompt", "draft_answer")
REPHRASE_WRITES = ("rephrase_prompt", "rephrase_answer", "rephrase_status", "rephraser_model")


def rephrase(ctx: Context, rows: list[dict]) -> StageResult:
    """LLM post-edit of each draft given the English original; an unparsable answer keeps the draft."""
    from babelsynth.backends.chat_http import ChatRequest

    rc = ctx.cfg.rephrase
    todo = [i for i, r in enumerate(rows) if r["lang"] != SOURCE_LANG]
    out = [dict(r, rephrase_prompt=None, rephrase_answer=None, rephrase_status="source", rephraser_model=None)
           for r in rows]  # fmt: skip
    if not rc.enabled or not todo:
        for i in todo:
            out[i]["rephrase_status"] = "disabled"
        return StageResult(out)
    client = ctx.chat("rephraser")
    p = load_prompt("rephrase", "translation", rc.prompt_version)
    reqs = []
    for i in todo:
        r = rows[i]
        for src, draft, part in ((r["prompt_en"], r["draft_prompt"], "p"), (r["answer_en"], r["draft_answer"], "a")):
            msgs = p.render(source=src, draft=draft, language=language_name(r["lang"]))
            reqs.append(ChatRequest(msgs, rc.max_tokens, rc.temperature, seed=_seed(rc.seed, r["source_id"], r["lang"], part)))
    res = client.chat_many(reqs)
    for k, i in enumerate(todo):
        statuses = []
        for j, col in ((2 * k, "rephrase_prompt"), (2 * k + 1, "rephrase_answer")):
            text = extract_tag(res[j].text, "translation")
            if res[j].error:
                statuses.append("request_rejected")
            elif text is None:
                statuses.append("no_tag")
            elif not text:
                statuses.append("empty")
            elif res[j].finish_reason == "length" and "</translation>" not in res[j].text:
                statuses.append("truncated")
            else:
                out[i][col] = text
                statuses.append("ok")
        out[i]["rephrase_status"] = "ok" if statuses == ["ok", "ok"] else ",".join(statuses)
        out[i]["rephraser_model"] = client.model_id
    return StageResult(out, [], {"requests_sent": client.sent})


# ---------------------------------------------------------------- score (selection + gates)
SCORE_READS = ("lang", "prompt_en", "answer_en", "draft_prompt", "draft_answer", "rephrase_prompt", "rephrase_answer")
SCORE_WRITES = ("prompt", "answer", "selected", "selection_reason", "comet_draft", "comet_rephrase", "comet_final",
                "mtld", "langid_conf", "length_ratio", "repetition", "gate_flags")  # fmt: skip


def _mean(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a + b) / 2


def gate_failures(row: dict, cfg: RunConfig) -> list[str]:
    """Pure: which gates this scored row fails. Re-applied offline by `babelsynth regate`."""
    g, fails = cfg.gates, []
    lang = row["lang"]
    if lang != SOURCE_LANG and row.get("comet_final") is not None:
        thr = g.comet.per_lang.get(lang, g.comet.threshold)
        if thr is not None and row["comet_final"] < thr:
            fails.append("gate_comet")
    if row.get("mtld") is not None and row.get("mtld_tokens", g.mtld.min_tokens) >= g.mtld.min_tokens:
        if row["mtld"] < g.mtld.min:
            fails.append("gate_mtld")
    if row.get("langid_conf") is not None and len(row["answer"]) >= g.langid.min_chars:
        if row["langid_conf"] < g.langid.min_conf:
            fails.append("gate_langid")
    if lang != SOURCE_LANG and row.get("length_ratio") is not None:
        if not g.length_ratio.min <= row["length_ratio"] <= g.length_ratio.max:
            fails.append("gate_length_ratio")
    if row.get("repetition") is not None and row["repetition"] > g.repetition.max:
        fails.append("gate_repetition")
    return fails


def gate_mode(cfg: RunConfig, flag: str) -> str:
    return getattr(cfg.gates, flag.removeprefix("gate_")).mode


def score(ctx: Context, rows: list[dict]) -> StageResult:
    """QE-score draft and rephrase, select, compute metrics, apply gates.

    Drop reasons (enforce mode): gate_comet, gate_mtld, gate_langid, gate_length_ratio, gate_repetition."""
    from babelsynth import metrics

    cfg = ctx.cfg
    pairs: list[tuple[str, str]] = []
    for r in rows:
        if r["lang"] == SOURCE_LANG:
            continue
        pairs += [(r["prompt_en"], r["draft_prompt"]), (r["answer_en"], r["draft_answer"])]
        if r["rephrase_prompt"] is not None and r["rephrase_answer"] is not None:
            pairs += [(r["prompt_en"], r["rephrase_prompt"]), (r["answer_en"], r["rephrase_answer"])]
    scores = dict(zip(pairs, ctx.comet().score(pairs))) if pairs else {}
    kept, rejected = [], []
    candidates = tuple(cfg.run.languages)
    for r in rows:
        out = dict(r)
        if r["lang"] == SOURCE_LANG:
            out.update(prompt=r["prompt_en"], answer=r["answer_en"], selected="source", selection_reason="english",
                       comet_draft=None, comet_rephrase=None, comet_final=None)  # fmt: skip
        else:
            d = _mean(scores[(r["prompt_en"], r["draft_prompt"])], scores[(r["answer_en"], r["draft_answer"])])
            rp = None
            if r["rephrase_prompt"] is not None and r["rephrase_answer"] is not None:
                rp = _mean(scores[(r["prompt_en"], r["rephrase_prompt"])], scores[(r["answer_en"], r["rephrase_answer"])])
            if rp is None:
                sel, why = "draft", f"rephrase unusable ({r['rephrase_status']})"
            elif rp >= d - cfg.rephrase.selection_margin:
                sel, why = "rephrase", f"rephrase QE {rp:.4f} >= draft {d:.4f} - margin {cfg.rephrase.selection_margin}"
            else:
                sel, why = "draft", f"rephrase QE {rp:.4f} < draft {d:.4f} - margin {cfg.rephrase.selection_margin}"
            if sel == "rephrase":
                out.update(prompt=r["rephrase_prompt"], answer=r["rephrase_answer"], comet_final=rp)
            else:
                out.update(prompt=r["draft_prompt"], answer=r["draft_answer"], comet_final=d)
            out.update(selected=sel, selection_reason=why, comet_draft=d, comet_rephrase=rp)
        m, n_tok = metrics.mtld(out["answer"], r["lang"])
        out.update(
            mtld=m, mtld_tokens=n_tok,
            langid_conf=metrics.langid_confidence(out["answer"], r["lang"], candidates),
            length_ratio=None if r["lang"] == SOURCE_LANG else metrics.length_ratio(out["answer"], r["answer_en"]),
            repetition=metrics.repetition(out["answer"], r["lang"]),
        )  # fmt: skip
        fails = gate_failures(out, cfg)
        enforced = [f for f in fails if gate_mode(cfg, f) == "enforce"]
        out["gate_flags"] = [f for f in fails if f not in enforced]
        if enforced:
            rejected.append(reject(out, "score", enforced[0], f"failed gates: {enforced}"))
        else:
            kept.append(out)
    return StageResult(kept, rejected, {"comet_pairs": len(pairs)})


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Context, list[dict]], StageResult]
    reads: tuple[str, ...]
    writes: tuple[str, ...]


STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest, INGEST_READS, INGEST_WRITES),
    Stage("recaption", recaption, RECAPTION_READS, RECAPTION_WRITES),
    Stage("judge", judge, JUDGE_READS, JUDGE_WRITES),
    Stage("translate", translate, TRANSLATE_READS, TRANSLATE_WRITES),
    Stage("rephrase", rephrase, REPHRASE_READS, REPHRASE_WRITES),
    Stage("score", score, SCORE_READS, SCORE_WRITES),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}
