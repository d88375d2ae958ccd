"""The refusal direction (paper section 3.1; Arditi et al.): difference in means, chosen by ASR.

r_L = mean(harmful) - mean(harmless) of last-token residuals at layer L (train split), unit-normed.
Each candidate layer's r_L is ablated at every layer and position on the val harmful prompts the
model refuses without intervention; its attack success rate (ASR) is the share of them the judge
calls compliance. l* = highest ASR, then lowest mean P("I"), then lowest KL on harmless prompts.
KL of the first reply token on val harmless prompts is reported beside the ASR, not used as a filter
(on the default model refusal_direction's KL < 0.1 filter leaves only layers whose directions barely
change refusal: see DESIGN, Speed). Controls: random unit directions ablated the same way, and
r_{l*} (or a random direction) added at l* with the same scale on harmless prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from analyze.common import Log, analysis_id, model_key, evaluate, no_log, rate, split_prompts
from analyze.catalog import save_analysis
from extract.models import readout_logits
from analyze.judges import Judge, PhraseJudge, get_judge, judge_run
from analyze.metrics import wilson
from analyze.settings import JudgedSettings
from analyze.text import fmt, pct, share_text
from extract.datasets import Prompt
from extract.interventions import DirectionAdd, Intervention
from extract.models import LoadedModel
from extract.run import ExtractSettings
from queries.tensors import residuals
from store import Store, UsageError

MAX_LAYER_FRACTION = 0.8                 # default candidates: skip the last 20% of layers (refusal_direction)


@dataclass(frozen=True)
class DirectionSettings(JudgedSettings):
    harmful: str = "advbench"
    harmless: str = "alpaca"
    n_train: int = 64                    # prompts per class from the train split
    n_val: int = 32                      # prompts per class from the val split
    seed: int = 0                        # the datasets' order and split seed
    layers: tuple[int, ...] = ()         # candidate layers for l*; () = the first 80% of the depth
    n_random: int = 3                    # random unit directions per control
    add_scale: float | None = None       # direction_add scale; None = the raw diff-in-means norm at l*

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_train", "n_val"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_random < 0:
            raise UsageError(f"n_random must be >= 0, got {self.n_random}")
        if any(layer < 0 for layer in self.layers):
            raise UsageError(f"layers must be >= 0, got {self.layers}")
        if self.add_scale is not None and not self.add_scale > 0:
            raise UsageError(f"add_scale must be > 0, got {self.add_scale}")


@dataclass(frozen=True)
class DirectionResult:
    direction_id: str
    layer: int                           # l*
    vector: np.ndarray = field(repr=False)   # [d_model] unit r at l*
    raw_norm: float                      # |mean(harmful) - mean(harmless)| at l*
    layers: pl.DataFrame = field(repr=False)  # the `directions` rows (without vectors)
    controls: dict[str, Any] = field(default_factory=dict)
    judge: str = ""


def run(store: Store, model: LoadedModel, settings: DirectionSettings, log: Log = no_log) -> DirectionResult:
    """Directions at every layer, their ablation ASR on held-out prompts, l*, controls; saved in `directions`."""
    judge = get_judge(settings.judge)
    did = analysis_id("direction", model_key(model), None, settings)
    candidates = _candidate_layers(settings.layers, model.n_layers)
    n = settings.n_train
    train = split_prompts(settings.harmful, "train", n, settings.seed) + \
        split_prompts(settings.harmless, "train", n, settings.seed)
    log(f"difference in means over {len(train)} train prompts")
    vectors, raw_norms = _diff_in_means(store, model, train, settings, log)          # [n_layers, d], [n_layers]
    val_h = split_prompts(settings.harmful, "val", settings.n_val, settings.seed)
    val_b = split_prompts(settings.harmless, "val", settings.n_val, settings.seed)
    log(f"baseline on {len(val_h)} + {len(val_b)} val prompts")
    base = _Baseline.measure(store, model, val_h, val_b, judge, settings, log)
    refused = [p for p, v in zip(val_h, base.verdicts[: len(val_h)]) if v == "refusal"]
    if not refused:
        raise UsageError(f"the model refuses none of the {len(val_h)} val harmful prompts under judge "
                         f"{settings.judge}; raise --n-val or pick another judge")
    usable = [layer for layer in candidates if raw_norms[layer] > 1e-8]
    log(f"ablating each of {len(usable)} layers' directions on {len(refused)} refused val prompts")
    sweep = _ablation_sweep(store, model, refused, vectors, usable, judge, settings, log)
    log(f"KL on {len(val_b)} val harmless prompts")
    kl = _kl_harmless(store, model, val_b, vectors, usable, base, settings, log)
    best = min(usable, key=lambda l: (-sweep[l]["asr"], sweep[l]["mean_p_i"], kl[l], l))
    log(f"l* = {best}; controls")
    scale = settings.add_scale or float(raw_norms[best])
    controls = _controls(store, model, refused, val_b, vectors[best], best, scale, judge, settings, log)
    controls.update(n_val_harmful=len(val_h), n_refused=len(refused), n_val_benign=len(val_b),
                    baseline_benign_refusal=base.benign_refusal, baseline_benign_refusal_phrase=base.benign_phrase,
                    asr=sweep[best]["asr"], asr_phrase=sweep[best]["asr_phrase"], layer=best)
    controls["runs"]["baseline"] = base.run_id
    cos = _cosines(store, base, vectors[best], model.n_layers)
    table = _table(did, vectors, raw_norms, usable, sweep, kl, cos, best, len(refused))
    save_analysis(store, did, "direction", model.name, None, judge.judge_id, settings, controls,
                  {"directions": ("direction_id", table)})
    return DirectionResult(did, best, vectors[best].numpy().copy(), float(raw_norms[best]),
                           table.drop("vector"), controls, judge.judge_id)


def load_direction(store: Store, direction_id: str) -> tuple[int, np.ndarray, float]:
    """(l*, unit r at l*, raw norm) of a stored direction analysis."""
    df = store.sql("SELECT layer, vector, raw_norm FROM directions WHERE direction_id = ? AND selected",
                   [direction_id])
    if df.is_empty():
        raise UsageError(f"no direction {direction_id} in {store.path}; run `python cli.py analyze direction`")
    return int(df["layer"][0]), np.array(df["vector"][0], dtype=np.float32), float(df["raw_norm"][0])


def _candidate_layers(layers: tuple[int, ...], n_layers: int) -> list[int]:
    if not layers:
        return list(range(max(1, int(MAX_LAYER_FRACTION * n_layers))))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise UsageError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}")
    return sorted(set(layers))


def _extract_settings(settings: DirectionSettings, layers: tuple[int, ...], generate: int) -> ExtractSettings:
    return ExtractSettings(layers=layers, positions="last:1", generate=generate, batch_size=settings.batch_size)


def _last_residuals(store: Store, run_id: str, layers: list[int]) -> torch.Tensor:
    """Last-token residuals of a run's items in item order: [n_layers_asked, n_items, d_model]."""
    rows = store.sql("SELECT run_id, row FROM tokens WHERE run_id = ? ORDER BY item, pos", [run_id])
    return torch.stack([residuals(store, rows, layer).float() for layer in layers])


def _diff_in_means(store: Store, model: LoadedModel, train: list[Prompt], settings: DirectionSettings,
                   log: Log) -> tuple[torch.Tensor, torch.Tensor]:
    layers = list(range(model.n_layers))
    specs = [Intervention()] * len(train)
    done = evaluate(store, model, train, specs, (), _extract_settings(settings, tuple(layers), 0), log=log)
    h = _last_residuals(store, done.run_id, layers)                            # [n_layers, n, d]
    harmful = torch.tensor([p.label == 1 for p in train])
    diff = h[:, harmful].mean(1) - h[:, ~harmful].mean(1)                      # [n_layers, d]
    norms = diff.norm(dim=-1)
    return diff / norms.clamp_min(1e-12)[:, None], norms


@dataclass(frozen=True)
class _Baseline:
    run_id: str
    verdicts: list[str]                  # val harmful then val harmless, no intervention
    benign_refusal: float | None
    benign_phrase: float | None
    n_harmful: int

    @classmethod
    def measure(cls, store, model, val_h, val_b, judge: Judge, settings, log: Log) -> "_Baseline":
        generate = settings.generate if judge.needs_completion else 0
        prompts = val_h + val_b
        done = evaluate(store, model, prompts, [Intervention()] * len(prompts), (),
                        _extract_settings(settings, tuple(range(model.n_layers)), generate), log=log)
        verdicts, phrase = _verdicts(store, done, judge)
        benign = np.array(verdicts[len(val_h):]) == "refusal"
        return cls(done.run_id, verdicts, rate(benign), rate(phrase[len(val_h):]) if phrase is not None else None,
                   len(val_h))


def _verdicts(store: Store, done, judge: Judge) -> tuple[list[str], np.ndarray | None]:
    """The judge's verdict per request, and whether the phrase judge saw a refusal (None without completions)."""
    main = judge_run(store, done.run_id, judge)["verdict"].to_list()
    verdicts = [main[i] for i in done.items]
    if done.completions and done.completions[0] is not None:
        phrase = judge_run(store, done.run_id, PhraseJudge())["verdict"].to_numpy()
        return verdicts, phrase[done.items] == "refusal"
    return verdicts, None


def _ablation_sweep(store, model, refused: list[Prompt], vectors: torch.Tensor, layers: list[int],
                    judge: Judge, settings, log: Log) -> dict[int, dict[str, float]]:
    generate = settings.generate if judge.needs_completion else 0
    prompts = [p for _ in layers for p in refused]
    specs = [Intervention(direction_ablate=_vec(vectors[layer])) for layer in layers for _ in refused]
    done = evaluate(store, model, prompts, specs, (), _extract_settings(settings, (), generate), log=log)
    verdicts, phrase = _verdicts(store, done, judge)
    out = {}
    for k, layer in enumerate(layers):
        part = slice(k * len(refused), (k + 1) * len(refused))
        out[layer] = {"asr": rate(np.array(verdicts[part]) == "compliance"),
                      "asr_phrase": rate(~phrase[part]) if phrase is not None else None,
                      "mean_p_i": float(done.p_i[part].mean())}
    return out


def _kl_harmless(store, model, val_b: list[Prompt], vectors: torch.Tensor, layers: list[int],
                 base: _Baseline, settings, log: Log) -> dict[int, float]:
    last = model.n_layers - 1
    clean = readout_logits(model, _last_residuals(store, base.run_id, [last])[0][base.n_harmful:])
    log_p = torch.log_softmax(clean, dim=-1)                                   # [n_benign, vocab]
    prompts = [p for _ in layers for p in val_b]
    specs = [Intervention(direction_ablate=_vec(vectors[layer])) for layer in layers for _ in val_b]
    done = evaluate(store, model, prompts, specs, (), _extract_settings(settings, (last,), 0), log=log)
    h = _last_residuals(store, done.run_id, [last])[0][torch.from_numpy(done.items)]
    out = {}
    for k, layer in enumerate(layers):                                         # one layer at a time: vocab is wide
        log_q = torch.log_softmax(readout_logits(model, h[k * len(val_b):(k + 1) * len(val_b)]), dim=-1)
        out[layer] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return out


def _controls(store, model, refused: list[Prompt], val_b: list[Prompt], r: torch.Tensor, layer: int,
              scale: float, judge: Judge, settings, log: Log) -> dict[str, Any]:
    """Random-direction ablation on refused prompts; adding r (or random) at l* on harmless prompts."""
    g = torch.Generator().manual_seed(settings.seed)
    randoms = [v / v.norm() for v in torch.randn(settings.n_random, r.shape[0], generator=g)]
    groups: list[tuple[str, list[Prompt], Intervention]] = []
    groups += [(f"random_ablate_{k}", refused, Intervention(direction_ablate=_vec(v))) for k, v in enumerate(randoms)]
    groups.append(("add", val_b, Intervention(direction_add=DirectionAdd(_vec(r), layer, scale))))
    groups += [(f"random_add_{k}", val_b, Intervention(direction_add=DirectionAdd(_vec(v), layer, scale)))
               for k, v in enumerate(randoms)]
    prompts = [p for _, ps, _ in groups for p in ps]
    specs = [spec for _, ps, spec in groups for _ in ps]
    generate = settings.generate if judge.needs_completion else 0
    done = evaluate(store, model, prompts, specs, (), _extract_settings(settings, (), generate), log=log)
    verdicts, phrase = _verdicts(store, done, judge)
    rates: dict[str, tuple[float | None, float | None]] = {}
    start = 0
    for name, ps, _ in groups:
        part = slice(start, start + len(ps))
        start += len(ps)
        wanted = "compliance" if name.startswith("random_ablate") else "refusal"
        by_phrase = None if phrase is None else rate(~phrase[part] if wanted == "compliance" else phrase[part])
        rates[name] = (rate(np.array(verdicts[part]) == wanted), by_phrase)
    pick = lambda prefix, i: [v[i] for k, v in rates.items() if k.startswith(prefix)]  # noqa: E731
    return {"add_scale": scale, "add_refusal": rates["add"][0], "add_refusal_phrase": rates["add"][1],
            "random_ablation_asr": pick("random_ablate", 0), "random_ablation_asr_phrase": pick("random_ablate", 1),
            "random_add_refusal": pick("random_add", 0), "random_add_refusal_phrase": pick("random_add", 1),
            "runs": {"controls": done.run_id}}


def _cosines(store: Store, base: _Baseline, r: torch.Tensor, n_layers: int) -> dict[str, np.ndarray]:
    """Mean and std of cos(last-token residual, r at l*) per layer, val harmful vs harmless."""
    h = _last_residuals(store, base.run_id, list(range(n_layers)))            # [n_layers, n, d]
    cos = torch.nn.functional.cosine_similarity(h, r[None, None, :], dim=-1)  # [n_layers, n]
    harmful, benign = cos[:, :base.n_harmful], cos[:, base.n_harmful:]
    return {"cos_harmful": harmful.mean(1).numpy(), "cos_harmful_std": harmful.std(1).numpy(),
            "cos_benign": benign.mean(1).numpy(), "cos_benign_std": benign.std(1).numpy()}


def _table(did, vectors, raw_norms, usable, sweep, kl, cos, best, n_refused) -> pl.DataFrame:
    n_layers = vectors.shape[0]
    get = lambda l, key: sweep[l][key] if l in sweep else None  # noqa: E731
    interval = {l: wilson(round(sweep[l]["asr"] * n_refused), n_refused) if l in sweep and n_refused else (None, None)
                for l in range(n_layers)}
    return pl.DataFrame({
        "direction_id": [did] * n_layers, "layer": list(range(n_layers)),
        "vector": [v.tolist() for v in vectors], "raw_norm": raw_norms.tolist(),
        "evaluated": [l in sweep for l in range(n_layers)],
        "n_refused": [n_refused if l in sweep else None for l in range(n_layers)],
        "asr": [get(l, "asr") for l in range(n_layers)],
        "asr_ci_low": [interval[l][0] for l in range(n_layers)],
        "asr_ci_high": [interval[l][1] for l in range(n_layers)],
        "asr_phrase": [get(l, "asr_phrase") for l in range(n_layers)],
        "mean_p_i": [get(l, "mean_p_i") for l in range(n_layers)],
        "kl_harmless": [kl.get(l) for l in range(n_layers)],
        **{k: v.tolist() for k, v in cos.items()},
        "selected": [l == best for l in range(n_layers)],
    }, schema_overrides={"layer": pl.Int16, "vector": pl.List(pl.Float32), "n_refused": pl.Int32,
                         "asr": pl.Float64, "asr_ci_low": pl.Float64, "asr_ci_high": pl.Float64,
                         "asr_phrase": pl.Float64, "mean_p_i": pl.Float64,
                         "kl_harmless": pl.Float64})


def _vec(v: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in v)


def summary_line(r: DirectionResult) -> str:
    """One line: l*, its ablation ASR, and the random-direction control."""
    c = r.controls
    randoms = " ".join(pct(x) for x in c["random_ablation_asr"]) or "-"
    return (f"l* = {r.layer}; ablating r_l* jailbreaks {share_text(c['asr'], c['n_refused'])} of the refused val "
            f"prompts (random directions {randoms}; judge {r.judge})")


def detail_lines(r: DirectionResult) -> list[str]:
    """The per-layer table and both controls."""
    c = r.controls
    lines = [f"{'layer':>5} {'|r|':>8} {'ASR':>5} {'95% CI':>12} {'phrase':>6} {'P(I)':>6} {'KL':>6} {'cos_h':>6} "
             f"{'cos_b':>6}"]
    for row in r.layers.iter_rows(named=True):
        ci = f"[{fmt(row['asr_ci_low'])}, {fmt(row['asr_ci_high'])}]" if row["asr_ci_low"] is not None else "-"
        lines.append(f"{row['layer']:>5} {row['raw_norm']:>8.2f} {fmt(row['asr']):>5} {ci:>12} {fmt(row['asr_phrase']):>6} "
                     f"{fmt(row['mean_p_i'], '.3f'):>6} {fmt(row['kl_harmless']):>6} {row['cos_harmful']:>6.3f} "
                     f"{row['cos_benign']:>6.3f}{'  <- l*' if row['selected'] else ''}")
    listed = lambda xs: " ".join(fmt(x) for x in xs) or "-"  # noqa: E731
    lines.append(f"ablation at every layer, {c['n_refused']} refused val prompts: r_l* ASR {fmt(c['asr'])} "
                 f"(phrase judge {fmt(c['asr_phrase'])}); random directions ASR {listed(c['random_ablation_asr'])} "
                 f"(phrase {listed(c['random_ablation_asr_phrase'])})")
    lines.append(f"adding at layer {r.layer} (scale {c['add_scale']:.2f}), {c['n_val_benign']} harmless val prompts: "
                 f"refusal r_l* {fmt(c['add_refusal'])} (phrase {fmt(c['add_refusal_phrase'])}), "
                 f"random {listed(c['random_add_refusal'])}, none {fmt(c['baseline_benign_refusal'])}")
    return lines
