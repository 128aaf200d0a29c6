"""Docs cite only files that exist: a renamed module must not leave a dangling pointer behind."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "benchmarks/README.md",
]
TOP = (
    "src|tests|operators|dags|configs|docker|scripts|benchmarks|schemas|prompts|requirements|docs|tinymodels"
    "|localstack"
)
PATH = re.compile(rf"`((?:{TOP})/[A-Za-z0-9_./-]+)`")


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_repo_path_exists(doc):
    cited = {m.group(1).rstrip("/.") for m in PATH.finditer((ROOT / doc).read_text())}
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"{doc} cites files that are not in the repo: {missing}"
