"""`cli.py extract` as a library call: resolve model, datasets, SAEs and spec, then run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from extract.datasets import load_prompts, refusal_phrases
from extract.interventions import Intervention, load_intervention
from extract.models import REGISTRY, LoadedModel, load_model
from extract.run import ExtractSettings, RunResult, SaeRef, extract, make_items
from extract.saes import load_sae
from store import Store, UsageError


@dataclass(frozen=True)
class ExtractRequest:
    model: str = "qwen-coder-0.5b"
    datasets: tuple[str, ...] = ("advbench", "alpaca")
    limit: int | None = 64
    seed: int = 0
    layers: str = "all"
    positions: str = "all"
    saes: tuple[str, ...] = ()              # "LAYER=SOURCE"
    sae_layers: str = ""                    # layers for the model's default SAEs
    intervention: Path | None = None
    generate: int = 0
    save_logits: bool = False
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None
    store: str = "stores/default"


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """'all', 'none', '2-16' (inclusive), '3,7,12' or a mix ('2-4,9')."""
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return tuple(range(n_layers))
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise UsageError(f"--layers must look like all, none, 2-16 or 3,7,12; got {text!r}") from None
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UsageError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))


def resolve_saes(store: Store, model: LoadedModel, explicit: tuple[str, ...], sae_layers: str) -> list[SaeRef]:
    """SAEs for this run: explicit LAYER=SOURCE, else the registry's release, else the store's trained ones."""
    sources: dict[int, str] = {}
    for entry in explicit:
        layer, sep, source = entry.partition("=")
        if not sep or not layer.strip().isdigit():
            raise UsageError(f"--sae must be LAYER=SOURCE (e.g. 12=stores/default/saes/layer_12), got {entry!r}")
        sources[int(layer)] = source.strip()
    wanted = parse_layers(sae_layers, model.n_layers)
    spec = REGISTRY.get(model.name)
    trained = trained_saes(store, model.name)
    for layer in wanted:
        if layer in sources:
            continue
        if spec is not None and spec.sae_release:
            sources[layer] = f"{spec.sae_release}:{spec.sae_id(layer)}"
        elif layer in trained:
            sources[layer] = trained[layer]
        else:
            raise UsageError(f"no SAE for {model.name} layer {layer}; train one with "
                             f"`python cli.py sae train --model {model.name} --layers {layer}` or pass --sae")
    if not explicit and not sae_layers:
        sources = dict(trained)                 # after `sae train`, the store's SAEs are the default
    refs = []
    for layer, source in sorted(sources.items()):
        refs.append(SaeRef(layer, source, load_sae(source, layer=layer, device=model.device)))
    return refs


def trained_saes(store: Store, model: str) -> dict[int, str]:
    """layer -> directory of the store's own trained SAE for `model` (newest per layer)."""
    df = store.sql("SELECT layer, source FROM saes WHERE model = ? AND architecture <> 'external' "
                   "AND source NOT LIKE '%:%' ORDER BY created_at", [model])
    # trained SAEs live inside the store and are registered relative to it
    return {int(layer): source if Path(source).is_absolute() else str(store.path / source)
            for layer, source in df.iter_rows()}


def run_extract(req: ExtractRequest, log: Callable[[str], None]) -> str:
    """Run the extraction a request describes; returns a printable summary."""
    store = Store.create(req.store)
    spec = load_intervention(req.intervention) if req.intervention else Intervention()
    prompts = [p for name in req.datasets for p in load_prompts(name, limit=req.limit, seed=req.seed)]
    log(f"loading {req.model} ...")
    t0 = time.perf_counter()
    model = load_model(req.model, device=req.device, dtype=req.dtype)
    log(f"loaded {model.name} in {time.perf_counter() - t0:.1f} s ({model.n_layers} layers, d_model "
        f"{model.d_model}, {model.device}, {str(model.dtype).removeprefix('torch.')})")
    settings = ExtractSettings(layers=parse_layers(req.layers, model.n_layers), positions=req.positions,
                               generate=req.generate, save_logits=req.save_logits, batch_size=req.batch_size)
    saes = resolve_saes(store, model, req.saes, req.sae_layers)
    items = make_items(model, prompts, spec)
    result = extract_with_progress(store, model, items, saes, settings)
    return summarize(store, result, req)


def extract_with_progress(store, model, items, saes, settings) -> RunResult:
    """`extract` with a progress bar of prompts/s and tokens/s on stderr."""
    n_tokens = [0]
    t0 = time.perf_counter()
    with tqdm(total=len(items), unit="prompt", desc="extract", dynamic_ncols=True) as bar:
        def progress(n_items: int, n_tok: int) -> None:
            n_tokens[0] += n_tok
            bar.update(n_items)
            bar.set_postfix_str(f"{n_tokens[0] / max(time.perf_counter() - t0, 1e-9):.0f} tok/s")
        return extract(store, model, items, saes, settings, progress)


def summarize(store: Store, result: RunResult, req: ExtractRequest) -> str:
    """Run id, size, and per dataset the mean P("I") (and refusal-phrase share of completions)."""
    df = store.sql(
        "SELECT p.dataset, count(*) AS n, avg(i.p_i) AS mean_p_i, list(i.completion) AS completions "
        "FROM items i JOIN prompts p USING (prompt_id) WHERE i.run_id = ? GROUP BY p.dataset ORDER BY p.dataset",
        [result.run_id])
    phrases = [p.lower() for p in refusal_phrases()]
    lines = [f"run {result.run_id}: {result.n_items} prompts, {result.n_rows} rows"
             f"{' (already in the store)' if result.cached else ''} -> {req.store}"]
    for row in df.iter_rows(named=True):
        line = f"  {row['dataset']:<12} n={row['n']:<5} mean P(\"I\")={row['mean_p_i']:.3f}"
        done = [c for c in row["completions"] if c is not None]
        if done:
            refused = sum(any(p in c.lower() for p in phrases) for c in done)
            line += f"  refusal phrase in {refused}/{len(done)} completions"
        lines.append(line)
    return "\n".join(lines)
