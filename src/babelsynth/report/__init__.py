"""A run's report.html and dataset_card.md, built from its manifest and Parquet files only.

The `report` step after commit writes them (commit itself reads metadata only, so its cost grows with the
number of files, not with the data); `babelsynth report <run>` rebuilds them for any run directory, including
runs of other code.
"""

from __future__ import annotations

import logging

from babelsynth.layout import CARD, REPORT, RunLayout

log = logging.getLogger(__name__)


def write(lay: RunLayout, manifest: dict | None = None) -> dict[str, str]:
    """Write report.html and dataset_card.md into the run directory; returns their URIs."""
    from babelsynth.report import card, html
    from babelsynth.report.collect import collect

    m = manifest if manifest is not None else lay.read_manifest()
    data = collect(lay, m)
    lay.write_text(REPORT, html.render(data))
    lay.write_text(CARD, card.render(lay, m))
    log.info("report: %s", lay.report_uri)
    return {"report": lay.report_uri, "card": lay.card_uri}


def write_for_run(run_uri: str) -> dict[str, str]:
    """Rebuild the report and card of the committed run at <output_uri>/<run key>."""
    lay = RunLayout.from_root(run_uri)
    if not lay.has_manifest():
        raise FileNotFoundError(f"{lay.manifest_uri} not found: a run is reported once it is committed")
    return write(lay)
