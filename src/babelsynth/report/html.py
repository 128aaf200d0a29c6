"""report.html: one self-contained page (inline CSS, plots and thumbnails as data URLs, no script) whose
Content-Security-Policy forbids every fetch, so it reads the same offline and can never call out."""

from __future__ import annotations

import time

import jinja2

from babelsynth.languages import SOURCE_LANG, language_name
from babelsynth.progress import duration
from babelsynth.report import paper, plots
from babelsynth.report.collect import ReportData, record_text

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STAGE_UNITS = {  # later stages: record x language
    "ingest": "records",
    "safety_pre": "records",
    "recaption": "records",
    "safety_post": "records",
    "judge": "records",
}


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "–"


def _num(x, p: int = 3) -> str:
    """A number for a cell; anything else (None, a field a manifest of other code lacks) is a dash."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{p}f}"


def _rate(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def funnel_rows(m: dict) -> list[dict]:
    out = []
    for name, s in (m.get("stages") or {}).items():
        n_in = s.get("in", 0)
        reasons = sorted((s.get("reasons") or {}).items(), key=lambda kv: -kv[1])
        out.append(
            {
                "stage": name,
                "unit": STAGE_UNITS.get(name, "record x language"),
                "in": n_in,
                "out": s.get("out", 0),
                "rejected": s.get("rejected", 0),
                "rejected_share": _rate(s.get("rejected", 0), n_in),
                "reasons": [(r, c, _rate(c, n_in)) for r, c in reasons],
            }
        )
    return out


def language_funnel(m: dict, d: ReportData) -> list[dict]:
    stages = m.get("stages") or {}
    langs = sorted({lg for s in stages.values() for lg in s.get("by_lang", {})})
    rows = []
    for lg in langs:
        assigned = max(s.get("by_lang", {}).get(lg, {}).get("in", 0) for s in stages.values())
        kept = (m.get("samples_by_lang") or {}).get(lg, 0)
        reasons = sorted(
            ((f"{st}/{r}", c) for (st, r, lang), c in d.rejected_by.items() if (lang or SOURCE_LANG) == lg),
            key=lambda kv: -kv[1],
        )
        rows.append(
            {
                "lang": lg,
                "name": language_name(lg),
                "assigned": assigned,
                "kept": kept,
                "kept_share": _rate(kept, assigned),
                "by_stage": {
                    n: s.get("by_lang", {}).get(lg, {}).get("rejected", 0) for n, s in stages.items()
                },
                "reasons": [(r, c, _rate(c, assigned)) for r, c in reasons],
            }
        )
    return rows


def safety_table(m: dict) -> tuple[list[str], list[dict]]:
    """Safety drops per language and category, from the stages' `safety_drops` (stages/safety.py): the
    categories seen, and one row per language with its count per category, per stage and in total."""
    stages = m.get("stages") or {}
    per: dict[str, dict] = {}
    cats: set[str] = set()
    for name, s in stages.items():
        for lg, by_cat in (s.get("safety_drops") or {}).items():
            row = per.setdefault(lg, {"lang": lg, "by_category": {}, "by_stage": {}, "total": 0})
            for cat, n in by_cat.items():
                cats.add(cat)
                row["by_category"][cat] = row["by_category"].get(cat, 0) + n
                row["by_stage"][name] = row["by_stage"].get(name, 0) + n
                row["total"] += n
    return sorted(cats), [per[lg] for lg in sorted(per)]


def quality_rows(m: dict, d: ReportData, gates: tuple[str, ...]) -> list[dict]:
    rows = []
    for lg, s in sorted((m.get("languages") or {}).items()):
        means = d.means.get(lg, {})
        ref = paper.COMET.get(lg)
        rows.append(
            {
                "lang": lg,
                "rows": s.get("rows"),
                "kept": s.get("kept"),
                "comet_draft": s.get("comet_draft"),
                "comet_final": s.get("comet_final"),
                "paper": ref,
                "rephrase_win": None if lg == SOURCE_LANG else s.get("rephrase_selected"),
                "mtld": s.get("mtld"),
                "langid_pass": (s.get("pass_rate") or {}).get("langid"),
                "length_ratio": means.get("length_ratio"),
                "repetition": means.get("repetition"),
                "pass": [(s.get("pass_rate") or {}).get(g) for g in gates],
            }
        )
    return rows


def recaption_rows(m: dict) -> list[dict]:
    allt = (((m.get("stages") or {}).get("recaption") or {}).get("by_task") or {}).get("all") or {}
    out = []
    for metric, (p_before, p_after) in paper.RECAPTION.items():
        out.append(
            {
                "metric": metric,
                "before": allt.get(f"{metric}_before_mean"),
                "after": allt.get(f"{metric}_after_mean"),
                "paper_before": p_before,
                "paper_after": p_after,
            }
        )
    return out


def perf_rows(m: dict) -> list[dict]:
    out = []
    for name, s in (m.get("stages") or {}).items():
        u = s.get("usage") or {}
        sec = s.get("seconds") or 0
        out.append(
            {
                "stage": name,
                "seconds": sec,
                "records_s": _rate(s.get("in"), sec),
                "tokens_in_s": _rate(u.get("tokens_in"), sec) if u else None,
                "tokens_out_s": _rate(u.get("tokens_out"), sec) if u else None,
                "model_calls": u.get("model_calls"),
                "tokens_in": u.get("tokens_in"),
                "tokens_out": u.get("tokens_out"),
                "cache_hit_rate": _rate(u.get("cache_hits"), u.get("cache_lookups")),
                "cache_lookups": u.get("cache_lookups"),
            }
        )
    return out


def translator_rows(m: dict) -> list[dict]:
    """Per language: the translate backend (translate.backend / per_lang) and how many segments NLLB and the
    LLM each won (llm_failed: LLM answers unusable, NLLB used instead). Empty for an NLLB-only run."""
    tc = ((m.get("config") or {}).get("translate")) or {}
    by_lang = (((m.get("stages") or {}).get("translate")) or {}).get("translator_by_lang") or {}
    rows = []
    for lang, c in sorted(by_lang.items()):
        backend = (tc.get("per_lang") or {}).get(lang, tc.get("backend", "nllb"))
        n = c.get("nllb", 0) + c.get("llm", 0)
        rows.append(
            {
                "lang": lang,
                "backend": backend,
                "segments": n,
                "nllb": c.get("nllb", 0),
                "llm": c.get("llm", 0),
                "llm_failed": c.get("llm_failed", 0),
                "llm_share": _rate(c.get("llm", 0), n),
            }
        )
    return rows if any(r["backend"] != "nllb" for r in rows) else []


def _bands(m: dict) -> tuple[dict, tuple[float, float]]:
    lr = ((((m.get("lineage") or {}).get("thresholds") or {}).get("score") or {}).get("gates") or {}).get(
        "length_ratio"
    ) or ((((m.get("config") or {}).get("score") or {}).get("gates") or {}).get("length_ratio") or {})
    return {k: tuple(v) for k, v in (lr.get("per_lang") or {}).items()}, (
        lr.get("min", 0.3),
        lr.get("max", 3.0),
    )


def _gates(m: dict) -> tuple[str, ...]:
    names: list[str] = []
    for s in (m.get("languages") or {}).values():
        names += [g for g in (s.get("pass_rate") or {}) if g not in names]
    return tuple(names)


def render(d: ReportData) -> str:
    m = d.manifest
    gates = _gates(m)
    bands, default_band = _bands(m)
    alarms = m.get("alarms") or {}
    comparison = m.get("comparison") or {}
    planned, created = m.get("planned_unix"), m.get("created_unix")
    figures = [
        ("Funnel", plots.funnel(m)),
        ("COMET by language", plots.comet_by_language(d)),
        ("Gate pass rates", plots.gate_pass_rates(m, gates)),
        ("MTLD before/after recaption", plots.mtld_before_after(d)),
        ("Answer lengths", plots.answer_lengths(d)),
        ("Length ratios", plots.length_ratios(d, bands, default_band)),
    ]
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.ChainableUndefined
    )  # tolerant: runs of other code
    env.filters.update(pct=_pct, num=_num, name=language_name, text=record_text, duration=duration)
    return env.from_string(TEMPLATE).render(
        m=m,
        csp=CSP,
        when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created)) if created else "–",
        wall=(created - planned) if planned and created else None,
        kept=sum((m.get("samples_by_lang") or {}).values()),
        funnel=funnel_rows(m),
        lang_funnel=language_funnel(m, d),
        safety=safety_table(m),
        safety_on=(m.get("config") or {}).get("safety", {}).get("enabled", False),
        stage_names=list(m.get("stages") or {}),
        quality=quality_rows(m, d, gates),
        gates=gates,
        recaption=recaption_rows(m),
        perf=perf_rows(m),
        translators=translator_rows(m),
        figures=[(t, u) for t, u in figures if u],
        previews=d.previews,
        thumbs=d.thumbs,
        rejected=sorted(d.rejected_examples.items()),
        alarms=alarms,
        comparison=comparison,
        paper_mean=paper.COMET_MEAN,
        paper_source=paper.SOURCE,
        lineage=m.get("lineage") or {},
    )


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{{ csp }}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>babelsynth run {{ m.run_id }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2a3a;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header .sub{opacity:.8;font-size:13px;word-break:break-all}
main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;margin:16px 0;padding:14px 18px}
h2{font-size:17px;margin:2px 0 10px}h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border-bottom:1px solid #e6e9ee;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#f0f4f9;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px}.ok{color:#1d7a46}.bad{color:#b3261e}.warn{color:#9a6700}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.badge.ok{background:#dcf2e4}.badge.bad{background:#fbe0dd}.badge.warn{background:#fdf1d0}
.ref{color:#6b7480;font-size:11.5px}figure{margin:10px 0}figure img{max-width:100%;border:1px solid #eee}
.pv{display:grid;grid-template-columns:170px repeat(auto-fit,minmax(200px,1fr));gap:10px;margin:10px 0;
border-top:1px solid #e6e9ee;padding-top:10px}.pv>div{min-width:0}
.pv .t{white-space:pre-wrap;overflow-wrap:anywhere;font-size:12.5px}
.pv .lg{font-weight:600;font-size:12px;color:#445}.mono{font-family:ui-monospace,monospace;font-size:12px}
.noimg{width:150px;height:80px;background:#eef0f3;color:#778;font-size:11px;display:flex;align-items:center;
justify-content:center;text-align:center}details summary{cursor:pointer;font-weight:600}
</style></head><body>
<header><h1>babelsynth run {{ m.run_id }}</h1>
<div class="sub">{{ m.path }} · committed {{ when }}
{% if wall is not none %} · wall time (plan to commit) {{ wall|duration }}{% endif %}
{% if m.series is defined %} · series {{ m.series }}{% endif %}</div></header>
<main>
<section><h2>At a glance</h2><div class="cards">
<div class="card">input records<b>{{ m.input_records|num }}</b></div>
<div class="card">kept rows<b>{{ kept|num }}</b></div>
<div class="card">languages<b>{{ (m.samples_by_lang or {})|length }}</b></div>
<div class="card">rejected rows<b>{{ m.rejected_total|num }}</b></div>
<div class="card">images<b>{{ m.images|num }}</b></div>
<div class="card">shards<b>{{ m.shards|num }}</b></div>
<div class="card">counts reconcile<b class="{{ 'ok' if (m.reconciliation or {}).ok else 'bad' }}">
{{ 'yes' if (m.reconciliation or {}).ok else 'NO' }}</b></div>
<div class="card">alarms<b class="{{ 'bad' if alarms.failed else ('warn' if alarms.fired else 'ok') }}">
{{ 'FAILED' if alarms.failed else ('warned' if alarms.fired else 'passed') }}</b></div>
</div></section>

<section id="nightly"><h2>Compared with the previous run</h2>
{% if alarms.fired %}<ul>{% for a in alarms.fired %}
<li class="{{ 'bad' if a.action == 'fail' else 'warn' }}">{{ a.message }}</li>{% endfor %}</ul>
{% elif alarms.rules is defined %}<p class="ok">{{ alarms.rules }} alarm rule(s) checked, none fired.</p>
{% endif %}
{% if not comparison.get('baseline') %}
<p>No earlier committed run of this series under this output root: nothing to
compare with.</p>{% else %}
<p>Baseline: <b>{{ comparison.baseline.run_id }}</b>
<span class="ref">{{ comparison.baseline.path }}</span></p>
<table><tr><th class="l">language</th><th>rows</th><th>Δ rows</th><th>kept share</th><th>Δ</th>
<th>COMET final</th><th>Δ</th><th>MTLD</th><th>Δ</th>{% for g in gates %}<th>pass {{ g }}</th><th>Δ</th>
{% endfor %}</tr>
{% for lang, mets in comparison.languages.items() %}<tr><td class="l">{{ lang }}</td>
{% for key, p in [("rows", 0), ("kept_share", 3), ("comet_final", 4), ("mtld", 1)] %}
{% set v = mets.get(key, {}) %}<td>{{ v.get("current")|num(p) }}</td>
<td class="{{ 'bad' if (v.get('delta') or 0) < 0 else '' }}">
{% if v.get("delta") is not none %}{{ "%+.*f"|format(p, v.delta) }}{% else %}–{% endif %}</td>{% endfor %}
{% for g in gates %}{% set v = mets.get("pass_rate." ~ g, {}) %}<td>{{ v.get("current")|pct }}</td>
<td class="{{ 'bad' if (v.get('delta') or 0) < 0 else '' }}">
{% if v.get("delta") is not none %}{{ "%+.1f"|format(100 * v.delta) }}{% else %}–{% endif %}</td>
{% endfor %}
</tr>{% endfor %}</table>
{% for title, key in [("Models changed", "models_changed"), ("Model revisions changed", "revisions_changed"),
  ("Prompts changed (sha256)", "prompts_changed"), ("Config changed", "config_changed")] %}
{% if comparison.get(key) %}<h3>{{ title }}</h3><table><tr><th class="l">key</th>
<th class="l">previous</th><th class="l">now</th></tr>
{% for k, (a, b) in comparison[key].items() %}<tr><td class="l mono">{{ k }}</td>
<td class="l mono">{{ a }}</td><td class="l mono">{{ b }}</td></tr>{% endfor %}</table>{% endif %}
{% endfor %}{% endif %}</section>

<section id="funnel"><h2>Funnel per stage</h2>
<table><tr><th class="l">stage</th><th class="l">unit</th><th>in</th><th>kept</th><th>rejected</th>
<th>share</th><th class="l">reasons (count, share of in)</th></tr>
{% for r in funnel %}<tr><td class="l">{{ r.stage }}</td><td class="l ref">{{ r.unit }}</td>
<td>{{ r.in|num }}</td><td>{{ r.out|num }}</td>
<td>{{ r.rejected|num }}</td><td>{{ r.rejected_share|pct }}</td>
<td class="l">{% for reason, c, s in r.reasons %}
<span class="mono">{{ reason }}</span> {{ c }} ({{ s|pct }}){% if not loop.last %}, {% endif %}
{% else %}–{% endfor %}</td></tr>{% endfor %}
</table>
<h3>Per language</h3>
<table><tr><th class="l">language</th><th>assigned</th><th>kept</th><th>kept share</th>
{% for s in stage_names %}<th>rejected at {{ s }}</th>{% endfor %}
<th class="l">reasons (count, share of assigned)</th></tr>
{% for r in lang_funnel %}<tr><td class="l">{{ r.lang }} <span class="ref">{{ r.name }}</span></td>
<td>{{ r.assigned|num }}</td><td>{{ r.kept|num }}</td><td>{{ r.kept_share|pct }}</td>
{% for s in stage_names %}<td>{{ r.by_stage[s]|num }}</td>{% endfor %}
<td class="l">{% for reason, c, s in r.reasons %}
<span class="mono">{{ reason }}</span> {{ c }} ({{ s|pct }}){% if not loop.last %}, {% endif %}
{% else %}–{% endfor %}</td></tr>{% endfor %}
</table></section>

<section id="safety"><h2>Safety drops per language and category</h2>
{% if not safety_on %}<p class="ref">safety stages off in this run's config (safety.enabled)</p>
{% elif not safety[1] %}<p>No row dropped by the safety stages.</p>
{% else %}<table><tr><th class="l">language</th>{% for c in safety[0] %}<th>{{ c }}</th>{% endfor %}
<th>total</th><th class="l">by stage</th></tr>
{% for r in safety[1] %}<tr><td class="l">{{ r.lang }} <span class="ref">{{ r.lang|name }}</span></td>
{% for c in safety[0] %}<td>{{ r.by_category.get(c, 0) }}</td>{% endfor %}<td>{{ r.total }}</td>
<td class="l">{% for s, n in r.by_stage.items() %}{{ s }} {{ n }}{% if not loop.last %}, {% endif %}
{% endfor %}</td></tr>{% endfor %}</table>{% endif %}</section>

<section id="quality"><h2>Quality per language</h2>
<p class="ref">Over every scored row (kept, and dropped by a gate). Paper: {{ paper_source }},
CometKiwi NLLB draft → rephrased
(means {{ paper_mean[0] }} → {{ paper_mean[1] }}).</p>
<table><tr><th class="l">language</th><th>scored</th><th>kept</th><th>COMET draft</th><th>COMET final</th>
<th>paper draft → rephrased</th>
<th>rephrase win</th><th>MTLD</th><th>lang-ID pass</th><th>length ratio</th><th>repetition</th>
{% for g in gates %}<th>pass {{ g }}</th>{% endfor %}</tr>
{% for r in quality %}<tr><td class="l">{{ r.lang }}</td><td>{{ r.rows|num }}</td>
<td>{{ r.kept|num }}</td><td>{{ r.comet_draft|num(4) }}</td><td>{{ r.comet_final|num(4) }}</td>
<td class="ref">{% if r.paper %}{{ r.paper[0] }} → {{ r.paper[1] }}{% else %}–{% endif %}</td>
<td>{{ r.rephrase_win|pct }}</td><td>{{ r.mtld|num(1) }}</td>
<td>{{ r.langid_pass|pct }}</td><td>{{ r.length_ratio|num(2) }}</td><td>{{ r.repetition|num(3) }}</td>
{% for p in r.pass %}<td>{{ p|pct }}</td>{% endfor %}</tr>{% endfor %}</table>
<h3>English recaption (the teacher's effect)</h3>
<table><tr><th class="l">metric (mean per answer)</th><th>ground truth</th><th>recaption</th>
<th>paper before → after</th></tr>
{% for r in recaption %}<tr><td class="l">{{ r.metric }}</td><td>{{ r.before|num(1) }}</td>
<td>{{ r.after|num(1) }}</td>
<td class="ref">{{ r.paper_before }} → {{ r.paper_after }}</td></tr>{% endfor %}</table></section>

{% if translators %}<section id="translators"><h2>Translation backend per language</h2>
<p class="ref">Unique segments per language and the backend whose translation was kept: with both, the one
with the higher COMET QE score; LLM answers that could not be used (no tags, empty, cut) fell back to
NLLB.</p>
<table><tr><th class="l">language</th><th class="l">backend</th><th>segments</th><th>NLLB won</th>
<th>LLM won</th><th>LLM share</th><th>LLM failed → NLLB</th></tr>
{% for r in translators %}<tr><td class="l">{{ r.lang }} <span class="ref">{{ r.lang|name }}</span></td>
<td class="l">{{ r.backend }}</td><td>{{ r.segments|num }}</td><td>{{ r.nllb|num }}</td>
<td>{{ r.llm|num }}</td>
<td>{{ r.llm_share|pct }}</td><td>{{ r.llm_failed|num }}</td></tr>{% endfor %}</table></section>{% endif %}

<section id="plots"><h2>Distributions</h2>
{% for title, url in figures %}<figure><img src="{{ url }}" alt="{{ title }}"></figure>{% endfor %}
</section>

<section id="samples"><h2>Samples</h2>
{% for p in previews %}{% set e = p.english %}<div class="pv"><div>
{% for iid in (e.image_ids or [])[:2] %}{% if iid in thumbs %}
<img src="{{ thumbs[iid] }}" alt="image {{ iid[:12] }}">{% endif %}{% endfor %}
<div class="ref mono">{{ e.source_id }}<br>{{ e.task_type }}</div></div>
<div><div class="lg">eng_Latn · question</div><div class="t">{{ e.prompt }}</div>
<div class="lg">ground truth</div><div class="t">{{ e.answer_gt }}</div>
<div class="lg">recaption</div><div class="t">{{ e.answer|truncate(900) }}</div></div>
{% for t in p.targets %}<div>
<div class="lg">{{ t.lang }} · {{ t.lang|name }} · {{ t.selected }}
 · COMET {{ t.comet_final|num(3) }}</div>
<div class="t">{{ t.prompt|truncate(300) }}</div><hr><div class="t">{{ t.answer|truncate(700) }}</div>
{% if t.gate_flags %}<div class="ref">flags: {{ t.gate_flags|join(", ") }}</div>{% endif %}</div>
{% endfor %}
</div>{% endfor %}
<h3>Rejected, per reason</h3>
{% for (stage, reason), exs in rejected %}<details open><summary>{{ stage }} / {{ reason }}</summary>
{% for ex in exs %}{% set rec = ex.record %}<div class="pv"><div>
{% set ids = rec.image_ids or [] %}{% if ids and ids[0] in thumbs %}
<img src="{{ thumbs[ids[0]] }}" alt="image {{ ids[0][:12] }}">
{% else %}<div class="noimg">image not in the release</div>{% endif %}
<div class="ref mono">{{ ex.source_id }} {{ ex.lang or "" }}</div></div>
<div><div class="lg">detail</div><div class="t">{{ ex.detail[:600] }}</div></div>
<div><div class="lg">text</div><div class="t">{{ (rec|text)[:800] }}</div></div></div>{% endfor %}</details>
{% else %}<p>No row was rejected.</p>{% endfor %}</section>

<section id="performance"><h2>Time, throughput, model calls, cache</h2>
<p class="ref">Seconds are summed over shards (the work), not the run's wall time;
tokens are what reached a model
(cache hits excluded).</p>
<table><tr><th class="l">stage</th><th>seconds</th><th>rows in/s</th><th>tokens in/s</th>
<th>tokens out/s</th><th>model calls</th>
<th>tokens in</th><th>tokens out</th><th>cache lookups</th><th>cache hit rate</th></tr>
{% for r in perf %}<tr><td class="l">{{ r.stage }}</td><td>{{ r.seconds|num(1) }}</td>
<td>{{ r.records_s|num(2) }}</td>
<td>{{ r.tokens_in_s|num(1) }}</td><td>{{ r.tokens_out_s|num(1) }}</td><td>{{ r.model_calls|num }}</td>
<td>{{ r.tokens_in|num }}</td>
<td>{{ r.tokens_out|num }}</td><td>{{ r.cache_lookups|num }}</td><td>{{ r.cache_hit_rate|pct }}</td></tr>
{% endfor %}</table></section>

<section id="lineage"><h2>Lineage</h2>
<table><tr><th class="l">config fingerprint</th><td class="l mono">{{ m.config_fingerprint }}</td></tr>
<tr><th class="l">code version</th><td class="l mono">{{ lineage.code_version or "–" }}</td></tr>
{% for role, mm in (lineage.models or {}).items() %}<tr><th class="l">{{ role }}</th>
<td class="l mono">{{ mm.id }} · {{ mm.kind }} · revision {{ mm.revision or "not recorded" }}</td></tr>
{% endfor %}
{% for pid, sha in (lineage.prompts or {}).items() %}<tr><th class="l">prompt {{ pid }}</th>
<td class="l mono">{{ sha }}</td></tr>{% endfor %}
</table></section>
</main></body></html>
"""
