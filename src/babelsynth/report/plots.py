"""The report's plots, drawn with matplotlib (object API, Agg canvas: no display, no global pyplot state) and
embedded as PNG data URLs, so report.html needs no other file and no network."""

from __future__ import annotations

import base64
import io

from babelsynth.languages import SOURCE_LANG
from babelsynth.report import paper
from babelsynth.report.collect import ReportData

DPI = 96
KEPT, DROPPED, DRAFT, FINAL, REF = "#2f7d4f", "#c8553d", "#9aa5b1", "#2a6fbb", "#111111"


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    return fig


def _url(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def funnel(manifest: dict) -> str | None:
    stages = manifest.get("stages") or {}
    if not stages:
        return None
    names = list(stages)
    fig = _figure(8.5, 0.45 * len(names) + 1.2)
    ax = fig.subplots()
    kept = [stages[n].get("out", 0) for n in names]
    rej = [stages[n].get("rejected", 0) for n in names]
    y = range(len(names))[::-1]
    ax.barh(list(y), kept, color=KEPT, label="kept")
    ax.barh(list(y), rej, left=kept, color=DROPPED, label="rejected")
    ax.set_yticks(list(y), names)
    for yi, k, r in zip(y, kept, rej):
        ax.text(k + r, yi, f"  {k} kept / {r} rejected", va="center", fontsize=8)
    ax.set_xlabel("rows in (ingest, recaption, judge: English records; later: record x language)")
    ax.set_xlim(0, max(k + r for k, r in zip(kept, rej)) * 1.45 or 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Funnel: rows each stage received, kept and rejected")
    return _url(fig)


def comet_by_language(d: ReportData) -> str | None:
    draft, final = d.dist.get("comet_draft"), d.dist.get("comet_final")
    langs = sorted(lg for lg in (final.values if final else {}) if lg != SOURCE_LANG)
    if not langs:
        return None
    fig = _figure(max(8.5, 0.55 * len(langs) + 2), 4.2)
    ax = fig.subplots()
    pos = range(len(langs))
    dv = [draft.values.get(lg, []) if draft else [] for lg in langs]
    fv = [final.values.get(lg, []) for lg in langs]
    b1 = ax.boxplot(
        dv,
        positions=[p - 0.2 for p in pos],
        widths=0.35,
        patch_artist=True,
        showfliers=False,
        manage_ticks=False,
    )
    b2 = ax.boxplot(
        fv,
        positions=[p + 0.2 for p in pos],
        widths=0.35,
        patch_artist=True,
        showfliers=False,
        manage_ticks=False,
    )
    for box in b1["boxes"]:
        box.set_facecolor(DRAFT)
    for box in b2["boxes"]:
        box.set_facecolor(FINAL)
    ref = [(i, paper.COMET[lg]) for i, lg in enumerate(langs) if lg in paper.COMET]
    if ref:
        ax.scatter([i - 0.2 for i, _ in ref], [v[0] for _, v in ref], marker="v", color=REF, s=18, zorder=3)
        ax.scatter([i + 0.2 for i, _ in ref], [v[1] for _, v in ref], marker="*", color=REF, s=30, zorder=3)
    ax.set_xticks(list(pos), langs, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("COMET QE")
    ax.set_title("COMET QE per language: NLLB draft (grey) vs final (blue); paper draft ▼ / rephrased ★")
    return _url(fig)


def mtld_before_after(d: ReportData) -> str | None:
    before = d.english.get("mtld_before")
    after = d.english.get("mtld_after")
    b = before.values.get("all", []) if before else []
    a = after.values.get("all", []) if after else []
    if not (a or b):
        return None
    fig = _figure(6.5, 3.4)
    ax = fig.subplots()
    bins = 20
    if b:
        ax.hist(b, bins=bins, alpha=0.6, color=DRAFT, label="ground truth (before)")
    if a:
        ax.hist(a, bins=bins, alpha=0.6, color=FINAL, label="recaption (after)")
    for v, style in zip(paper.RECAPTION["mtld"], (":", "--")):
        ax.axvline(v, color=REF, linestyle=style, linewidth=1)
    ax.set_xlabel("MTLD per English answer (paper means 11.0 dotted, 61.2 dashed)")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    ax.set_title("Lexical diversity before and after recaption")
    return _url(fig)


def answer_lengths(d: ReportData) -> str | None:
    chars = d.dist.get("answer_chars")
    langs = sorted(chars.values) if chars else []
    wb, wa = d.english.get("words_before"), d.english.get("words_after")
    if not langs and not wa:
        return None
    fig = _figure(max(9.0, 0.45 * len(langs) + 5), 3.6)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 2.4])
    if wb and wa:
        ax1.hist(wb.values.get("all", []), bins=20, alpha=0.6, color=DRAFT, label="ground truth")
        ax1.hist(wa.values.get("all", []), bins=20, alpha=0.6, color=FINAL, label="recaption")
        ax1.set_xlabel("words per English answer")
        ax1.legend(fontsize=8)
        ax1.set_title("English answers")
    if langs:
        ax2.boxplot([chars.values[lg] for lg in langs], showfliers=False)
        ax2.set_xticks(range(1, len(langs) + 1), langs, rotation=60, ha="right", fontsize=8)
        ax2.set_ylabel("characters")
        ax2.set_title("Answer length per language")
    return _url(fig)


def length_ratios(
    d: ReportData, bands: dict[str, tuple[float, float]], default: tuple[float, float]
) -> str | None:
    ratios = d.dist.get("length_ratio")
    langs = sorted(lg for lg in (ratios.values if ratios else {}) if lg != SOURCE_LANG)
    if not langs:
        return None
    fig = _figure(max(8.5, 0.55 * len(langs) + 2), 3.8)
    ax = fig.subplots()
    for i, lg in enumerate(langs, start=1):
        lo, hi = bands.get(lg, default)
        ax.fill_between([i - 0.4, i + 0.4], lo, hi, color=KEPT, alpha=0.12, linewidth=0)
    ax.boxplot([ratios.values[lg] for lg in langs], showfliers=True)
    ax.set_xticks(range(1, len(langs) + 1), langs, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("chars(answer) / chars(English)")
    ax.set_title("Length ratio per language (shaded: the gate's band)")
    return _url(fig)


def gate_pass_rates(manifest: dict, gates: tuple[str, ...]) -> str | None:
    langs = sorted((manifest.get("languages") or {}).items())
    if not langs:
        return None
    import numpy as np

    grid = np.array(
        [
            [np.nan if (s.get("pass_rate") or {}).get(g) is None else s["pass_rate"][g] for g in gates]
            for _, s in langs
        ]
    )
    fig = _figure(6.5, 0.26 * len(langs) + 1.6)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_xticks(range(len(gates)), gates, fontsize=8)
    ax.set_yticks(range(len(langs)), [lg for lg, _ in langs], fontsize=7)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8, label="pass rate")
    ax.set_title("Gate pass rate per language (over scored rows)")
    return _url(fig)
