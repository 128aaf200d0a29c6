"""dataset_card.md: a Hugging Face dataset card (YAML header, then prose and tables) for one run, from its
manifest and Parquet files: counts per language, schema, lineage, licence notes and how to load it.

The YAML header carries the Hub's fields (language, license, task_categories, size_categories, configs
with data_files) and a `babelsynth` block with the lineage in machine-readable form.
"""

from __future__ import annotations

import yaml

from babelsynth.languages import SOURCE_LANG, language_name
from babelsynth.layout import RunLayout

# FLORES-200 -> ISO 639-1 for the Hub's `language` field (others keep their ISO 639-3 part).
ISO_639_1 = {
    "arb": "ar",
    "ces": "cs",
    "deu": "de",
    "ell": "el",
    "eng": "en",
    "fra": "fr",
    "heb": "he",
    "hin": "hi",
    "ind": "id",
    "ita": "it",
    "jpn": "ja",
    "kor": "ko",
    "nld": "nl",
    "pes": "fa",
    "pol": "pl",
    "por": "pt",
    "ron": "ro",
    "rus": "ru",
    "spa": "es",
    "tur": "tr",
    "ukr": "uk",
    "vie": "vi",
    "zho": "zh",
}
SIZES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)
TASK_CATEGORIES = ["image-text-to-text", "visual-question-answering"]
ROLES = {
    "teacher": "teacher VLM (recaption)",
    "judge": "judge LLM (stage-2 filter)",
    "rephraser": "rephraser LLM (post-edit)",
    "translator": "NLLB-200 (CTranslate2)",
    "llm_translator": "instruction LLM translator (translate.backend llm / both)",
    "comet": "COMET QE (CometKiwi)",
    "safety_judge": "safety judge VLM (image policy)",
    "toxicity": "text safety classifier",
}


def iso_code(flores: str) -> str:
    base = flores.split("_")[0]
    return ISO_639_1.get(base, base)


def size_category(n: int) -> str:
    return next((name for bound, name in SIZES if n < bound), "n>1B")


def header(m: dict) -> dict:
    langs = sorted(m.get("samples_by_lang") or {})
    lin = m.get("lineage") or {}
    total = sum((m.get("samples_by_lang") or {}).values())
    card_cfg = (m.get("config") or {}).get("card") or {}
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "samples/*/*.parquet"}]}]
    configs += [
        {"config_name": lg, "data_files": [{"split": "train", "path": f"samples/lang={lg}/*.parquet"}]}
        for lg in langs
    ]
    return {
        "pretty_name": card_cfg.get(
            "pretty_name", "babelsynth synthetic multilingual image-text instructions"
        ),
        "language": sorted({iso_code(lg) for lg in langs}),
        "license": card_cfg.get("license", "cc-by-nc-4.0"),
        "multilinguality": "multilingual" if len(langs) > 1 else "monolingual",
        "task_categories": TASK_CATEGORIES,
        "size_categories": [size_category(total)],
        "source_datasets": ["original"],
        "tags": ["synthetic", "multimodal", "aya-vision-recipe", "babelsynth"],
        "configs": configs,
        "babelsynth": {
            "run_id": m.get("run_id"),
            "config_fingerprint": m.get("config_fingerprint"),
            "code_version": lin.get("code_version"),
            "models": {
                r: {"id": v.get("id"), "revision": v.get("revision")}
                for r, v in (lin.get("models") or {}).items()
            },
            "prompts": dict(lin.get("prompts") or {}),
            "languages": {lg: language_name(lg) for lg in langs},
        },
    }


def schema_rows(lay: RunLayout, m: dict) -> list[tuple[str, str, str]]:
    """(column, Arrow type, description) read from a samples file itself; descriptions from schemas/."""
    import pyarrow.parquet as pq

    from babelsynth import storage

    files = [f for f in m.get("files", []) if f.get("table") == "samples"]
    if not files:
        return []
    schema = pq.read_schema(storage.parquet_source(lay.uri(files[0]["path"])))
    try:
        from babelsynth.schema import spec

        desc = {c["name"]: c.get("description", "") for c in spec("samples")["columns"]}
    except (FileNotFoundError, KeyError):
        desc = {}
    return [(f.name, str(f.type), desc.get(f.name, "")) for f in schema]


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(lay: RunLayout, m: dict) -> str:
    head = header(m)
    lin = m.get("lineage") or {}
    kept = m.get("samples_by_lang") or {}
    langs_q = m.get("languages") or {}
    thresholds = lin.get("thresholds") or {}
    gates = ((thresholds.get("score") or {}).get("gates")) or {}
    total = sum(kept.values())
    out = ["---", yaml.safe_dump(head, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    out += [
        f"# {head['pretty_name']}",
        "",
        f"Run `{m.get('run_id')}` of babelsynth, which reproduces the data recipe of "
        "*Aya Vision* (arXiv 2505.08751): English image-text records are recaptioned by a teacher VLM "
        "anchored on their ground truth, filtered by rules and an LLM judge, translated by "
        + (
            "NLLB-200 and, for some languages, an instruction LLM (per segment: `translator_model` on each "
            "row, counts per language in the manifest's `stages.translate.translator_by_lang`), "
            if "llm_translator" in (lin.get("models") or {})
            else "NLLB-200, "
        )
        + "post-edited by an LLM and gated on COMET QE, MTLD, language ID, length ratio and repetition.",
        "",
        f"{total:,} rows in {len(kept)} language(s) from {m.get('input_records', 0):,} English input "
        "records; "
        f"{m.get('rejected_total', 0):,} rows were rejected with a reason code (in `rejected/`). "
        f"Counts reconcile per stage and language: **{(m.get('reconciliation') or {}).get('ok')}**.",
        "",
        "## Counts per language",
        "",
        "| language | code | rows | COMET final (mean) | MTLD (mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for lg in sorted(kept):
        q = langs_q.get(lg, {})
        cf = q.get("comet_final")
        mt = q.get("mtld")
        cf_s = "–" if cf is None else f"{cf:.4f}"
        mt_s = "–" if mt is None else f"{mt:.1f}"
        out.append(f"| {language_name(lg)} | `{lg}` | {kept[lg]:,} | {cf_s} | {mt_s} |")
    out += [
        "",
        "## Schema",
        "",
        "`samples/lang=<code>/part-NNNNN.parquet`, one row per kept (record, language):",
        "",
    ]
    out += ["| column | type | description |", "|---|---|---|"]
    out += [f"| `{c}` | `{t}` | {_md(d)} |" for c, t, d in schema_rows(lay, m)]
    out += [
        "",
        "Images are stored once in `images/part-NNNNN.parquet` (`image_id` = sha256 of the bytes, "
        "referenced by `samples.image_ids`); every dropped row is in `rejected/part-NNNNN.parquet` with its "
        "stage, reason code "
        "and the record as JSON. `manifest.json` lists every file with its row count and sha256.",
        "",
        "## Lineage",
        "",
        "| what | id | revision |",
        "|---|---|---|",
    ]
    for role, v in (lin.get("models") or {}).items():
        out.append(
            f"| {ROLES.get(role, role)} | `{_md(v.get('id'))}` "
            f"| `{_md(v.get('revision') or 'not recorded')}` |"
        )
    out += ["", "| prompt | sha256 |", "|---|---|"]
    out += [f"| `{pid}` | `{sha}` |" for pid, sha in (lin.get("prompts") or {}).items()]
    out += [
        "",
        f"- config fingerprint: `{m.get('config_fingerprint')}`",
        f"- code version: `{lin.get('code_version')}`",
        f"- input: `{m.get('input_uri')}`",
        "",
        "Rules and thresholds (`enforce` drops a row, `report` only flags it in `filter_flags` / "
        "`gate_flags`):",
        "",
        "| rule | setting |",
        "|---|---|",
    ]
    for stage in ("recaption", "judge", "translate"):
        for k, v in (thresholds.get(stage) or {}).items():
            out.append(f"| {stage}.{k} | `{_md(v)}` |")
    if "selection_margin" in (thresholds.get("score") or {}):
        out.append(f"| score.selection_margin | `{thresholds['score']['selection_margin']}` |")
    for gate, g in gates.items():
        out.append(f"| score.gates.{gate} | `{_md({k: v for k, v in g.items() if k != 'per_lang' or v})}` |")
    comet_min = (m.get("gates") or {}).get("comet_min") or {}
    if comet_min:
        out.append(f"| COMET minimum resolved per language | `{_md(comet_min)}` |")
    out += [
        "",
        "## Licence",
        "",
        f"Declared licence: `{head['license']}`. Read these terms before training on the data:",
        "",
        "- **NLLB-200** weights are licensed **CC-BY-NC 4.0**; the translations in this dataset are outputs "
        "of "
        "that model.",
        "- The generated text (recaptions, rephrased translations) **inherits the terms of the teacher and "
        "rephraser models** named above (Aya Vision / Aya Expanse / Command R weights, for instance, are "
        "CC-BY-NC "
        "with Cohere's acceptable-use addendum).",
        "- COMET (CometKiwi) checkpoints are gated under a non-commercial licence; only their scores are "
        "stored.",
        "- The images and ground-truth answers keep the licences of their source datasets (`source` column "
        "of "
        "the input).",
        "",
        "## How to load",
        "",
        "```python",
        "import datasets",
        "",
        'ds = datasets.load_dataset("parquet", data_files="<run>/samples/*/*.parquet", split="train")',
        'de = datasets.load_dataset("parquet", data_files="<run>/samples/lang=deu_Latn/*.parquet",',
        '                           split="train")',
        "",
        "import duckdb",
        "",
        "duckdb.sql(\"SELECT lang, count(*) FROM read_parquet('<run>/samples/*/*.parquet') GROUP BY 1\")",
        "```",
        "",
        "Images: join `samples.image_ids` with `images.image_id` (`<run>/images/*.parquet`, bytes in "
        "`image`).",
        "",
        f"English rows (`{SOURCE_LANG}`) are the recaptions themselves; the other languages derive from them "
        "(`answer_en`, `draft_answer`, `selected`).",
        "",
    ]
    return "\n".join(out)
