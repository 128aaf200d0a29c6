"""What the report shows, read from a run's manifest and its Parquet files only (never from the runner's
internal results), so a run written by other code is reported the same way.

Distributions are bounded: at most CAP values per language and metric are kept (every other one is
dropped when a buffer doubles), so a run of millions of rows is reported in bounded memory.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from babelsynth.languages import SOURCE_LANG
from babelsynth.layout import RunLayout

CAP = 20_000  # values kept per language and metric
MTLD_DOCS = 2_000  # English documents whose MTLD before/after recaption is computed for the plot
PREVIEWS = 3  # source records shown with their translations
PREVIEW_LANGS = 3  # target languages beside the English one
REJECTED_PER_REASON = 2
THUMB = 160
SCORE_COLS = ("comet_draft", "comet_final", "length_ratio", "repetition", "mtld", "langid_conf")


class Bounded:
    """Values per key, at most CAP each (stride-halved when full): a fair sample of a long stream."""

    def __init__(self, cap: int = CAP):
        self.cap = cap
        self.values: dict[str, list[float]] = defaultdict(list)
        self.stride: dict[str, int] = defaultdict(lambda: 1)
        self.seen: Counter = Counter()

    def add(self, key: str, value: float | None) -> None:
        if value is None:
            return
        self.seen[key] += 1
        if (self.seen[key] - 1) % self.stride[key]:
            return
        buf = self.values[key]
        buf.append(float(value))
        if len(buf) >= 2 * self.cap:
            del buf[1::2]
            self.stride[key] *= 2


@dataclass
class ReportData:
    manifest: dict
    # per metric -> Bounded keyed by language (scored rows: kept samples and rows a gate dropped)
    dist: dict[str, Bounded] = field(default_factory=lambda: defaultdict(Bounded))
    means: dict[str, dict[str, float]] = field(default_factory=dict)  # lang -> metric -> mean
    english: dict[str, Bounded] = field(default_factory=lambda: defaultdict(Bounded))  # before/after
    rejected_by: Counter = field(default_factory=Counter)  # (stage, reason, lang or '') -> rows
    rejected_examples: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    previews: list[dict] = field(default_factory=list)
    thumbs: dict[str, str] = field(default_factory=dict)  # image_id -> data URL


def _files(manifest: dict, table: str) -> list[dict]:
    return [f for f in manifest.get("files", []) if f.get("table") == table]


def _source(lay: RunLayout, rel: str):
    from babelsynth import storage

    return storage.parquet_source(lay.uri(rel))


def _columns(lay: RunLayout, rel: str, wanted: tuple[str, ...], filters=None):
    """The wanted columns a file has (one read of the object: an S3 file is fetched once)."""
    import pyarrow.parquet as pq

    src = _source(lay, rel)
    names = pq.read_schema(src).names
    if hasattr(src, "seek"):
        src.seek(0)
    return pq.read_table(src, columns=[c for c in wanted if c in names], filters=filters)


def collect(lay: RunLayout, manifest: dict) -> ReportData:
    d = ReportData(manifest)
    sums: dict[str, Counter] = defaultdict(Counter)
    counts: dict[str, Counter] = defaultdict(Counter)

    def scored(lang: str, row: dict) -> None:
        for c in SCORE_COLS:
            v = row.get(c)
            if v is not None:
                d.dist[c].add(lang, v)
                sums[lang][c] += v
                counts[lang][c] += 1
        if row.get("answer_chars") is not None:
            d.dist["answer_chars"].add(lang, row["answer_chars"])

    samples = _files(manifest, "samples")
    english_rows: list[dict] = []
    for f in samples:  # numbers only: the answers' lengths are computed in Arrow, not pulled as strings
        import pyarrow.compute as pc

        t = _columns(lay, f["path"], ("lang", "answer", *SCORE_COLS))
        if "answer" in t.column_names:
            t = t.append_column("answer_chars", pc.utf8_length(t.column("answer"))).drop_columns(["answer"])
        for row in t.to_pylist():
            scored(f.get("lang") or row.get("lang") or SOURCE_LANG, row)
        if f.get("lang") == SOURCE_LANG and len(english_rows) < MTLD_DOCS:
            t = _columns(lay, f["path"], ("answer_en", "answer_gt"))
            english_rows += t.slice(0, MTLD_DOCS - len(english_rows)).to_pylist()
    for f in _files(manifest, "rejected"):
        t = _columns(lay, f["path"], ("stage", "reason", "lang", "detail", "record", "source_id"))
        for row in t.to_pylist():
            key = (row["stage"], row["reason"])
            d.rejected_by[(row["stage"], row["reason"], row.get("lang") or "")] += 1
            rec = None
            if row["stage"] == "score" or len(d.rejected_examples.get(key, [])) < REJECTED_PER_REASON:
                rec = json.loads(row["record"]) if row.get("record") else {}
            if rec is not None and row["stage"] == "score":
                ans = rec.get("answer")
                scored(
                    row.get("lang") or rec.get("lang") or SOURCE_LANG,
                    {**rec, "answer_chars": ans and len(ans)},
                )
            if rec is not None and len(d.rejected_examples.setdefault(key, [])) < REJECTED_PER_REASON:
                d.rejected_examples[key].append({**row, "record": rec})
    d.means = {
        lang: {c: sums[lang][c] / counts[lang][c] for c in counts[lang] if counts[lang][c]} for lang in counts
    }
    _english(d, english_rows)
    _previews(lay, d, samples)
    return d


def _english(d: ReportData, rows: list[dict]) -> None:
    """Words and MTLD of the ground truth (before) and the recaption (after), per English sample."""
    from babelsynth.metrics import mtld, tokenize

    for r in rows:
        for side, col in (("before", "answer_gt"), ("after", "answer_en")):
            text = r.get(col) or ""
            d.english[f"words_{side}"].add("all", len(tokenize(text, SOURCE_LANG)))
            m, _ = mtld(text, SOURCE_LANG)
            d.english[f"mtld_{side}"].add("all", m)


def _read(lay: RunLayout, f: dict, cols: tuple[str, ...], ids: list[str]) -> list[dict]:
    """Rows of one samples file whose source_id is in ids (pushed down to the Parquet reader)."""
    t = _columns(lay, f["path"], cols, filters=[("source_id", "in", ids)])
    return [{**r, "lang": f.get("lang") or r.get("lang")} for r in t.to_pylist()]


def _previews(lay: RunLayout, d: ReportData, samples: list[dict]) -> None:
    """A few source records, different task types first, the most translated first: the English row and
    the same record in the target languages that hold it. Reads only those records' rows."""
    english = [f for f in samples if f.get("lang") == SOURCE_LANG]
    if not english:
        return
    candidates: dict[str, str] = {}  # source_id -> task_type: up to 64 rows of the first English file
    for r in _columns(lay, english[0]["path"], ("source_id", "task_type")).slice(0, 64).to_pylist():
        candidates.setdefault(r["source_id"], r.get("task_type") or "")
    part = english[0]["path"].rsplit("/", 1)[-1]  # the same shard's file in every language holds them
    same_shard = [f for f in samples if f["path"].rsplit("/", 1)[-1] == part]
    samples = same_shard if len(same_shard) > 1 else samples
    ids = sorted(candidates)
    langs_of: Counter = Counter()
    for f in samples:
        langs_of.update(r["source_id"] for r in _read(lay, f, ("source_id",), ids))
    ranked = sorted(ids, key=lambda s: (-langs_of[s], s))
    chosen, tasks = [], set()
    for s in ranked:
        if candidates[s] not in tasks:
            chosen.append(s)
            tasks.add(candidates[s])
        if len(chosen) == PREVIEWS:
            break
    chosen += [s for s in ranked if s not in chosen][: PREVIEWS - len(chosen)]
    cols = ("source_id", "lang", "task_type", "prompt", "answer", "answer_gt", "image_ids", "comet_final")
    cols += ("selected", "gate_flags", "filter_flags")
    by_source: dict[str, dict[str, dict]] = defaultdict(dict)
    for f in samples:
        for row in _read(lay, f, cols, chosen):
            by_source[row["source_id"]][row["lang"]] = row
    for s in chosen:
        rows = by_source[s]
        targets = [rows[lg] for lg in sorted(rows) if lg != SOURCE_LANG][:PREVIEW_LANGS]
        d.previews.append({"english": rows[SOURCE_LANG], "targets": targets})
    wanted = {i for p in d.previews for i in p["english"].get("image_ids") or []}
    for ex in (e for exs in d.rejected_examples.values() for e in exs):
        wanted |= set(ex["record"].get("image_ids") or [])
    d.thumbs = thumbnails(lay, d.manifest, wanted)


def thumbnails(lay: RunLayout, manifest: dict, ids: set[str]) -> dict[str, str]:
    """{image_id: PNG data URL} of the wanted images found in the run's images files."""
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for f in _files(manifest, "images"):
        if len(out) == len(ids):
            break
        todo = sorted(ids - set(out))
        t = pq.read_table(
            _source(lay, f["path"]), columns=["image_id", "image"], filters=[("image_id", "in", todo)]
        )
        for iid, data in zip(t.column("image_id").to_pylist(), t.column("image").to_pylist()):
            out[iid] = thumbnail(data)
    return out


def thumbnail(data: bytes, side: int = THUMB) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as src:
        im = src.convert("RGB")
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def record_text(rec: dict[str, Any]) -> str:
    """The text a rejected record was judged on: its answer in its own language if it got that far."""
    for k in ("answer", "rephrase_answer", "draft_answer", "answer_en", "answer_gt", "question"):
        if rec.get(k):
            return str(rec[k])
    return ""
