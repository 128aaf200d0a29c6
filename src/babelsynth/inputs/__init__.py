"""Input adapters: the formats users hold -> canonical records (schemas/input.v2.yaml). One module per
format; `input.format` picks one. The plan and the per-shard read are in `inputs/plan.py`."""

from __future__ import annotations

from babelsynth.config import InputSection
from babelsynth.inputs import canonical, cauldron, llava, messages, webdataset
from babelsynth.inputs.base import Adapter

ADAPTERS: dict[str, type[Adapter]] = {
    m.ADAPTER.name: m.ADAPTER for m in (canonical, cauldron, messages, llava, webdataset)
}


def adapter(cfg: InputSection, fmt: str | None = None) -> Adapter:
    name = fmt or cfg.format
    if name not in ADAPTERS:
        raise ValueError(f"unknown input format {name!r}; formats are {sorted(ADAPTERS)}")
    return ADAPTERS[name](cfg)
