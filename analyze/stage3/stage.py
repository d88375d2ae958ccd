"""Stage 3, interaction discovery (paper section 3.3): FM over SAE activations, then the ablation sweep.

1. Data: every latent at the last `n_last` tokens of AdvBench (1) and Alpaca (0) prompts, layers
   2..l*, split as recorded in `prompts` (stage3/data.py); missing activations are extracted.
2. A factorization machine (stage3/fm.py) and a logistic-regression probe (stage3/probe.py) on
   the same max-abs-scaled rows; FMs at the diagnostic embedding sizes too (mean pairwise cosine).
3. Ranking, per prompt with a stage-2 set S (the FM seeds are all of S): the candidates are the latents active on that prompt
   (in the FM's layers and positions), minus S. FM score = MAX over s in S of cos(v_candidate, v_s):
   a latent that interacts strongly with any one member of the minimal set is a candidate, where
   the mean would let a large S dilute it (`aggregate="mean"` is available). Stage-2 latents that
   are not FM columns (never active in training) cannot be compared and are skipped; a prompt none
   of whose stage-2 latents is a column is left out of the sweep and counted. The probe ranks the
   same candidates by |weight|.
4. Sweep: for each K, one extraction run that zero-ablates S' + top-K on every swept prompt, with a
   greedy completion; each prompt is judged; ASR(K) = share judged jailbroken. S' is the paper's set
   by default (`stage2_set = "active"`): the members of S active at some position of the prompt's clean
   run; the paper removes the redundant (dormant) stage-2 features before adding the FM's top-K ("372
   jailbroken by ablating active features"). `stage2_set = "full"` ablates all of S (the default before
   issue 15). K = 0 (S' alone) is the reference. A prompt's stage-3 set is its FM top-K at the smallest K
   that jailbreaks it; it is then ablated alone (ranker `stage3_alone`: the paper's 330 of 372). The
   probe runs at the same Ks as the FM unless `probe_ks` is given, and at every K both ran the two are
   compared on the same prompts (McNemar's exact test, Newcombe's paired interval: `paired_tests`).

Judging: analyze/judges.py, the stages' default judge (`rubric`: the content rules plus a fitted test
for degenerate output; see `cli.py judge eval`); jailbroken = compliance. Verdicts are stored in `judgements`. `p_i@T` judges on P("I")
alone and skips generation.

Where things come from: the stage-2 sets are the selected `feature_sets` rows of a prune analysis
(the newest for the model unless `prune_id`); l* is the selected layer of the direction behind it
(prune -> candidates -> direction); the SAEs are the candidates analysis' SAEs, so the sweep ablates
with the SAEs that found the stage-2 sets. The sweep is an `analyses` row of kind 'stage3'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from analyze import catalog
from analyze.catalog import latest_analysis
from analyze.common import Feature, Log, no_log, stored_prompts
from analyze.metrics import accuracy_text, rate_text
from analyze.settings import JudgedPromptSettings
from analyze.stage3 import data as fm_data
from analyze.stage3.data import FmData
from analyze.stage3.fm import FmSettings
from analyze.stage3.models import _similarity, fit_fm, fit_probe
from analyze.stage3.probe import ProbeSettings
from analyze.stage3.rank import AGGREGATES
from analyze.stage3.sweep import _sweep
from analyze.text import fmt, span
from extract.datasets import Prompt, load_prompts
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef, extract, make_items
from store import Store, UsageError

CANDIDATES = ("active", "all")
STAGE2_SETS = ("active", "full")


@dataclass(frozen=True)
class Stage3Settings(JudgedPromptSettings):
    prune_id: str | None = None           # whose stage-2 sets; None: the model's newest prune analysis
    layers: tuple[int, ...] = ()          # FM input layers; () = min_layer..l*
    min_layer: int = 2                    # paper: layers 2..l*
    n_last: int = 4                       # last token positions summed per latent (paper: 4)
    harmful: str = "advbench"             # label 1
    benign: str = "alpaca"                # label 0
    limit: int = 520                      # prompts per dataset (seeded; splits fixed per prompt)
    seed: int = 0
    min_train_prompts: int = 1            # a latent is an FM column when active on this many train prompts
    saes: tuple[str, ...] = ()            # LAYER=SOURCE; () = the candidates analysis' SAEs, else the store's
    fm: FmSettings = field(default_factory=FmSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    diagnostic_embeddings: tuple[int, ...] = (5, 20, 50)
    sweep: bool = True                    # False: fit, compare and diagnose only (no stage-2 sets needed)
    ks: tuple[int, ...] = tuple(range(100, 2001, 100))
    probe_ks: tuple[int, ...] | None = None   # None: the FM's ks, so FM and probe are paired at every K
    aggregate: str = "max"                # FM score over the stage-2 set: max | mean of cosines
    candidates: str = "active"            # active: latents active on the prompt; all: every FM column
    # what of the stage-2 set is ablated under the top-K: active (the paper: its dormant, redundant features
    # removed first, "jailbroken by ablating active features"), or full (dormant ones too: the old default)
    stage2_set: str = "active"

    @property
    def probe_k_values(self) -> tuple[int, ...]:
        """The probe's Ks: probe_ks, or the FM's when None."""
        return self.ks if self.probe_ks is None else self.probe_ks

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ints(self.layers, "layers", low=0)
        for name in ("n_last", "limit", "min_train_prompts", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_layer < 0:
            raise UsageError(f"min_layer must be >= 0, got {self.min_layer}")
        _check_ints(self.diagnostic_embeddings, "diagnostic embeddings", low=1)
        _check_ints(self.ks, "ks", low=1)
        _check_ints(self.probe_k_values, "probe ks", low=1)
        if self.sweep and not self.ks:
            raise UsageError("the sweep needs at least one K")
        for name, value, allowed in (("aggregate", self.aggregate, AGGREGATES),
                                     ("candidates", self.candidates, CANDIDATES),
                                     ("stage2_set", self.stage2_set, STAGE2_SETS)):
            if value not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.generate == 0 and not self.judge.startswith("p_i"):
            raise UsageError(f"judge {self.judge} reads completions: set generate > 0, or use a p_i@T judge")


@dataclass(frozen=True, eq=False)
class Stage3Result:
    fm_model_id: str
    probe_model_id: str
    layers: tuple[int, ...]
    n_features: int
    n_prompts: dict[str, int]             # FM data prompts per split
    fm_accuracy: dict[str, float]
    probe_accuracy: dict[str, float]
    probe_C: float
    similarity: pl.DataFrame              # embedding, model_id, best_epoch, test_acc, mean_cosine
    sweep_id: str | None = None           # the analyses row (kind 'stage3') of the sweep
    prune_id: str | None = None
    judge: str | None = None
    asr: pl.DataFrame | None = None       # ranker, k, n_prompts, n_jailbroken, asr, run_id
    n_swept: int = 0                      # stage-2 prompts swept
    n_skipped: int = 0                    # stage-2 prompts without any stage-2 latent among the FM columns
    n_stage3_sets: int = 0
    paired: tuple = ()                    # (K, metrics.Paired): FM against probe on the same prompts


def run(store: Store, model: LoadedModel, settings: Stage3Settings,
        stage2: Mapping[str, Sequence[Feature]] | None = None, log: Log = no_log) -> Stage3Result:
    """Fit FM and probe on the store's activations, diagnose, and (settings.sweep) run the ablation sweep.

    `stage2` maps prompt_id -> its stage-2 (layer, feature) set; None reads a prune analysis' sets.
    """
    prune, cand = _lineage(store, model.name, settings, stage2 is not None)
    if prune is not None:
        stage2 = stage2_sets(store, prune["analysis_id"])
    stage2 = dict(stage2 or {}) if settings.sweep else {}
    layers = settings.layers or default_layers(store, model.name, cand, settings.min_layer)
    saes = _sae_refs(store, model, settings, layers, stage2, cand)
    fm_prompts = _fm_prompts(settings)
    swept = stored_prompts(store, sorted(stage2)) if stage2 else []
    prompts = list({p.prompt_id: p for p in fm_prompts + swept}.values())
    fm_saes = [r for r in saes if r.layer in layers]
    ensure_activations(store, model, prompts, fm_saes, settings, log)
    data = fm_data.build(store, model.name, [p.prompt_id for p in prompts], {r.layer: r.sae_id for r in fm_saes},
                         settings.n_last, settings.min_train_prompts)
    data = data.scaled(data.column_scale())
    train = data.rows(np.isin(np.array(data.prompt_ids), [p.prompt_id for p in fm_prompts]))
    info = _data_info(model.name, fm_saes, settings, train)
    log(f"FM data: {train.n_rows} prompts, {train.n_features} latents, {train.nnz} non-zeros")
    fm_fit, fm_id = fit_fm(store, train, settings.fm, info)
    probe_fit, probe_id = fit_probe(store, train, settings.probe, info)
    similarity = _similarity(store, train, settings, info, (fm_fit, fm_id), log)
    result = Stage3Result(fm_id, probe_id, tuple(layers), train.n_features,
                          {s: int((train.split == s).sum()) for s in fm_data.SPLITS}, fm_fit.accuracy,
                          probe_fit.accuracy, probe_fit.C, similarity,
                          prune_id=prune["analysis_id"] if prune else None)
    if not settings.sweep:
        return result
    active = (active_stage2(store, model, swept, stage2, _stage2_refs(store, model, saes, stage2, cand))
              if settings.stage2_set == "active" else None)
    return _sweep(store, model, saes, settings, data, swept, stage2, (fm_fit, fm_id), (probe_fit, probe_id),
                  result, log, active)


# ---- inputs ------------------------------------------------------------------------------------

def _lineage(store: Store, model: str, settings: Stage3Settings,
             stage2_given: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(prune analysis, its candidates analysis) when the stage-2 sets come from the store, else (None, None)."""
    if not settings.sweep or stage2_given:
        return None, None
    prune = latest_analysis(store, "prune", model, settings.prune_id)
    return prune, latest_analysis(store, "candidates", model, prune["parent_id"])


def stage2_sets(store: Store, prune_id: str) -> dict[str, tuple[Feature, ...]]:
    """prompt_id -> the prompt's selected stage-2 set of (layer, feature), from `feature_sets`."""
    sets = catalog.feature_sets(store, prune_id, stage=2)
    if not sets:
        raise UsageError(f"prune analysis {prune_id} has no selected stage-2 sets; nothing to sweep "
                         "(pass --no-sweep to fit and compare only)")
    return sets


def default_layers(store: Store, model: str, cand: dict[str, Any] | None, min_layer: int) -> tuple[int, ...]:
    """min_layer..l*, l* the selected layer of the direction behind `cand` (else the model's newest direction)."""
    from analyze.direction import load_direction

    direction = latest_analysis(store, "direction", model, cand["parent_id"] if cand else None)
    l_star = load_direction(store, direction["analysis_id"])[0]
    if l_star < min_layer:
        raise UsageError(f"l* = {l_star} is below the FM's first layer {min_layer}; pass --layers")
    return tuple(range(min_layer, l_star + 1))


def active_stage2(store: Store, model: LoadedModel, prompts: Sequence[Prompt], stage2: Mapping[str, Sequence[Feature]],
                  refs: Sequence[SaeRef]) -> dict[str, tuple[Feature, ...]]:
    """prompt_id -> the members of its stage-2 set active (> 0) at some position of its clean run (`refs`' layers).

    With the prune analysis' SAEs and prompts this is prune's own clean run: a store hit."""
    done = extract(store, model, make_items(model, prompts), list(refs), ExtractSettings(positions="all"))
    df = store.sql("SELECT DISTINCT t.prompt_id, a.layer, a.feature FROM sae_acts a JOIN tokens t USING (run_id, row) "
                   "WHERE a.run_id = ?", [done.run_id])
    fired = set(df.iter_rows())
    return {p: tuple(f for f in feats if (p, *f) in fired) for p, feats in stage2.items()}


def _stage2_refs(store: Store, model: LoadedModel, saes: Sequence[SaeRef], stage2: Mapping[str, Sequence[Feature]],
                 cand: dict[str, Any] | None) -> list[SaeRef]:
    """The SAEs prune used (the candidates analysis' less its excluded layers), else the stage's own (FM and
    stage-2 layers)."""
    if cand is not None:
        from analyze.common import load_saes

        excluded = set(cand["settings"].get("exclude_layers", ()))
        return [r for r in load_saes(store, model, cand["settings"].get("saes", ())) if r.layer not in excluded]
    return list(saes)


def _fm_prompts(settings: Stage3Settings) -> list[Prompt]:
    harmful = load_prompts(settings.harmful, settings.limit, settings.seed)
    benign = load_prompts(settings.benign, settings.limit, settings.seed)
    for prompts, name, label in ((harmful, settings.harmful, 1), (benign, settings.benign, 0)):
        if any(p.label != label for p in prompts):
            raise UsageError(f"the FM's {'harmful' if label else 'benign'} set {name} must be labelled {label} "
                             "throughout (a user file: give every row that label)")
    return harmful + benign


def _sae_refs(store: Store, model: LoadedModel, settings: Stage3Settings, layers: Sequence[int],
              stage2: Mapping[str, Sequence[Feature]], cand: dict[str, Any] | None) -> list[SaeRef]:
    """SAEs at the FM layers and the stage-2 layers: explicit, else the candidates analysis', else the store's."""
    from extract.saes import resolve_saes

    specs = settings.saes or (tuple(cand["settings"].get("saes", ())) if cand else ())
    needed = sorted(set(layers) | {layer for feats in stage2.values() for layer, _ in feats})
    return resolve_saes(store, model, tuple(specs), ",".join(map(str, needed)))


def ensure_activations(store: Store, model: LoadedModel, prompts: Sequence[Prompt], saes: Sequence[SaeRef],
                       settings: Stage3Settings, log: Log = no_log) -> list[str]:
    """Extract the (prompt, layer) activations that the store lacks, one run per missing group; run ids."""
    absent = fm_data.missing(store, model.name, [p.prompt_id for p in prompts],
                             {r.layer: r.sae_id for r in saes}, settings.n_last)
    groups: dict[tuple[str, ...], list[int]] = {}
    for layer, prompt_ids in absent.items():
        groups.setdefault(prompt_ids, []).append(layer)
    by_id = {p.prompt_id: p for p in prompts}
    run_ids = []
    for prompt_ids, layers in groups.items():
        log(f"extracting {len(prompt_ids)} prompts at layers {layers} (last {settings.n_last} positions)")
        items = make_items(model, [by_id[p] for p in prompt_ids])
        refs = [r for r in saes if r.layer in layers]
        es = ExtractSettings(positions=f"last:{settings.n_last}", batch_size=settings.batch_size)
        run_ids.append(extract(store, model, items, refs, es).run_id)
    return run_ids


def _data_info(model: str, saes: Sequence[SaeRef], settings: Stage3Settings, data: FmData) -> dict[str, Any]:
    return {"model": model, "layers": sorted(r.layer for r in saes), "sae_ids": {str(r.layer): r.sae_id for r in saes},
            "n_last": settings.n_last, "datasets": [settings.harmful, settings.benign], "limit": settings.limit,
            "seed": settings.seed, "min_train_prompts": settings.min_train_prompts, "scaling": "maxabs(train)",
            "n_prompts": {s: int((data.split == s).sum()) for s in fm_data.SPLITS},
            "n_features": data.n_features, "nnz": data.nnz, "data_hash": data.fingerprint()}


# ---- presenting --------------------------------------------------------------------------------

def asr_table(asr: pl.DataFrame) -> pl.DataFrame:
    """ASR side by side: k, stage2 (k = 0 only), fm, probe (null where that ranker was not run at k)."""
    wide = asr.pivot(on="ranker", index="k", values="asr", aggregate_function="first").sort("k")
    return wide.select("k", *[c for c in ("stage2", "fm", "probe") if c in wide.columns])


def _check_ints(values: tuple[int, ...], name: str, low: int) -> None:
    if any(not isinstance(v, int) or isinstance(v, bool) or v < low for v in values):
        raise UsageError(f"{name} must be integers >= {low}, got {list(values)}")
    if list(values) != sorted(set(values)):
        raise UsageError(f"{name} must be ascending and distinct, got {list(values)}")


def summary_line(r: Stage3Result) -> str:
    """One line: FM vs probe test accuracy, the sweep's best ASR per ranker, FM vs probe at the FM's best K with
    McNemar's p, the stage-3 sets alone."""
    n = r.n_prompts.get("test", 0)
    acc = lambda a: accuracy_text(a, n) if n else f"{a:.3f}"  # noqa: E731
    line = (f"FM test accuracy {acc(r.fm_accuracy['test'])} vs probe {acc(r.probe_accuracy['test'])} "
            f"({n} test prompts, Wilson) on {r.n_features} latents at layers {span(list(r.layers))}")
    if r.asr is None:
        return line
    top = (r.asr.filter(pl.col("ranker") != "stage3_alone").sort("asr", "k", descending=[True, False])
           .unique("ranker", keep="first", maintain_order=True))
    best = {row["ranker"]: rate_text(row["n_jailbroken"], row["n_prompts"]) for row in top.iter_rows(named=True)}
    fm_k = top.filter(pl.col("ranker") == "fm")["k"].to_list()
    at = dict(r.paired)
    versus = (f"; at K={fm_k[0]} FM minus probe {at[fm_k[0]].text()}" if fm_k and fm_k[0] in at else "")
    alone = r.asr.filter(pl.col("ranker") == "stage3_alone")
    alone_text = (f"; stage-3 sets alone {rate_text(alone['n_jailbroken'][0], alone['n_prompts'][0])}"
                  if alone.height else "")
    return line + (f"; ASR on {r.n_swept} stage-2 prompts: set alone {best.get('stage2', '-')}, + FM top-K up to "
                   f"{best.get('fm', '-')}, + probe top-K up to {best.get('probe', '-')}{versus}; "
                   f"{r.n_stage3_sets} stage-3 sets{alone_text}")


def detail_lines(r: Stage3Result) -> list[str]:
    """The fits, the embedding-size diagnostic, and the sweep's ASR per K with FM against probe."""
    n = r.n_prompts
    acc = lambda a: f"test {a['test']:.3f} (train {a['train']:.3f}, val {a['val']:.3f})"  # noqa: E731
    lines = [f"FM data: layers {span(list(r.layers))}, {r.n_features} latents, prompts train {n['train']} / "
             f"val {n['val']} / test {n['test']}",
             f"FM    {r.fm_model_id}: accuracy {acc(r.fm_accuracy)}",
             f"probe {r.probe_model_id}  C={r.probe_C:g}: accuracy {acc(r.probe_accuracy)}",
             f"{'k':>4} {'test acc':>8} {'mean cos':>8} {'epoch':>5}"]
    for row in r.similarity.iter_rows(named=True):
        lines.append(f"{row['embedding']:>4} {row['test_acc']:>8.3f} {row['mean_cosine']:>8.3f} {row['best_epoch']:>5}")
    if r.asr is None:
        return lines
    lines.append(f"sweep {r.sweep_id} (judge {r.judge}): {r.n_swept} stage-2 prompts swept, {r.n_skipped} skipped "
                 "(no stage-2 latent among the FM's columns)")
    cell = {(row["ranker"], row["k"]): rate_text(row["n_jailbroken"], row["n_prompts"])
            for row in r.asr.iter_rows(named=True)}
    at = dict(r.paired)
    lines.append(f"{'K':>5}  {'stage2':<20} {'FM':<20} {'probe':<20} FM minus probe")
    for k in sorted({k for _, k in cell}):
        if k == 0 and ("stage2", 0) not in cell:
            continue
        lines.append(f"{k:>5}  {cell.get(('stage2', k), '-'):<20} {cell.get(('fm', k), '-'):<20} "
                     f"{cell.get(('probe', k), '-'):<20} {at[k].text() if k in at else '-'}")
    if ("stage3_alone", 0) in cell:
        lines.append(f"stage-3 sets alone (each prompt's FM top-K at its smallest jailbreaking K, without stage 2): "
                     f"{cell[('stage3_alone', 0)]}")
    return lines
