"""Redundancy (paper section 5): dormant "hydra" features of the stage-2 sets and the stage-2/stage-3 links.

1. Dormant features. A prompt's stage-2 set is its selected set in `feature_sets` (stage 2). A
   feature of it is *inactive* on the prompt when the prompt's clean run (empty intervention,
   every token position, SAE threshold 0.0) has no `sae_acts` row for it at ANY position: z <= 0
   at every prompt token, the first one included.
2. For prompts with dormant features, one run ablates per prompt the whole set (`set`), the dormant
   features alone (`inactive`) and the set without them (`active`), each item judged. A prompt is
   *kept* when the set jailbreaks and the set without its dormant features does not.
3. In the `active` items: which dormant features fire (they were 0 everywhere before), where, on
   which token roles. Shares are over (feature, position) events of kept prompts, with and without
   position 0. `upstream` marks a feature with an ablated feature at a lower layer (the change came
   through the model); with only same-layer ablations the SAE re-reads its own edit (captures run
   after the intervention), which is not a backup circuit.
   Position 0 on the default model carries massive activations (norm ~2,266 against ~22): the
   project's SAEs are trained without role='first' rows (extract/sae_train.py), so a latent that "switches on"
   there may be an SAE reading a position it never saw. The shares without position 0 say how much
   of the effect survives outside it.
4. Clamping (analyze/clamping.py): the features of item 3 (kept prompts) set to 2..10 on the
   first token of the paper's benign prompts, greedy completions.
5. Links: each prompt's stage-3 set alone ablated (`stage3`), judged: how many stage-2 jailbreaks it
   reproduces; of the stage-2 features active on the clean run, how many it switches off (zero at
   every position) and how much the rest drop (1 - sum ablated / sum clean over positions).
   Skipped, and said so, when the store has no stage-3 sets.

Judging goes through analyze/judges.py (default `content`: ASR counts compliance only). SAEs are the
ones the stage-2 set checks ran with (their runs' `sae_set`), then `saes` overrides, then the store's
trained SAEs. Every forward is an extraction run, so a rerun finds all of them in the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import polars as pl

from analyze import clamping
from analyze.common import Feature, Log, ablation, analysis_id, model_key, no_log, stored_prompts
from analyze.catalog import ablates_first, latest_analysis
from analyze.judges import Judge, get_judge, judge_run
from extract.chat import ROLES
from extract.datasets import Prompt
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.saes import trained_saes
from extract.run import ExtractSettings, SaeRef, extract, make_items
from extract.saes import load_sae
from store import Store, UsageError
from store.store import code_version
from analyze.settings import JudgedPromptSettings
from analyze.metrics import wilson
from analyze.text import share_text

KINDS = ("clean", "set", "inactive", "active", "stage3")
TABLES = ("redundancy_features", "redundancy_ablations", "redundancy_prompts", "redundancy_switch_on",
          "redundancy_clamping", "redundancy_links")
_KEYS = ["prompt_id", "layer", "feature"]

# per (item, layer, feature) asked for in `wanted`: every stored position where it fires in one run
_SET_ACTS = """
SELECT t.item, t.prompt_id, a.layer, a.feature, a.row, t.pos, t.token_id, t.token_text, t.role, a.value
FROM sae_acts a
JOIN tokens t ON t.run_id = a.run_id AND t.row = a.row
JOIN wanted w ON w.item = t.item AND w.layer = a.layer AND w.feature = a.feature
WHERE a.run_id = ?
ORDER BY t.item, a.layer, a.feature, t.pos
"""


@dataclass(frozen=True)
class RedundancySettings(JudgedPromptSettings):
    prune_id: str | None = None           # stage-2 sets (feature_sets.set_id); None: the model's newest prune
    stage3_id: str | None = None          # stage-3 sets; None: the model's newest, "none": skip item 5
    saes: tuple[str, ...] = ()            # LAYER=SOURCE, over the SAEs the stage-2 checks ran with
    clamp_values: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0, 10.0)
    clamp_positions: tuple[int, ...] = (0,)   # the first token: BOS, or <|im_start|> on Qwen
    clamp_generate: int = 32              # greedy tokens of the clamping table
    benign_prompts: tuple[str, ...] = clamping.BENIGN_PROMPTS

    def __post_init__(self) -> None:
        super().__post_init__()
        for entry in self.saes:
            layer, sep, source = entry.partition("=")
            if not sep or not layer.strip().isdigit() or not source.strip():
                raise UsageError(f"--sae must be LAYER=SOURCE, got {entry!r}")
        if self.generate < 1 or self.clamp_generate < 1 or self.batch_size < 1:
            raise UsageError("generate, clamp_generate and batch_size must be >= 1")
        if list(self.clamp_positions) != sorted(set(self.clamp_positions)) or not self.clamp_positions:
            raise UsageError(f"clamp_positions must be distinct and ascending, got {self.clamp_positions}")
        if not all(isinstance(v, (int, float)) and abs(v) < float("inf") for v in self.clamp_values):
            raise UsageError(f"clamp_values must be finite numbers, got {self.clamp_values}")
        if not self.benign_prompts or not all(t.strip() for t in self.benign_prompts):
            raise UsageError("benign_prompts must be non-empty texts")


@dataclass(frozen=True, eq=False)
class RedundancyResult:
    analysis_id: str
    prune_id: str
    stage3_id: str | None
    judge: str                            # judge id (name:hash)
    metrics: dict[str, Any]               # what `summary` prints; stored in redundancy_analyses.metrics
    tables: dict[str, pl.DataFrame] = field(repr=False)   # redundancy_* table -> its rows of this analysis


def run(store: Store, model: LoadedModel, settings: RedundancySettings, log: Log = no_log) -> RedundancyResult:
    """Items 1-5 above over the model's stage-2 (and stage-3) sets; everything stored in redundancy_*."""
    judge = get_judge(settings.judge)
    prune_id = latest_analysis(store, "prune", model.name, settings.prune_id)["analysis_id"]
    sets = _limit(stage_sets(store, prune_id, 2), settings.max_prompts)
    if sets.is_empty():
        raise UsageError(f"prune analysis {prune_id} has no selected stage-2 sets; run `python cli.py analyze prune`")
    stage3_id = _stage3_id(store, model.name, prune_id, settings.stage3_id)
    s3 = stage_sets(store, stage3_id, 3).join(sets.select("prompt_id").unique(), on="prompt_id") \
        if stage3_id else sets.clear()
    saes = _sae_refs(store, model, settings, prune_id, stage3_id, _layers(sets) | _layers(s3))
    aid = analysis_id("redundancy", model_key(model), prune_id, settings,
                      {"stage3": stage3_id, "saes": {str(s.layer): s.source for s in saes}})
    prompts = stored_prompts(store, sets["prompt_id"].unique(maintain_order=True).to_list())
    s2_saes = [s for s in saes if s.layer in _layers(sets)]
    runner = _Runner(store, model, judge, settings, log, ablates_first(store, prune_id))

    log(f"item 1: clean run of {len(prompts)} prompts with stage-2 sets")
    clean = runner.judged("clean", prompts, [Intervention()] * len(prompts), s2_saes, [0] * len(prompts))
    features = dormant_features(store, clean, sets)
    log(f"item 2: {features['inactive'].sum()} dormant of {features.height} set features; ablating")
    ablations = hydra_ablations(runner, prompts, features, clean, s2_saes)
    per_prompt = _per_prompt(features, ablations)
    switch_on = switched_on(store, ablations, features)
    clamped = _clamp(runner, s2_saes, switch_on, per_prompt)
    links = pl.DataFrame()
    if not s3.is_empty():
        log(f"item 5: stage-3 sets alone on {s3['prompt_id'].n_unique()} prompts")
        stage3_rows, links = stage3_links(runner, prompts, s3, features, saes)
        ablations = pl.concat([ablations, stage3_rows])
    metrics = _metrics(features, ablations, per_prompt, switch_on, clamped, links, stage3_id, settings)
    tables = {"redundancy_features": features.drop("item"), "redundancy_ablations": ablations,
              "redundancy_prompts": per_prompt, "redundancy_switch_on": switch_on,
              "redundancy_clamping": clamped.drop("verdict", "clamp_source", strict=False),
              "redundancy_links": links}
    runs = {kind: _run_of(ablations, kind) for kind in ("clean", "set", "stage3")} | {"clamp": _run_of(clamped)}
    _save(store, aid, model.name, prune_id, stage3_id, judge.judge_id, saes, settings, runs, metrics, tables)
    return RedundancyResult(aid, prune_id, stage3_id, judge.judge_id, metrics,
                            tables | {"redundancy_clamping": clamped})


# ---- inputs -----------------------------------------------------------------------------------

def stage_sets(store: Store, set_id: str, stage: int) -> pl.DataFrame:
    """prompt_id, layer, feature of the selected sets of one analysis at one stage."""
    return store.sql("SELECT DISTINCT prompt_id, layer, feature FROM feature_sets "
                     "WHERE set_id = ? AND stage = ? AND selected ORDER BY ALL", [set_id, stage])


def _limit(sets: pl.DataFrame, max_prompts: int | None) -> pl.DataFrame:
    if max_prompts is None:
        return sets
    keep = sets["prompt_id"].unique().sort().head(max_prompts)
    return sets.filter(pl.col("prompt_id").is_in(keep.implode()))


def _layers(sets: pl.DataFrame) -> set[int]:
    return {int(layer) for layer in sets["layer"].unique()} if sets.height else set()


def _stage3_id(store: Store, model: str, prune_id: str, wanted: str | None) -> str | None:
    """The stage-3 sets to link: the sweep asked for, else the newest sweep (an `fm` analysis) of the model
    built on these stage-2 sets (or on sets passed in) that has sets, else None."""
    if wanted == "none":
        return None
    if wanted:
        if store.sql("SELECT 1 FROM feature_sets WHERE set_id = ? AND stage = 3 LIMIT 1", [wanted]).is_empty():
            raise UsageError(f"no stage-3 sets {wanted} in {store.path}; run `python cli.py analyze stage3` or drop --stage3")
        return wanted
    df = store.sql("SELECT a.analysis_id FROM analyses a WHERE a.kind = 'stage3' AND a.model = ? "
                   "AND (a.parent_id = ? OR a.parent_id IS NULL) AND EXISTS (SELECT 1 FROM feature_sets f "
                   "WHERE f.set_id = a.analysis_id AND f.stage = 3 AND f.selected) ORDER BY a.created_at DESC LIMIT 1",
                   [model, prune_id])
    return None if df.is_empty() else df.item(0, 0)


def _sae_refs(store: Store, model: LoadedModel, settings: RedundancySettings, prune_id: str,
              stage3_id: str | None, layers: set[int]) -> list[SaeRef]:
    """SAEs at `layers`: the stage-2/3 runs' own, overridden by settings.saes, else the store's trained ones."""
    sources = _recorded_sources(store, prune_id, stage3_id)
    sources.update({int(l): s.strip() for l, _, s in (e.partition("=") for e in settings.saes)})
    trained = trained_saes(store, model.name)
    refs = []
    for layer in sorted(layers):
        source = sources.get(layer, trained.get(layer))
        if source is None:
            raise UsageError(f"no SAE for {model.name} layer {layer}, where the sets have features; "
                             f"pass --sae {layer}=SOURCE")
        refs.append(SaeRef(layer, source, load_sae(source, layer=layer, device=model.device)))
    return refs


def _recorded_sources(store: Store, prune_id: str, stage3_id: str | None) -> dict[int, str]:
    """layer -> SAE source of the runs that checked the stage-2 sets and swept the stage-3 ones."""
    df = store.sql("SELECT DISTINCT sae_set FROM runs WHERE run_id IN (SELECT run_id FROM set_checks "
                   "WHERE set_id = ? UNION SELECT run_id FROM stage3_outcomes WHERE sweep_id = ?)",
                   [prune_id, stage3_id or ""])
    sources: dict[int, str] = {}
    for raw in df["sae_set"].to_list():
        for layer, source in (json.loads(raw) if raw else {}).items():
            if sources.setdefault(int(layer), source) != source:
                raise UsageError(f"the stage-2/3 runs used different SAEs at layer {layer}; "
                                 f"choose one with --sae {layer}=SOURCE")
    return sources


# ---- runs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Runner:
    """Judged extraction runs at every position (SAE threshold 0.0), one per call."""

    store: Store
    model: LoadedModel
    judge: Judge
    settings: RedundancySettings
    log: Log
    first: bool = True                    # ablate at position 0 too: the prune analysis' rule (catalog.ablates_first)

    def judged(self, kind: str, prompts: Sequence[Prompt], specs: Sequence[Intervention], saes: Sequence[SaeRef],
               n_features: Sequence[int]) -> pl.DataFrame:
        """A row per (prompt, spec): prompt_id, kind, n_features, run_id, item, p_i, verdict, jailbroken."""
        generate = self.settings.generate if self.judge.needs_completion else 0
        es = ExtractSettings(positions="all", generate=generate, batch_size=self.settings.batch_size)
        result = extract(self.store, self.model, make_items(self.model, prompts, list(specs)), saes, es)
        self.log(f"  {kind}: run {result.run_id}{' (in the store)' if result.cached else ''}, {len(prompts)} items")
        verdicts = judge_run(self.store, result.run_id, self.judge).sort("item")
        p_i = self.store.sql("SELECT p_i FROM items WHERE run_id = ? ORDER BY item", [result.run_id])["p_i"]
        return pl.DataFrame({
            "prompt_id": [p.prompt_id for p in prompts], "kind": [kind] * len(prompts),
            "n_features": list(n_features), "run_id": [result.run_id] * len(prompts),
            "item": range(len(prompts)), "p_i": p_i, "verdict": verdicts["verdict"],
        }, schema={"prompt_id": pl.String, "kind": pl.String, "n_features": pl.Int32, "run_id": pl.String,
                   "item": pl.Int32, "p_i": pl.Float32, "verdict": pl.String}).with_columns(
            (pl.col("verdict") == "compliance").alias("jailbroken"))


def set_acts(store: Store, run_id: str, wanted: pl.DataFrame) -> pl.DataFrame:
    """Every stored position where the asked-for (item, layer, feature) fires in one run, with its token."""
    wanted = wanted.select(pl.col("item").cast(pl.Int32), pl.col("layer").cast(pl.Int16),
                           pl.col("feature").cast(pl.Int32)).unique()
    return store.sql(_SET_ACTS, [run_id], frames={"wanted": wanted})


# ---- item 1: dormant features -----------------------------------------------------------------

def dormant_features(store: Store, clean: pl.DataFrame, sets: pl.DataFrame) -> pl.DataFrame:
    """Each set feature on its prompt's clean run: n_active_pos, max/sum/first value, inactive; plus `item`."""
    wanted = sets.join(clean.select("prompt_id", "item"), on="prompt_id")
    acts = set_acts(store, clean["run_id"][0], wanted)
    per = acts.group_by(_KEYS).agg(
        pl.len().cast(pl.Int32).alias("n_active_pos"), pl.col("value").max().alias("max_value"),
        pl.col("value").sum().alias("sum_value"),
        pl.col("value").filter(pl.col("role") == "first").sum().alias("first_value"))
    return (wanted.join(per, on=_KEYS, how="left")
            .with_columns(pl.col("n_active_pos").fill_null(0), pl.col("max_value", "sum_value", "first_value")
                          .fill_null(0.0).cast(pl.Float32))
            .with_columns((pl.col("n_active_pos") == 0).alias("inactive")).sort(_KEYS))


# ---- item 2: ablate the dormant part, the active part, the whole set --------------------------

def hydra_ablations(runner: _Runner, prompts: Sequence[Prompt], features: pl.DataFrame, clean: pl.DataFrame,
                    saes: Sequence[SaeRef]) -> pl.DataFrame:
    """Judged rows: clean, set for every prompt; inactive and active where the set has dormant features."""
    by_id = {p.prompt_id: p for p in prompts}
    plan: list[tuple[str, str, list[Feature]]] = []
    for (pid,), group in features.group_by("prompt_id", maintain_order=True):
        every = list(zip(group["layer"].to_list(), group["feature"].to_list()))
        dormant = [f for f, off in zip(every, group["inactive"]) if off]
        plan.append((pid, "set", every))
        if dormant:
            plan.append((pid, "inactive", dormant))
            plan.append((pid, "active", [f for f in every if f not in dormant]))
    runs = [(pid, kind, fs) for pid, kind, fs in plan if fs]
    done = runner.judged("ablations", [by_id[p] for p, _, _ in runs], [ablation(fs, runner.first) for _, _, fs in runs], saes,
                         [len(fs) for _, _, fs in runs]).with_columns(pl.Series("kind", [k for _, k, _ in runs]))
    # the set without its dormant features may be empty: its ablation is the clean run
    empty = clean.join(pl.DataFrame({"prompt_id": [p for p, _, fs in plan if not fs]}, schema={"prompt_id": pl.String}),
                       on="prompt_id")
    return pl.concat([clean, done, empty.with_columns(pl.lit("active").alias("kind"))]).sort("prompt_id", "kind")


def _per_prompt(features: pl.DataFrame, ablations: pl.DataFrame) -> pl.DataFrame:
    """n_set, n_active, n_inactive, kept (the set jailbreaks, the set without its dormant features does not)."""
    outcome = ablations.pivot(on="kind", index="prompt_id", values="jailbroken", aggregate_function="first")
    for kind in ("set", "active"):
        if kind not in outcome.columns:
            outcome = outcome.with_columns(pl.lit(None, pl.Boolean).alias(kind))
    counts = features.group_by("prompt_id").agg(
        pl.len().cast(pl.Int32).alias("n_set"), (~pl.col("inactive")).sum().cast(pl.Int32).alias("n_active"),
        pl.col("inactive").sum().cast(pl.Int32).alias("n_inactive"))
    return counts.join(outcome, on="prompt_id").with_columns(
        (pl.col("set") & (pl.col("n_inactive") > 0) & ~pl.col("active").fill_null(True)).fill_null(False)
        .alias("kept")).select("prompt_id", "n_set", "n_active", "n_inactive", "kept").sort("prompt_id")


# ---- item 3: which dormant features switch on, where --------------------------------------------

def switched_on(store: Store, ablations: pl.DataFrame, features: pl.DataFrame) -> pl.DataFrame:
    """A row per (dormant feature, position) that fires once the active part of its prompt's set is ablated."""
    active_items = ablations.filter((pl.col("kind") == "active") & (pl.col("n_features") > 0))
    if active_items.is_empty():
        return _empty_switch_on()
    run_id = active_items["run_id"][0]
    dormant = features.filter(pl.col("inactive")).drop("item").join(
        active_items.select("prompt_id", "item"), on="prompt_id")
    events = set_acts(store, run_id, dormant)
    flags = layer_flags(features.filter(~pl.col("inactive")), dormant)
    return (events.join(flags, on=["prompt_id", "layer"]).with_columns(pl.lit(run_id).alias("run_id"))
            .select(_empty_switch_on().columns))


def layer_flags(ablated: pl.DataFrame, targets: pl.DataFrame) -> pl.DataFrame:
    """Per target (prompt_id, layer): upstream (an ablated feature at a lower layer), same_layer (at this one)."""
    lowest = ablated.group_by("prompt_id").agg(pl.col("layer").min().alias("lowest"))
    same = ablated.select("prompt_id", "layer").unique().with_columns(pl.lit(True).alias("same_layer"))
    return (targets.select("prompt_id", "layer").unique().join(lowest, on="prompt_id", how="left")
            .join(same, on=["prompt_id", "layer"], how="left")
            .select("prompt_id", "layer", (pl.col("lowest") < pl.col("layer")).fill_null(False).alias("upstream"),
                    pl.col("same_layer").fill_null(False)))


def _empty_switch_on() -> pl.DataFrame:
    return pl.DataFrame(schema={"prompt_id": pl.String, "layer": pl.Int16, "feature": pl.Int32, "run_id": pl.String,
                                "item": pl.Int32, "row": pl.Int32, "pos": pl.Int32, "token_id": pl.Int32,
                                "token_text": pl.String, "role": pl.String, "value": pl.Float32,
                                "upstream": pl.Boolean, "same_layer": pl.Boolean})


# ---- item 4: clamping -------------------------------------------------------------------------

def _clamp(runner: _Runner, saes: Sequence[SaeRef], switch_on: pl.DataFrame, per_prompt: pl.DataFrame) -> pl.DataFrame:
    """The clamping rows (analyze/clamping.py) for the features that switched on in kept prompts, judged.

    When no kept prompt has one (the hydra effect did not show), the features that switched on in any
    prompt are clamped instead, so the paper's table still exists; `clamp_source` says which
    ("kept prompts" or "all prompts").
    """
    settings = runner.settings
    kept = switch_on.join(per_prompt.filter(pl.col("kept")).select("prompt_id"), on="prompt_id")
    source = "kept prompts" if kept.height else "all prompts"
    features = sorted({(int(l), int(f)) for l, f in (kept if kept.height else switch_on)
                       .select("layer", "feature").iter_rows()})
    if not features or not settings.clamp_values:
        return pl.DataFrame()
    runner.log(f"item 4: clamping {len(features)} features switched on in {source} at positions "
               f"{settings.clamp_positions} on {len(settings.benign_prompts)} benign prompts")
    es = ExtractSettings(positions="all", generate=settings.clamp_generate, batch_size=settings.batch_size)
    rows = clamping.clamp_generations(runner.store, runner.model, saes, features, settings.benign_prompts,
                                      settings.clamp_values, settings.clamp_positions, es)
    verdicts = judge_run(runner.store, rows["run_id"][0], runner.judge).select("item", "verdict")
    return rows.join(verdicts, on="item", how="left").with_columns(pl.lit(source).alias("clamp_source"))


# ---- item 5: stage-3 features alone -------------------------------------------------------------

def stage3_links(runner: _Runner, prompts: Sequence[Prompt], s3: pl.DataFrame, features: pl.DataFrame,
                 saes: Sequence[SaeRef]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Judged `stage3` rows, and each active stage-2 feature's activation under the stage-3-only ablation."""
    by_id = {p.prompt_id: p for p in prompts}
    groups = [(pid, list(zip(g["layer"].to_list(), g["feature"].to_list())))
              for (pid,), g in s3.group_by("prompt_id", maintain_order=True)]
    rows = runner.judged("stage3", [by_id[p] for p, _ in groups], [ablation(fs, runner.first) for _, fs in groups], saes,
                         [len(fs) for _, fs in groups])
    active = features.filter(~pl.col("inactive")).drop("item").join(rows.select("prompt_id", "item"), on="prompt_id")
    acts = set_acts(runner.store, rows["run_id"][0], active).group_by(_KEYS).agg(
        pl.col("value").sum().alias("ablated_sum"),
        pl.col("value").filter(pl.col("role") == "first").sum().alias("ablated_first"))
    links = (active.select(*_KEYS, pl.col("sum_value").alias("clean_sum"), pl.col("first_value").alias("clean_first"))
             .join(acts, on=_KEYS, how="left").with_columns(pl.col("ablated_sum", "ablated_first").fill_null(0.0))
             .with_columns((pl.col("ablated_sum") == 0).alias("deactivated"),
                           (1 - pl.col("ablated_sum") / pl.col("clean_sum")).alias("activation_drop"))
             .join(layer_flags(s3, active), on=["prompt_id", "layer"]).sort(_KEYS))
    return rows, links


# ---- summary and storage ------------------------------------------------------------------------

def _metrics(features: pl.DataFrame, ablations: pl.DataFrame, per_prompt: pl.DataFrame, switch_on: pl.DataFrame,
             clamped: pl.DataFrame, links: pl.DataFrame, stage3_id: str | None,
             settings: RedundancySettings) -> dict[str, Any]:
    jb = {k: ablations.filter(pl.col("kind") == k) for k in KINDS}
    with_dormant = per_prompt.filter(pl.col("n_inactive") > 0)
    return {
        "n_prompts": per_prompt.height, "n_features": features.height, "n_inactive": int(features["inactive"].sum()),
        "n_prompts_with_inactive": with_dormant.height,
        "n_clean_refused": int((jb["clean"]["verdict"] == "refusal").sum()),
        "n_set_jailbroken": int(jb["set"]["jailbroken"].sum()),
        "n_inactive_only_jailbroken": int(jb["inactive"]["jailbroken"].sum()),
        "n_active_only_jailbroken": int(jb["active"]["jailbroken"].sum()),
        "n_kept": int(per_prompt["kept"].sum()),
        "switch_on": _switch_metrics(features, per_prompt, switch_on),
        "switch_on_all": _switch_metrics(features, per_prompt.with_columns(pl.lit(True).alias("kept")), switch_on),
        "clamping": _clamp_metrics(clamped, settings),
        "links": _link_metrics(jb["set"], jb["stage3"], links, stage3_id),
    }


def _switch_metrics(features: pl.DataFrame, per_prompt: pl.DataFrame, switch_on: pl.DataFrame) -> dict[str, Any]:
    """Over kept prompts: dormant features that fire, and the (feature, position) events' shares by role."""
    kept = per_prompt.filter(pl.col("kept")).select("prompt_id")
    events = switch_on.join(kept, on="prompt_id")
    elsewhere = events.filter(pl.col("pos") != 0)
    return {
        "n_dormant": features.filter(pl.col("inactive")).join(kept, on="prompt_id").height,
        "n_switched": events.select(_KEYS).n_unique() if events.height else 0,
        "n_switched_beyond_pos0": elsewhere.select(_KEYS).n_unique() if elsewhere.height else 0,
        "n_switched_upstream": events.filter("upstream").select(_KEYS).n_unique() if events.height else 0,
        "n_events": events.height, "n_events_beyond_pos0": elsewhere.height,
        "role_shares": _role_shares(events), "role_shares_without_pos0": _role_shares(elsewhere),
        "role_shares_ci": _role_share_cis(events), "role_shares_without_pos0_ci": _role_share_cis(elsewhere),
    }


def _clamp_metrics(clamped: pl.DataFrame, settings: RedundancySettings) -> dict[str, Any]:
    if clamped.is_empty():
        return {"status": "not run: no dormant feature switched on"}
    refused = clamped.group_by("value").agg((pl.col("verdict") == "refusal").sum().alias("n"))
    by_value = {("none" if v is None else f"{v:g}"): int(n) for v, n in refused.sort("value", nulls_last=False).iter_rows()}
    return {"status": "run", "n_features": int(clamped["n_features"][0]), "source": clamped["clamp_source"][0],
            "positions": list(settings.clamp_positions),
            "values": list(settings.clamp_values), "n_prompts": len(settings.benign_prompts), "n_refused": by_value}


def _role_shares(events: pl.DataFrame) -> dict[str, float | None]:
    counts = dict(events.group_by("role").len().iter_rows()) if events.height else {}
    return {role: (counts.get(role, 0) / events.height if events.height else None) for role in ROLES}


def _role_share_cis(events: pl.DataFrame) -> dict[str, list[float] | None]:
    """Per role, the Wilson 95% interval [low, high] of its share of the events (None without events)."""
    counts = dict(events.group_by("role").len().iter_rows()) if events.height else {}
    return {role: (list(wilson(counts.get(role, 0), events.height)) if events.height else None) for role in ROLES}


def _link_metrics(set_rows: pl.DataFrame, stage3_rows: pl.DataFrame, links: pl.DataFrame,
                  stage3_id: str | None) -> dict[str, Any]:
    if stage3_id is None or stage3_rows.is_empty():
        return {"status": "not run: no stage-3 sets" + ("" if stage3_id is None else f" for these prompts in {stage3_id}")}
    both = stage3_rows.join(set_rows.select("prompt_id", pl.col("jailbroken").alias("set_jb")), on="prompt_id")
    per_prompt = links.group_by("prompt_id").agg(pl.col("deactivated").mean().alias("share"))
    rest = links.filter(~pl.col("deactivated"))
    return {
        "status": "run", "n_prompts": stage3_rows.height, "n_set_jailbroken": int(both["set_jb"].sum()),
        "n_reproduced": int((both["set_jb"] & both["jailbroken"]).sum()),
        "n_stage3_jailbroken": int(stage3_rows["jailbroken"].sum()),
        "n_active_stage2": links.height, "n_deactivated": int(links["deactivated"].sum()),
        "mean_deactivated_share": per_prompt["share"].mean(), "max_deactivated_share": per_prompt["share"].max(),
        "mean_drop_rest": rest["activation_drop"].mean() if rest.height else None,
        "n_same_layer": int(links["same_layer"].sum()) if links.height else 0,
    }


def _run_of(frame: pl.DataFrame, kind: str | None = None) -> str | None:
    if frame.is_empty():
        return None
    rows = frame if kind is None else frame.filter(pl.col("kind") == kind)
    return rows["run_id"][0] if rows.height else None


def _save(store: Store, aid: str, model: str, prune_id: str, stage3_id: str | None, judge_id: str,
          saes: Sequence[SaeRef], settings: RedundancySettings, runs: dict[str, str | None],
          metrics: dict[str, Any], tables: dict[str, pl.DataFrame]) -> None:
    """Replace this analysis's row and its rows in every redundancy_* table, in one transaction."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with store.transaction() as con:
        for table in ("redundancy_analyses", *TABLES):
            con.execute(f"DELETE FROM {table} WHERE analysis_id = ?", [aid])
        con.execute("INSERT INTO redundancy_analyses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            aid, model, prune_id, stage3_id, judge_id, json.dumps({str(s.layer): s.source for s in saes}),
            json.dumps(asdict(settings), sort_keys=True), runs["clean"], runs["set"], runs["stage3"],
            runs["clamp"], json.dumps(metrics, sort_keys=True), now, code_version()])
        for table, frame in tables.items():
            if frame.height:
                con.register("incoming", frame.with_columns(pl.lit(aid).alias("analysis_id")).to_arrow())
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
                con.unregister("incoming")


def summary_line(r: RedundancyResult) -> str:
    """One line: dormant features, the prompts that need them, and their switch-on."""
    m, sw = r.metrics, r.metrics["switch_on"]
    links = m["links"]
    tail = (f"; stage-3 sets alone reproduce {links['n_reproduced']} of {links['n_set_jailbroken']} jailbreaks"
            if links["status"] == "run" else "")
    a = m["switch_on_all"]
    everywhere = ("" if sw["n_events"] or not a["n_events"] else
                  f" (over all prompts: {a['n_switched']}, {a['n_switched_beyond_pos0']} beyond position 0)")
    return (f"{m['n_inactive']} of {m['n_features']} set features dormant ({m['n_prompts_with_inactive']} of "
            f"{m['n_prompts']} prompts); {m['n_kept']} prompts need them; {sw['n_switched']} switch on when the rest "
            f"is ablated ({sw['n_switched_beyond_pos0']} beyond position 0){everywhere}{tail}")


def detail_lines(result: RedundancyResult) -> list[str]:
    """Items 1-5 in a few lines, shares with and without position 0, then the clamping table."""
    return summary(result).split("\n") + _clamping_lines(result)


def _clamping_lines(result: RedundancyResult) -> list[str]:
    clamped, lines = result.tables["redundancy_clamping"], []
    for (text,), rows in clamped.group_by("text", maintain_order=True) if clamped.height else ():
        lines.append(f"clamped on {text!r}:")
        for value, verdict, completion in rows.select("value", "verdict", "completion").iter_rows():
            lines.append(f"  {'none' if value is None else format(value, 'g'):>5}  {verdict:<10}  "
                         f"{' '.join((completion or '').split())[:90]}")
    return lines


def summary(result: RedundancyResult) -> str:
    """Items 1-5 in a few lines, shares with and without position 0."""
    m, s = result.metrics, result.metrics["switch_on"]
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"                            # noqa: E731
    def roles(shares: dict[str, float | None], n: int | None = None) -> str:   # each share with its Wilson interval
        return ", ".join(f"{r} {pct(v) if n is None else share_text(v, n)}" for r, v in shares.items())
    lines = [
        f"redundancy {result.analysis_id}: stage-2 sets {result.prune_id}, judge {result.judge}",
        f"1. dormant: {m['n_inactive']} of {m['n_features']} set features are zero at every position of their "
        f"prompt; {m['n_prompts_with_inactive']} of {m['n_prompts']} prompts have some",
        f"2. jailbroken: whole set {m['n_set_jailbroken']}/{m['n_prompts']}; dormant features alone "
        f"{m['n_inactive_only_jailbroken']}/{m['n_prompts_with_inactive']}; set without them "
        f"{m['n_active_only_jailbroken']}/{m['n_prompts_with_inactive']} -> {m['n_kept']} prompts kept "
        "(their dormant features are needed)",
        f"3. switch-on (kept prompts): {s['n_switched']} of {s['n_dormant']} dormant features fire when the rest of "
        f"the set is ablated ({s['n_switched_upstream']} below an ablated layer), {s['n_events']} (feature, position) events",
        f"   by token role: {roles(s['role_shares'], s['n_events'])}",
        f"   without position 0: {s['n_switched_beyond_pos0']} features, {s['n_events_beyond_pos0']} events; "
        f"{roles(s['role_shares_without_pos0'], s['n_events_beyond_pos0'])}",
        "   (position 0 carries massive activations on the default model and project SAEs are trained without "
        "it: compare the two lines)",
    ]
    a = m["switch_on_all"]
    if s["n_events"] == 0 and a["n_events"]:               # what the clamping then falls back to
        lines.append(f"   all prompts: {a['n_switched']} of {a['n_dormant']} dormant features fire, "
                     f"{a['n_events']} events; by token role: {roles(a['role_shares'], a['n_events'])}; without position 0: "
                     f"{a['n_events_beyond_pos0']} events")
    c = m["clamping"]
    refused = ", ".join(f"{v} {n}/{c['n_prompts']}" for v, n in c.get("n_refused", {}).items())
    lines.append(f"4. clamping: {c['n_features']} features (switched on in {c['source']}) at positions "
                 f"{c['positions']} on {c['n_prompts']} benign "
                 f"prompts; judged refusals by value: {refused}" if c["status"] == "run"
                 else f"4. clamping: {c['status']}")
    k = m["links"]
    lines.append(f"5. stage-3 only: {k['status']}" if k["status"] != "run" else
                 f"5. stage-3 only: reproduces {k['n_reproduced']} of {k['n_set_jailbroken']} stage-2 jailbreaks "
                 f"({k['n_prompts']} prompts); switches off {k['n_deactivated']} of {k['n_active_stage2']} active "
                 f"stage-2 features ({pct(k['mean_deactivated_share'])} per prompt on average, up to "
                 f"{pct(k['max_deactivated_share'])}); the rest drop {pct(k['mean_drop_rest'])} on average")
    return "\n".join(lines)
