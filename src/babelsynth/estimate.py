"""What a run will cost before it starts: tokens each stage reads and generates, model calls, GPU-hours.

Read from a sample of the input (evenly spaced records) and the config, never from a model: the plan runs
it before the first model call and refuses a run over the budget cap (estimate.max_gpu_hours /
estimate.max_cost). Per sampled record, tokens are counted as the stages will send them:

* a text counts ceil(chars / estimate.chars_per_token) tokens; a prompt counts each of its messages,
  rendered from the real template; an image counts estimate.image_tokens;
* recaption: 1 call per record (up to 1 + recaption.max_regenerations), reads its prompt and images,
  writes R = min(estimate.recaption_tokens, recaption.max_tokens) tokens;
* judge: 2 calls per record: the explanation reads its prompt plus R and writes judge.max_tokens (an
  upper bound); the decision reads all of that plus the decision turn and writes 1;
* translate: each record goes to sum(language ratios) x estimate.judge_keep languages (jobs); a job
  reads the question and the recaption (q + R tokens) and writes as many; one engine call per shard;
* rephrase: 2 calls per job (prompt and answer): each reads its prompt, the English part and the draft,
  writes about the draft's length (at most rephrase.max_tokens);
* score: 4 pairs per job (2 without rephrase), each the English part and a translation of it.

GPU-hours per stage = work / the engine's throughput (estimate.throughput.<role>: output tokens/s or
pairs/s per GPU, with its published source) x GPUs per replica. The run's figures are the sample's means
times the records the run will read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from babelsynth.config import TASK_TYPES, RunConfig
from babelsynth.languages import language_name
from babelsynth.validate import batch_rows

log = logging.getLogger(__name__)
ENGINE = {"recaption": "teacher", "judge": "judge", "translate": "translator", "rephrase": "rephraser"}
ENGINE["score"] = "comet"
SEGMENT_TOKENS = 25  # a recaption's sentence, as the translator throughput's source assumes
INPUT_COLUMNS = ("task_type", "question", "answer", "conversation", "images")


class BudgetExceeded(RuntimeError):
    """The estimate of a run is over the configured budget cap: nothing was started."""


@dataclass
class StageEstimate:
    stage: str
    engine: str
    calls: float = 0.0
    calls_max: float = 0.0
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    pairs: float = 0.0
    gpu_hours: float = 0.0

    def add(self, calls: float = 0, calls_max: float | None = None, tin: float = 0, tout: float = 0) -> None:
        self.calls += calls
        self.calls_max += calls if calls_max is None else calls_max
        self.tokens_in += tin
        self.tokens_out += tout


@dataclass
class Estimate:
    records: int
    sampled: int
    shards: int
    jobs_per_record: float
    stages: dict[str, StageEstimate] = field(default_factory=dict)
    gpu_hours: float = 0.0
    cost: float | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "sampled": self.sampled,
            "shards": self.shards,
            "jobs_per_record": round(self.jobs_per_record, 4),
            "stages": {
                n: {k: round(v, 4) if isinstance(v, float) else v for k, v in s.__dict__.items()}
                for n, s in self.stages.items()
            },
            "gpu_hours": round(self.gpu_hours, 4),
            "cost": None if self.cost is None else round(self.cost, 2),
            "sources": self.sources,
        }


def tokens(text: str, chars_per_token: float) -> int:
    return math.ceil(len(text or "") / chars_per_token)


def segments(text: str) -> int:
    """Requests the llm translation backend sends for a text: one per translatable segment."""
    from babelsynth.segment import split

    return max(1, sum(p.translate for p in split(text or "")))


def prompt_tokens(messages: list[dict], chars_per_token: float) -> int:
    return sum(tokens(m["content"], chars_per_token) for m in messages)


# ---------------------------------------------------------------------------------------------- the sample
def single_parquet(cfg: RunConfig) -> bool:
    """The input is one canonical Parquet file: its footer and columns are read directly (cheapest)."""
    return (
        cfg.input.format == "canonical"
        and isinstance(cfg.input_uri, str)
        and cfg.input_uri.endswith(".parquet")
    )


def input_records(cfg: RunConfig) -> int:
    """Records the run will read (the input's rows, bounded by run.limit): the Parquet footer, or the plan of
    any other input (inputs/plan.py: footers and indexes only)."""
    if not single_parquet(cfg):
        from babelsynth.inputs.plan import plan_input

        return plan_input(cfg)["records"]
    import pyarrow.parquet as pq

    from babelsynth import storage

    n = pq.read_metadata(storage.parquet_source(cfg.input_uri)).num_rows
    return n if cfg.run.limit is None else min(n, cfg.run.limit)


def exchanges(record: dict) -> list[tuple[str, str]]:
    """(question, answer) of each exchange: a v2 conversation's user/assistant pairs, or v1's one pair."""
    turns = record.get("conversation")
    if turns:
        users = [_text(t["content"]) for t in turns if t.get("role") == "user"]
        answers = [_text(t["content"]) for t in turns if t.get("role") == "assistant"]
        return list(zip(users, answers))
    return [(_text(record.get("question")), _text(record.get("answer")))]


def _text(value: str | bytes | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value or ""


def sample_input(cfg: RunConfig, size: int | None = None, plan: dict | None = None) -> list[dict]:
    """Evenly spaced input records (task_type, exchanges, image count): the estimate's sample.

    One canonical Parquet file: only the row groups that hold a sampled record, only those columns. Any
    other input (a directory, another format): records of evenly spaced shards of the plan, read through
    the input adapter (inputs/plan.py), then evenly spaced among them."""
    k_max = size or cfg.estimate.sample_records
    if not single_parquet(cfg):
        from babelsynth.inputs.plan import plan_input, read_shard

        plan = plan or plan_input(cfg)
        shards = plan["shards"]
        picked: list[dict] = []
        step = max(1, len(shards) // max(1, k_max))
        for s in shards[::step]:
            picked += read_shard(cfg, plan, s)
            if len(picked) >= k_max:
                break
        k = min(len(picked), k_max)
        idx = sorted({(2 * i + 1) * len(picked) // (2 * k) for i in range(k)}) if k else []
        return [
            {"task_type": r.get("task_type"), "exchanges": exchanges(r), "images": len(r.get("images") or [])}
            for r in (picked[i] for i in idx)
            if not r.get("input_error")
        ]
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from babelsynth import storage

    pf = pq.ParquetFile(storage.parquet_source(cfg.input_uri))
    names = pf.schema_arrow.names
    n = pf.metadata.num_rows if cfg.run.limit is None else min(pf.metadata.num_rows, cfg.run.limit)
    k = min(n, k_max)
    wanted = sorted({(2 * i + 1) * n // (2 * k) for i in range(k)}) if k else []  # bucket middles
    out, start, w = [], 0, 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        idx = []
        while w < len(wanted) and wanted[w] < start + rows:
            idx.append(wanted[w] - start)
            w += 1
        if idx:
            t = pf.read_row_group(g, columns=[c for c in INPUT_COLUMNS if c in names]).take(idx)
            n_img = (
                pc.list_value_length(t.column("images")).to_pylist() if "images" in names else [0] * len(idx)
            )
            rest = [  # bytes where a string is not UTF-8 (ingest quarantines it; the estimate counts it)
                row
                for b in t.drop_columns([c for c in ("images",) if c in names]).to_batches()
                for row in batch_rows(b)
            ]
            for r, m in zip(rest, n_img):
                out.append({**r, "exchanges": exchanges(r), "images": m or 0})
        start += rows
        if w >= len(wanted):
            break
    return out


# ---------------------------------------------------------------------------------------------- the model
def estimate_exchange(
    cfg: RunConfig,
    st: dict,
    prompts: tuple,
    ratios: dict,
    jobs: float,
    R: float,
    images: int,
    q: str,
    a: str,
    history: int,
) -> None:
    """The work one exchange (question, answer) of a sampled record causes in every stage; `history` is the
    tokens of the exchanges before it, which a later turn's recaption request carries."""
    rec_p, judge_p, rephrase_p, decision = prompts[:4]
    e, rc, jc, pc_ = cfg.estimate, cfg.recaption, cfg.judge, cfg.rephrase
    cpt = e.chars_per_token
    tq = tokens(q, cpt)
    tin = prompt_tokens(rec_p.render(question=q, answer=a), cpt) + images * e.image_tokens + history
    st["recaption"].add(1, 1 + rc.max_regenerations, tin, R)
    if jc.enabled:
        t1 = prompt_tokens(judge_p.render(question=q, answer_gt=a, response=""), cpt) + R
        st["judge"].add(2, None, t1 + (t1 + jc.max_tokens + decision), jc.max_tokens + 1)
    nllb_jobs = e.judge_keep * sum(r for lg, r in ratios.items() if cfg.translate.backend_for(lg) != "llm")
    st["translate"].add(0, None, nllb_jobs * (tq + R), nllb_jobs * (tq + R))
    for lg, ratio in ratios.items():
        w = e.judge_keep * ratio  # expected jobs of this language per record
        backend = cfg.translate.backend_for(lg)
        if backend != "nllb":  # one request per segment: the question's, and the recaption's sentences
            sq = segments(q)
            seg_r = math.ceil(R / SEGMENT_TOKENS)
            frame = prompt_tokens(prompts[4].render(source="", language=language_name(lg)), cpt)
            calls = w * (sq + seg_r)
            st["translate_llm"].add(calls, None, calls * frame + w * (tq + R), w * (tq + R))
            if backend == "both":  # COMET picks per segment: both candidates of each are scored
                st["translate_comet"].pairs += 2 * calls
                st["translate_comet"].tokens_in += w * 2 * (2 * tq + 2 * R)
        if pc_.enabled:
            frame = prompt_tokens(rephrase_p.render(source="", draft="", language=language_name(lg)), cpt)
            out_q, out_a = min(tq, pc_.max_tokens), min(R, pc_.max_tokens)
            st["rephrase"].add(2 * w, None, w * (2 * frame + 2 * tq + 2 * R), w * (out_q + out_a))
        per_pair = 2 if pc_.enabled else 1  # draft and rephrase of each part
        st["score"].pairs += w * 2 * per_pair
        st["score"].tokens_in += w * per_pair * (2 * tq + 2 * R)


def estimate(cfg: RunConfig, sample: list[dict], records: int, shards: int | None = None) -> Estimate:
    """The run's estimate from a sample of its input (pure: no I/O, no model)."""
    from babelsynth.prompts import load_prompt
    from babelsynth.stages.safety import RATIONALE_MAX_CHARS, policy_messages

    e = cfg.estimate
    cpt = e.chars_per_token
    rc, jc, pc_ = cfg.recaption, cfg.judge, cfg.rephrase
    if shards is None:  # as plan cuts them: shards grow so the fan-out stays within run.max_shards
        size = max(cfg.run.shard_size, math.ceil(records / cfg.run.max_shards))
        shards = max(1, math.ceil(records / size))
    ratios = {lg: cfg.run.language_ratios.get(lg, cfg.run.language_ratio) for lg in cfg.run.languages}
    jobs = e.judge_keep * sum(ratios.values())  # (record, language) pairs per input record
    R = min(e.recaption_tokens, rc.max_tokens)
    st = {name: StageEstimate(name, role) for name, role in ENGINE.items()}
    llm_langs = [lg for lg in ratios if cfg.translate.backend_for(lg) != "nllb"]
    if llm_langs:  # the llm translation backend, and COMET's per-segment choice for `both` languages
        st["translate_llm"] = StageEstimate("translate", "llm_translator")
        if any(cfg.translate.backend_for(lg) == "both" for lg in llm_langs):
            st["translate_comet"] = StageEstimate("translate", "comet")
    safety_p = None
    if cfg.safety.enabled and cfg.safety.image:  # one verdict per record with images
        st["safety"] = StageEstimate("safety", "safety_judge")
        safety_p = load_prompt("safety", "image_policy", cfg.safety.prompt_version)
    translate_p = load_prompt("translate", "llm", cfg.translate.llm.prompt_version) if llm_langs else None
    n = max(len(sample), 1)
    judge_p = load_prompt("judge", "hallucination", jc.prompt_version)
    rephrase_p = load_prompt("rephrase", "translation", pc_.prompt_version)
    decision = tokens(judge_p.spec.get("decision", ""), cpt)
    for r in sample:
        if r.get("task_type") not in TASK_TYPES:  # quarantined at ingest: no model work
            continue
        rec_p = load_prompt("recaption", r["task_type"], rc.prompt_version)
        if safety_p is not None and r["images"]:
            frame = policy_messages(safety_p, r["images"], cfg.safety.categories)
            verdict = 32 + tokens("x" * RATIONALE_MAX_CHARS, cpt)  # JSON keys, decision, category, rationale
            st["safety"].add(
                1,
                None,
                prompt_tokens(frame, cpt) + r["images"] * e.image_tokens,
                min(verdict, cfg.safety.max_tokens),
            )
        history = 0  # a later exchange is asked with the conversation so far (ground truth) before it
        for q, a in r.get("exchanges") or exchanges(r):
            prompts = (rec_p, judge_p, rephrase_p, decision, translate_p)
            estimate_exchange(cfg, st, prompts, ratios, jobs, R, r["images"], q, a, history)
            history += tokens(q, cpt) + tokens(a, cpt)
    scale = records / n
    for s in st.values():
        for k in ("calls", "calls_max", "tokens_in", "tokens_out", "pairs"):
            setattr(s, k, getattr(s, k) * scale)
    for name in ("translate", "score", "translate_comet"):  # batched engines: one call per shard
        if name in st:
            st[name].calls = st[name].calls_max = float(shards) if records else 0.0
    if not jc.enabled:
        del st["judge"]
    if not pc_.enabled:
        del st["rephrase"]
    est = Estimate(records, len(sample), shards, jobs, st)
    for s in st.values():
        tp = getattr(e.throughput, s.engine)
        work = s.pairs if tp.unit == "pairs" else s.tokens_out
        s.gpu_hours = work / tp.per_second / 3600 * tp.gpus_per_replica
        est.sources[s.engine] = f"{tp.per_second:g} {tp.unit}/s per GPU x {tp.gpus_per_replica}: {tp.source}"
    est.gpu_hours = sum(s.gpu_hours for s in st.values())
    if e.gpu_hour_price is not None:
        est.cost = est.gpu_hours * e.gpu_hour_price
    return est


def estimate_run(cfg: RunConfig, records: int | None = None, shards: int | None = None) -> Estimate:
    """Sample the input, then estimate; `records` scales the sample to another pool size."""
    return estimate(cfg, sample_input(cfg), records if records is not None else input_records(cfg), shards)


def check_budget(cfg: RunConfig, est: Estimate) -> None:
    """Raise BudgetExceeded naming the figure, the cap and what to change, when the run is over it."""
    e = cfg.estimate
    problems = []
    if e.max_gpu_hours is not None and est.gpu_hours > e.max_gpu_hours:
        problems.append(f"{est.gpu_hours:.2f} GPU-hours > estimate.max_gpu_hours={e.max_gpu_hours:g}")
    if e.max_cost is not None and est.cost is not None and est.cost > e.max_cost:
        problems.append(f"cost {est.cost:.2f} > estimate.max_cost={e.max_cost:g}")
    if problems:
        raise BudgetExceeded(
            f"run refused before any model call: estimated {'; '.join(problems)} for {est.records} records. "
            "Lower run.limit, run.languages or run.language_ratio, or raise the cap "
            "(`babelsynth estimate --config ...` shows the figures per stage)."
        )


def _num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}" if x == int(x) or abs(x) >= 10 else f"{x:.2f}"


def format_estimate(est: Estimate, cfg: RunConfig | None = None) -> str:
    """The estimate as a table (what `babelsynth estimate` prints and the plan task logs)."""
    lines = [
        f"estimate: {est.records} records ({est.sampled} sampled), {est.shards} shard(s), "
        f"{est.jobs_per_record:.2f} translations per record",
        f"{'stage':<10}{'engine':<11}{'calls':>9}{'calls max':>10}{'tokens in':>11}{'tokens out':>11}"
        f"{'pairs':>9}{'GPU-h':>10}",
    ]
    for s in est.stages.values():
        lines.append(
            f"{s.stage:<10}{s.engine:<11}{_num(s.calls):>9}{_num(s.calls_max):>10}{_num(s.tokens_in):>11}"
            f"{_num(s.tokens_out):>11}{_num(s.pairs) if s.pairs else '-':>9}{s.gpu_hours:>10.3f}"
        )
    total = f"total GPU-hours: {est.gpu_hours:.3f}"
    if est.cost is not None:
        total += f", cost: {est.cost:.2f} (at {cfg.estimate.gpu_hour_price:g} per GPU-hour)" if cfg else ""
    lines.append(total)
    if cfg is not None:
        caps = [
            f"{k}={getattr(cfg.estimate, k):g}"
            for k in ("max_gpu_hours", "max_cost")
            if getattr(cfg.estimate, k) is not None
        ]
        lines.append(f"budget cap: {', '.join(caps) if caps else 'none'}")
    lines.append("throughput (per GPU) and sources:")
    lines += [f"  {engine}: {src}" for engine, src in est.sources.items()]
    return "\n".join(lines)
