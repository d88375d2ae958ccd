"""What every stage shares: analysis ids, prompt selection, SAE lookup, batched evaluation through extraction runs.

Every forward pass goes through an extraction run (`evaluate`): the stages build (prompt,
intervention) pairs, ask for one run, and read P("I") and completions back from the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from extract.datasets import Prompt, load_prompts
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.saes import resolve_saes, trained_saes
from extract import workers
from extract.run import ExtractSettings, SaeRef, extract, make_items
from store import Store, UsageError

Log = Callable[[str], None]
Feature = tuple[int, int]                              # (layer, feature)


def no_log(_: str) -> None:
    """The default `log`: say nothing."""


def model_key(model: LoadedModel) -> str:
    """The model as analysis ids and pipeline stage keys hash it: its name, plus its dtype unless float32 (ids
    made before the dtype varied hold). Run ids hash the dtype already; this keeps a bf16 analysis (`--dtype
    auto` on cuda or a CPU with native bf16) from reusing or replacing an fp32 one of the same store."""
    dtype = str(model.dtype).removeprefix("torch.")
    return model.name if dtype == "float32" else f"{model.name}@{dtype}"


def analysis_id(kind: str, model: str, parent: str | None, settings: Any, inputs: Any = None) -> str:
    """16 hex digits of sha256 over the stage, model, parent analysis, settings and other inputs (SAEs)."""
    blob = json.dumps({"kind": kind, "model": model, "parent": parent, "settings": settings.hashed(),
                       "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_prompts(dataset: str, split: str, n: int, seed: int) -> list[Prompt]:
    """The first n prompts of `split` in the dataset's seeded order (fewer when the split is smaller)."""
    if split not in ("train", "val", "test"):
        raise UsageError(f"split must be train, val or test, got {split!r}")
    chosen = [p for p in load_prompts(dataset, seed=seed) if p.split == split][:n]
    if not chosen:
        raise UsageError(f"dataset {dataset} has no {split} prompts")
    return chosen


def stored_prompts(store: Store, prompt_ids: Sequence[str]) -> list[Prompt]:
    """Prompt objects for prompt ids already in the store, in the given order."""
    df = store.sql("SELECT * FROM prompts WHERE prompt_id IN (SELECT unnest(?))", [list(prompt_ids)])
    rows = {r["prompt_id"]: r for r in df.iter_rows(named=True)}
    missing = [p for p in prompt_ids if p not in rows]
    assert not missing, f"prompts missing from the store: {missing[:3]}"
    return [Prompt(**{f.name: rows[p][f.name] for f in fields(Prompt)}) for p in prompt_ids]


def load_saes(store: Store, model: LoadedModel, specs: Sequence[str]) -> list[SaeRef]:
    """SAEs from LAYER=SOURCE entries, or the store's trained SAEs for the model when there are none."""
    saes = resolve_saes(store, model, tuple(specs), "")
    if not saes:
        raise UsageError(f"no SAEs for {model.name}: train them with `python cli.py sae train --model {model.name}`, "
                         f"or pass --sae LAYER=SOURCE (or --sae-store STORE with trained SAEs)")
    return saes


def sae_specs_from_store(path: str, model: str) -> tuple[str, ...]:
    """LAYER=SOURCE entries for the trained SAEs of `model` in another store."""
    found = trained_saes(Store.open(path), model)
    if not found:
        raise UsageError(f"store {path} has no trained SAEs for {model}")
    return tuple(f"{layer}={source}" for layer, source in sorted(found.items()))


@dataclass(frozen=True)
class Evaluated:
    """P("I") and completions of requested (prompt, spec) pairs, in request order."""

    run_id: str
    items: np.ndarray                                  # [n_requests] the run's item per request
    p_i: np.ndarray                                    # [n_requests]
    completions: list[str | None]
    n_forward_items: int                               # unique (prompt, spec) pairs actually run
    cached: bool
    row_runs: tuple[str, ...] = ()                     # per request, where its item lives when not all in run_id
                                                       # (measurements reused from earlier runs: analyze/prune.py)

    def run_of(self, k: int) -> str:
        """The run holding request k's item."""
        return self.row_runs[k] if self.row_runs else self.run_id


def evaluate(store: Store, model: LoadedModel, prompts: Sequence[Prompt], specs: Sequence[Intervention],
             saes: Sequence[SaeRef], settings: ExtractSettings, dedupe: bool = True,
             log: Log = no_log) -> Evaluated:
    """One extraction run over the (prompt, spec) pairs; identical pairs share one item when `dedupe`."""
    keys = [(p.prompt_id, s.spec_hash()) for p, s in zip(prompts, specs, strict=True)]
    if dedupe:
        first: dict[tuple[str, str], int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        unique = list(first.values())
        position = {key: k for k, key in enumerate(first)}
        index = np.array([position[k] for k in keys])
    else:
        unique, index = list(range(len(keys))), np.arange(len(keys))
    items = make_items(model, [prompts[i] for i in unique], [specs[i] for i in unique])
    needed = sorted({layer for s in specs for layer in s.layers})
    refs = [s for s in saes if s.layer in needed]
    done = [0]

    def progress(n_items: int, _tokens: int) -> None:
        done[0] += n_items
        alive = workers.active().status()
        log(f"  {done[0]}/{len(items)} items" + (f" ({alive})" if alive else ""))

    result = extract(store, model, items, refs, settings, progress if len(items) > settings.batch_size else None)
    rows = store.sql("SELECT item, p_i, completion FROM items WHERE run_id = ? ORDER BY item", [result.run_id])
    p_i = rows["p_i"].to_numpy().astype(np.float64)
    texts = rows["completion"].to_list()
    return Evaluated(result.run_id, index.astype(np.int64), p_i[index], [texts[i] for i in index],
                     len(items), result.cached)


def ablation(features: Sequence[Feature], first: bool = True) -> Intervention:
    """Zero-ablate these (layer, feature) pairs at every position (`first` False: every position but 0)."""
    by_layer: dict[int, list[int]] = {}
    for layer, feature in features:
        by_layer.setdefault(int(layer), []).append(int(feature))
    return Intervention(zero_ablate={layer: tuple(sorted(set(f))) for layer, f in sorted(by_layer.items())},
                        zero_ablate_first=first)


def rate(flags: Sequence[bool] | np.ndarray) -> float | None:
    """Share of True, None for an empty sequence."""
    flags = np.asarray(flags, dtype=bool)
    return float(flags.mean()) if flags.size else None
