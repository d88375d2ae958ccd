"""An extraction request as the `extract` command states it: check the inputs, load, run, summarize."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from extract.datasets import load_prompts, refusal_phrases
from extract.interventions import Intervention, load_intervention
from extract.layers import parse_layers
from extract.models import DEFAULT_MODEL, load_model
from extract.saes import resolve_saes
from extract.run import ExtractSettings, RunResult, extract, make_items
from extract.workers import WorkerSettings, active, started
from store import Store
from store.settings import Settings


@dataclass(frozen=True)
class ExtractRequest(Settings):
    model: str = DEFAULT_MODEL
    datasets: tuple[str, ...] = ("advbench", "alpaca")
    limit: int | None = 64                  # at most N prompts per dataset, the same ones for the same seed (None: all)
    seed: int = 0                           # the prompt order and the 80/10/10 split
    layers: str = "all"                     # residual layers stored: all, none, 2-16, 3,7,12
    positions: str = "all"                  # all or last:N
    saes: tuple[str, ...] = ()              # LAYER=SOURCE; () = the store's trained SAEs for the model
    sae_layers: str = ""                    # layers for the model's default SAEs
    intervention: str | None = None         # an intervention spec (JSON file)
    generate: int = 0                       # greedy completion tokens (0: none)
    save_logits: bool = False               # last-position logits (float16) in Zarr
    batch_size: int = 16
    device: str | None = None               # None: cuda if available
    dtype: str | None = None                # None: auto (bfloat16 on cuda and on CPUs with native bf16, else float32)


def run_extract(store_path: str, req: ExtractRequest, log: Callable[[str], None],
                workers: WorkerSettings = WorkerSettings()) -> RunSummary:
    """Run the extraction a request describes; every input is checked before the store is created.

    `workers`: the forward passes run on that many Ray actors (extract/workers.py); the run is the same."""
    spec = load_intervention(Path(req.intervention)) if req.intervention else Intervention()
    prompts = [p for name in req.datasets for p in load_prompts(name, limit=req.limit, seed=req.seed)]
    log(f"loading {req.model} ...")
    t0 = time.perf_counter()
    model = load_model(req.model, device=req.device, dtype=req.dtype)
    log(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s ({model.n_layers} layers, d_model "
        f"{model.d_model}, {model.device}, {str(model.dtype).removeprefix('torch.')})")
    settings = ExtractSettings(layers=parse_layers(req.layers, model.n_layers), positions=req.positions,
                               generate=req.generate, save_logits=req.save_logits, batch_size=req.batch_size)
    store = Store.create(store_path)
    saes = resolve_saes(store, model, req.saes, req.sae_layers)
    items = make_items(model, prompts, spec)
    with started(workers, model, log=log):
        result = extract_with_progress(store, model, items, saes, settings)
    return summarize(store, result)


@dataclass(frozen=True)
class DatasetSummary:
    dataset: str
    n: int
    mean_p_i: float
    n_completions: int                      # items with a completion
    n_refusal_phrase: int                   # completions with a refusal phrase


@dataclass(frozen=True)
class RunSummary:
    run: RunResult
    store: str
    datasets: tuple[DatasetSummary, ...]


def extract_with_progress(store, model, items, saes, settings) -> RunResult:
    """`extract` with a progress bar of prompts/s and tokens/s on stderr."""
    n_tokens = [0]
    t0 = time.perf_counter()
    with tqdm(total=len(items), unit="prompt", desc="extract", dynamic_ncols=True) as bar:
        def progress(n_items: int, n_tok: int) -> None:
            n_tokens[0] += n_tok
            bar.update(n_items)
            alive = active().status()                   # one bar over every worker: "2/2 workers alive"
            bar.set_postfix_str(f"{n_tokens[0] / max(time.perf_counter() - t0, 1e-9):.0f} tok/s"
                                + (f", {alive}" if alive else ""))
        return extract(store, model, items, saes, settings, progress)


def summarize(store: Store, result: RunResult) -> RunSummary:
    """Per dataset of a run: prompts, mean P("I"), and the refusal-phrase share of its completions."""
    df = store.sql(
        "SELECT p.dataset, count(*) AS n, avg(i.p_i) AS mean_p_i, list(i.completion) AS completions "
        "FROM items i JOIN prompts p USING (prompt_id) WHERE i.run_id = ? GROUP BY p.dataset ORDER BY p.dataset",
        [result.run_id])
    phrases = [p.lower() for p in refusal_phrases()]
    rows = []
    for row in df.iter_rows(named=True):
        done = [c for c in row["completions"] if c is not None]
        refused = sum(any(p in c.lower() for p in phrases) for c in done)
        rows.append(DatasetSummary(row["dataset"], row["n"], row["mean_p_i"], len(done), refused))
    return RunSummary(result, str(store.path), tuple(rows))


def summary_line(s: RunSummary) -> str:
    """Run id, size and where it went."""
    r = s.run
    return f"run {r.run_id}: {r.n_items} prompts, {r.n_rows} rows{' (already in the store)' if r.cached else ''} -> {s.store}"


def detail_lines(s: RunSummary) -> list[str]:
    """Per dataset: prompts, mean P("I"), refusal phrases in completions."""
    lines = []
    for d in s.datasets:
        line = f"  {d.dataset:<12} n={d.n:<5} mean P(\"I\")={d.mean_p_i:.3f}"
        if d.n_completions:
            line += f"  refusal phrase in {d.n_refusal_phrase}/{d.n_completions} completions"
        lines.append(line)
    return lines
