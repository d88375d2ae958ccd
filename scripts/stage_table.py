"""The README's stage table, rendered from profiles/*.json and the settings defaults.

Each row is a stage; each cell gives the values of the fields that some profile sets, as that profile
runs them (a field a profile leaves alone shows the settings default). Layers are written as in the
profiles (fractions of the depth). Run: python scripts/stage_table.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analyze.pipeline import PROFILE_DIR, PipelineSettings  # noqa: E402
from extract.sae_train import TrainSettings  # noqa: E402

ORDER = ("default", "quick", "medium")


def _value(v) -> str:
    if isinstance(v, (list, tuple)) and not v:
        return "auto"                                      # the stage's own choice (e.g. direction: the first 80%)
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if len(v) <= 6 else f"{v[0]}, {v[1]} ... {v[-1]} ({len(v)} values)"
    return "all" if v is None else str(v)


def render() -> str:
    profiles = {name: json.loads((PROFILE_DIR / f"{name}.json").read_text()) for name in ORDER}
    defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(PipelineSettings)}
    lines = ["| stage | " + " | ".join(f"`{n}`" for n in ORDER) + " |", "|---" * (len(ORDER) + 1) + "|"]
    for stage in [f.name for f in fields(PipelineSettings) if f.name not in ("profile", "saes", "report")]:
        keys = sorted({k for p in profiles.values() if isinstance(p.get(stage), dict) for k in p[stage]})
        if not keys and not any(stage in p for p in profiles.values()):
            continue
        cells = []
        for name in ORDER:
            given = profiles[name].get(stage)
            if not keys:                                   # a plain value (n_coconot)
                cells.append(_value(given if stage in profiles[name] else defaults[stage]))
                continue
            base = defaults[stage] if defaults[stage] is not None else TrainSettings(layers=(0,))
            cells.append(", ".join(f"{k} {_value((given or {}).get(k, getattr(base, k)))}" for k in keys))
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
