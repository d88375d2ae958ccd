"""The main job, `cli.py run`: every stage of the paper on one model, in order, resumable at every stage.

Stages (STAGES): saes (train the model's own SAEs, reusing finished layers, or take given or published
ones), direction, candidates (stage 1), prune (stage 2), fm (stage 3), redundancy, controls (O'Brien
et al., when analyze/controls.py exists), costs, taxonomy (CoCoNot prompts extracted with the SAEs,
then the mapping), report. Each stage calls the library function its `cli.py` command calls, with
the results of the stages before it passed in explicitly (never "the newest analysis"), so other
analyses in the same store do not leak in. The model is loaded once, by the caller.

Resuming: a finished stage is a `pipeline_stages` row keyed by (model, stage, settings_hash), the
hash of the stage's settings and the result ids of the stages it reads (READS); the row holds the
outputs later stages need (SAE sources, l*, counts). A stage whose key is recorded and whose result
is still in the store is not run again. A killed stage has no row and runs again, and cheaply: its
extraction runs are cached in the store (the same request is the same run id; a partial run resumes
at its first unwritten batch), SAE training reuses finished layers, FM fits are cached in `fm_models`.
A stage whose input is empty (stage 1 jailbroke nothing: nothing to prune) is skipped with the
reason, and so are the stages that need its result.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from analyze import candidates, costs, direction, prune, redundancy, report, stage3, taxonomy
from analyze.candidates import CandidateSettings
from analyze.common import Log, no_log, settings_from_dict
from analyze.costs import CostsSettings
from analyze.direction import DirectionSettings
from analyze.prune import PruneSettings
from analyze.redundancy import RedundancySettings
from analyze.report import ReportSettings
from analyze.stage3 import Stage3Settings
from analyze.taxonomy import TaxonomySettings
from extract import sae_train
from extract.datasets import load_prompts
from extract.models import LoadedModel
from extract.pipeline import resolve_saes
from extract.run import ExtractSettings, extract, make_items
from store import Store, UsageError
from store.store import code_version

STAGES = ("saes", "direction", "candidates", "prune", "fm", "redundancy", "controls", "costs", "taxonomy", "report")
PROFILES = ("quick", "default")
# the stages whose results each stage reads: a change there reruns it
READS: dict[str, tuple[str, ...]] = {
    "saes": (), "direction": (), "candidates": ("saes", "direction"), "prune": ("candidates",),
    "fm": ("saes", "direction", "prune"), "redundancy": ("saes", "prune", "fm"), "controls": ("saes", "prune"),
    "costs": ("saes", "direction", "prune", "fm"), "taxonomy": ("saes", "prune", "fm"), "report": STAGES[:-1],
}
QUICK_GENERATE = 32                       # completion tokens judged in the quick profile (default: 64)


@dataclass(frozen=True)
class PipelineSettings:
    profile: str = "default"              # a name recorded with every stage: quick, default, a settings file's
    sae: sae_train.TrainSettings | None = None   # SAE training; None: use `saes` as they are
    saes: tuple[str, ...] = ()            # LAYER=SOURCE (directories or sae-lens release:id) instead of training
    direction: DirectionSettings = field(default_factory=DirectionSettings)
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    fm: Stage3Settings = field(default_factory=Stage3Settings)
    redundancy: RedundancySettings = field(default_factory=RedundancySettings)
    controls: dict[str, Any] = field(default_factory=dict)   # overrides of analyze.controls' settings
    costs: CostsSettings = field(default_factory=CostsSettings)
    n_coconot: int = 0                    # CoCoNot prompts extracted with the SAEs for the taxonomy (0: all 1,001)
    taxonomy: TaxonomySettings = field(default_factory=TaxonomySettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    def __post_init__(self) -> None:
        if self.sae is None and not self.saes:
            raise UsageError("no SAEs: give SAE training settings (sae) or LAYER=SOURCE entries (saes)")
        if self.n_coconot < 0:
            raise UsageError(f"n_coconot must be >= 0, got {self.n_coconot}")
        if not isinstance(self.controls, dict):
            raise UsageError("controls must be a JSON object of settings")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PipelineSettings":
        if not isinstance(raw, dict):
            raise UsageError(f"pipeline settings must be a JSON object, got {type(raw).__name__}")
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown pipeline settings: {sorted(unknown)}")
        parsed = {k: _PARSERS[k](v) if k in _PARSERS and v is not None else v for k, v in raw.items()}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in parsed.items()})


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "sae": lambda raw: settings_from_dict(sae_train.TrainSettings, raw, "SAE training"),
    "direction": DirectionSettings.from_dict, "candidates": CandidateSettings.from_dict,
    "prune": PruneSettings.from_dict, "fm": Stage3Settings.from_dict, "redundancy": RedundancySettings.from_dict,
    "costs": CostsSettings.from_dict, "taxonomy": TaxonomySettings.from_dict, "report": ReportSettings.from_dict,
}


def quick_layers(n_layers: int) -> tuple[int, ...]:
    """The quick profile's SAE and l* candidate layers: 5/12 .. 5/8 of the depth (10..15 of 24)."""
    lo = max(min(2, n_layers - 1), round(5 * n_layers / 12))
    return tuple(range(lo, max(lo, round(5 * n_layers / 8)) + 1))


def profile(name: str, model: LoadedModel, out: str | Path | None = None) -> PipelineSettings:
    """The `quick` or `default` settings for this model (its depth picks the layers); `out`: report directory."""
    if name not in PROFILES:
        raise UsageError(f"profile must be one of {', '.join(PROFILES)}, got {name!r}")
    quick = name == "quick"
    layers = quick_layers(model.n_layers) if quick else sae_train.default_layers(model.n_layers)
    release = model.spec.sae_release if model.spec is not None else None
    sae = None if release else sae_train.settings_with_profile(quick, layers=layers)
    saes = tuple(f"{layer}={release}:{model.spec.sae_id(layer)}" for layer in layers) if release else ()
    reported = ReportSettings(out=str(out) if out else None)
    if not quick:                         # the paper's parameters: every stage's own defaults
        return PipelineSettings(name, sae, saes, report=reported)
    g = QUICK_GENERATE
    return PipelineSettings(
        name, sae, saes, report=reported, n_coconot=48,
        direction=DirectionSettings(n_train=32, n_val=16, layers=layers, generate=g, n_random=1),
        candidates=CandidateSettings(n_prompts=12, ks=(10, 25, 50, 75, 100), ks_per_round=5, generate=g),
        prune=PruneSettings(taus=(0.2, 0.5), seeds=(0,), max_prompts=3, generate=g),
        fm=Stage3Settings(limit=96, diagnostic_embeddings=(5,), ks=(100, 500, 1000), probe_ks=(100, 1000),
                          max_prompts=3, generate=g),
        redundancy=RedundancySettings(max_prompts=3, clamp_values=(2.0, 6.0, 10.0), generate=g),
        controls={"ks": [1, 2, 4, 8]},
        costs=CostsSettings(n_alpaca=16, n_text=8, n_xstest=24, max_sets=3, generate=g))


def load_settings(path: str | Path) -> PipelineSettings:
    """PipelineSettings from a JSON file (the form `asdict` writes); its profile name defaults to the file's stem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read pipeline settings {path}: {err}") from None
    if isinstance(raw, dict):
        raw.setdefault("profile", path.stem)
    return PipelineSettings.from_dict(raw)


# ---- running -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str                           # ran | resumed | skipped
    summary: str                          # what it did, or why it was skipped: one line
    seconds: float                        # wall time of the run (resumed: when it ran)
    result_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)   # what later stages read


@dataclass(frozen=True)
class PipelineResult:
    stages: tuple[StageOutcome, ...]
    report: Path | None                   # report.html (None when the report stage did not run)
    markdown: Path | None


@dataclass(frozen=True)
class _Plan:
    """One stage's settings (hashed into its key) and the work, or why it is skipped."""

    settings: Any = None
    execute: Callable[[], tuple[str | None, dict[str, Any], str]] | None = None   # -> result id, outputs, summary
    skip: str = ""


@dataclass(frozen=True)
class _Context:
    store: Store
    model: LoadedModel
    settings: PipelineSettings
    log: Log


def run(store: Store, model: LoadedModel, settings: PipelineSettings, log: Log = no_log,
        on_stage: Log = no_log, start: str | None = None, only: str | None = None) -> PipelineResult:
    """Run or resume every stage in order; `start`: rerun from that stage on; `only`: run that stage alone.

    `on_stage` gets one progress line per stage (progress_line); `log` the stages' own messages.
    """
    check_stage_options(start, only)
    ctx, done = _Context(store, model, settings, log), {}
    for i, name in enumerate(STAGES):
        forced = name == only or (start is not None and i >= STAGES.index(start))
        done[name] = _stage(ctx, name, _PLANNERS[name](ctx, done), done, forced, resume_only=only is not None)
        on_stage(progress_line(i, done[name]))
        if name == only:
            break
    written = done["report"].outputs if "report" in done else {}
    paths = [Path(written[k]) if k in written else None for k in ("html", "markdown")]
    return PipelineResult(tuple(done.values()), *paths)


def check_stage_options(start: str | None, only: str | None) -> None:
    """--from and --only name a stage, and not both are given."""
    for option, name in (("--from", start), ("--only", only)):
        if name is not None and name not in STAGES:
            raise UsageError(f"{option} must be one of {', '.join(STAGES)}, got {name!r}")
    if start and only:
        raise UsageError("give --from or --only, not both")


def progress_line(index: int, outcome: StageOutcome) -> str:
    """`[2/10] direction: <what it did> (83 s)`; resumed and skipped stages say so."""
    head = f"[{index + 1}/{len(STAGES)}] {outcome.stage}"
    if outcome.status == "skipped":
        return f"{head}: skipped ({outcome.summary})"
    if outcome.status == "resumed":
        return f"{head}: resumed, done before in {outcome.seconds:.0f} s: {outcome.summary}"
    return f"{head}: {outcome.summary} ({outcome.seconds:.0f} s)"


def stage_key(stage: str, model: str, settings: Any, reads: dict[str, str | None]) -> str:
    """16 hex of sha256 over the stage, model, its settings and the result ids of the stages it reads."""
    blob = json.dumps({"stage": stage, "model": model, "settings": _jsonable(settings), "reads": reads},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stage(ctx: _Context, name: str, plan: _Plan, done: dict[str, StageOutcome], forced: bool,
           resume_only: bool) -> StageOutcome:
    if plan.execute is None:
        return StageOutcome(name, "skipped", plan.skip, 0.0)
    key = stage_key(name, ctx.model.name, plan.settings, {s: done[s].result_id for s in READS[name]})
    found = None if forced else _recorded(ctx.store, name, ctx.model.name, key)
    if found is not None:
        return found
    if resume_only and not forced:
        raise UsageError(f"--only: stage {name} has not run with these settings; run `python cli.py run` "
                         f"without --only first")
    ctx.log(f"{name}: running")
    t0 = time.perf_counter()
    result_id, outputs, summary = plan.execute()
    outcome = StageOutcome(name, "ran", summary, time.perf_counter() - t0, result_id, outputs)
    _record(ctx, key, plan.settings, outcome)
    return outcome


def _jsonable(settings: Any) -> Any:
    return asdict(settings) if is_dataclass(settings) else settings


# ---- the record --------------------------------------------------------------------------------

_RESULT_SQL = {
    "direction": "SELECT 1 FROM analyses WHERE analysis_id = ?",
    "candidates": "SELECT 1 FROM analyses WHERE analysis_id = ?",
    "prune": "SELECT 1 FROM analyses WHERE analysis_id = ?",
    "fm": "SELECT 1 FROM analyses WHERE analysis_id = ? UNION ALL SELECT 1 FROM fm_models WHERE model_id = ?",
    "redundancy": "SELECT 1 FROM redundancy_analyses WHERE analysis_id = ?",
    "costs": "SELECT 1 FROM costs WHERE costs_id = ?",
    "taxonomy": "SELECT 1 FROM runs WHERE run_id = ? AND status = 'complete'",
}


def _recorded(store: Store, stage: str, model: str, key: str) -> StageOutcome | None:
    """The stage's recorded outcome for this key, if its result is still in the store."""
    df = store.sql("SELECT result_id, outputs, summary, seconds FROM pipeline_stages "
                   "WHERE model = ? AND stage = ? AND settings_hash = ?", [model, stage, key])
    if df.is_empty():
        return None
    result_id, outputs, summary, seconds = df.row(0)
    outputs = json.loads(outputs)
    if not _still_there(store, stage, result_id, outputs):
        return None
    return StageOutcome(stage, "resumed", summary, seconds, result_id, outputs)


def _still_there(store: Store, stage: str, result_id: str | None, outputs: dict[str, Any]) -> bool:
    if stage == "saes":
        return all(":" in src or Path(src).is_dir() for src in (s.partition("=")[2] for s in outputs["saes"]))
    if stage == "report":
        return Path(outputs["html"]).is_file() and Path(outputs["markdown"]).is_file()
    query = _RESULT_SQL.get(stage)
    if query is None or result_id is None:
        return True
    return not store.sql(query, [result_id] * query.count("?")).is_empty()


def _record(ctx: _Context, key: str, settings: Any, outcome: StageOutcome) -> None:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with ctx.store.transaction() as con:
        con.execute("DELETE FROM pipeline_stages WHERE model = ? AND stage = ? AND settings_hash = ?",
                    [ctx.model.name, outcome.stage, key])
        con.execute("INSERT INTO pipeline_stages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            ctx.model.name, outcome.stage, key, ctx.settings.profile, outcome.result_id,
            json.dumps(outcome.outputs, sort_keys=True), outcome.summary,
            json.dumps(_jsonable(settings), sort_keys=True, default=str), outcome.seconds, now, code_version()])


# ---- the stages: each planner is cheap; the work is in the closure it returns --------------------

def _specs(done: dict[str, StageOutcome]) -> tuple[str, ...]:
    return tuple(done["saes"].outputs["saes"])


def _sae_layers(done: dict[str, StageOutcome]) -> list[int]:
    return sorted(int(spec.partition("=")[0]) for spec in _specs(done))


def _n_sets(done: dict[str, StageOutcome]) -> int:
    return int(done["prune"].outputs.get("n_sets", 0))


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers else "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plan_saes(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if ctx.settings.sae is None:
        return _Plan({"saes": list(ctx.settings.saes)}, lambda: _given_saes(ctx))
    return _Plan(ctx.settings.sae, lambda: _train_saes(ctx))


def _given_saes(ctx: _Context) -> tuple[str, dict[str, Any], str]:
    refs = resolve_saes(ctx.store, ctx.model, ctx.settings.saes, "")          # loads each: a bad one fails here
    specs = [f"{r.layer}={r.source}" for r in refs]
    return (hashlib.sha256("\n".join(specs).encode()).hexdigest()[:16], {"saes": specs},
            f"{len(refs)} given SAEs at layers {_span([r.layer for r in refs])}, none trained")


def _train_saes(ctx: _Context) -> tuple[str, dict[str, Any], str]:
    s = ctx.settings.sae
    results = sae_train.train_saes(ctx.store, ctx.model, s, log=ctx.log)
    specs = [f"{r.layer}={r.source if Path(r.source).is_absolute() else ctx.store.path / r.source}" for r in results]
    n_reused = sum(r.reused for r in results)
    fvu = [r.metrics["fvu"] for r in results]
    return (f"{ctx.model.name}/{s.settings_hash()}", {"saes": specs},
            f"{len(results) - n_reused} SAEs trained, {n_reused} reused ({s.architecture}, width {s.width}, k {s.k}) "
            f"at layers {_span([r.layer for r in results])}; held-out FVU {min(fvu):.3f}..{max(fvu):.3f}")


def _plan_direction(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = ctx.settings.direction
    return _Plan(s, lambda: _run_direction(ctx, s))


def _run_direction(ctx: _Context, s: DirectionSettings) -> tuple[str, dict[str, Any], str]:
    r = direction.run(ctx.store, ctx.model, s, log=ctx.log)
    c = r.controls
    randoms = " ".join(_pct(x) for x in c["random_ablation_asr"]) or "-"
    return r.direction_id, {"layer": r.layer}, (
        f"l* = {r.layer}; ablating r_l* jailbreaks {_pct(c['asr'])} of {c['n_refused']} refused val prompts "
        f"(random directions {randoms}; judge {r.judge})")


def _plan_candidates(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = replace(ctx.settings.candidates, direction_id=done["direction"].result_id, saes=_specs(done))
    return _Plan(s, lambda: _run_candidates(ctx, s))


def _run_candidates(ctx: _Context, s: CandidateSettings) -> tuple[str, dict[str, Any], str]:
    r = candidates.run(ctx.store, ctx.model, s, log=ctx.log)
    m = r.metrics
    outputs = {key: m[key] for key in ("n_prompts", "n_refused", "n_jailbroken")}
    return r.candidates_id, outputs, (
        f"{m['n_jailbroken']} of {m['n_refused']} refused prompts ({m['n_prompts']} {s.dataset} {s.split}) "
        f"jailbroken by the top-K latents per layer, K <= {s.ks[-1]}, SAE layers {_span(m['sae_layers'])}")


def _plan_prune(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if not done["candidates"].outputs.get("n_jailbroken"):
        return _Plan(skip="stage 1 jailbroke no prompt: nothing to prune")
    s = replace(ctx.settings.prune, candidates_id=done["candidates"].result_id)
    return _Plan(s, lambda: _run_prune(ctx, s))


def _run_prune(ctx: _Context, s: PruneSettings) -> tuple[str, dict[str, Any], str]:
    r = prune.run(ctx.store, ctx.model, s, log=ctx.log)
    m = r.summary
    n_sets = ctx.store.sql("SELECT count(DISTINCT prompt_id) AS n FROM feature_sets WHERE set_id = ? AND stage = 2 "
                           "AND selected", [r.prune_id])["n"][0]
    per_prompt = "-" if m["features_per_prompt"] is None else f"{m['features_per_prompt']:.1f}"
    return r.prune_id, {"n_sets": int(n_sets), "n_jailbroken": m["n_jailbroken"]}, (
        f"{m['n_jailbroken']}/{m['n_prompts']} prompts jailbroken by their minimal sets ({per_prompt} features "
        f"per prompt, {m['n_unique_features']} unique); random active features of equal size "
        f"{m['n_random_jailbroken']}/{m['n_prompts']}; {m['n_steps']} lockstep steps")


def _plan_fm(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    base = ctx.settings.fm
    l_star = done["direction"].outputs["layer"]
    layers = base.layers or tuple(layer for layer in _sae_layers(done) if base.min_layer <= layer <= l_star)
    if not layers:
        return _Plan(skip=f"no SAE layer in {base.min_layer}..l* = {l_star} for the FM")
    has_sets = _n_sets(done) > 0
    s = replace(base, prune_id=done["prune"].result_id if has_sets else None, layers=layers, saes=_specs(done),
                sweep=base.sweep and has_sets)
    return _Plan(s, lambda: _run_fm(ctx, s))


def _run_fm(ctx: _Context, s: Stage3Settings) -> tuple[str, dict[str, Any], str]:
    note = "" if s.sweep else "; no sweep (no stage-2 sets)"
    try:
        r = stage3.run(ctx.store, ctx.model, s, log=ctx.log)
    except UsageError as err:             # e.g. no stage-2 latent among the FM's columns: fit and compare only
        if not s.sweep:
            raise
        note = f"; sweep not run: {err}"
        r = stage3.run(ctx.store, ctx.model, replace(s, sweep=False), log=ctx.log)
    summary = (f"FM test accuracy {r.fm_accuracy['test']:.3f} vs probe {r.probe_accuracy['test']:.3f} on "
               f"{r.n_features} latents at layers {_span(list(r.layers))}")
    if r.asr is not None:
        best = r.asr.group_by("ranker").agg(pl.col("asr").max())
        asr = dict(best.iter_rows())
        summary += (f"; ASR on {r.n_swept} stage-2 prompts: set alone {_pct(asr.get('stage2'))}, + FM top-K up to "
                    f"{_pct(asr.get('fm'))}, + probe top-K up to {_pct(asr.get('probe'))}; "
                    f"{r.n_stage3_sets} stage-3 sets")
    outputs = {"fm_model_id": r.fm_model_id, "sweep_id": r.sweep_id, "n_stage3_sets": r.n_stage3_sets}
    return r.sweep_id or r.fm_model_id, outputs, summary + note


def _plan_redundancy(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if not _n_sets(done):
        return _Plan(skip="no stage-2 sets")
    fm = done["fm"].outputs
    s = replace(ctx.settings.redundancy, prune_id=done["prune"].result_id, saes=_specs(done),
                stage3_id=fm["sweep_id"] if fm.get("n_stage3_sets") else "none")
    return _Plan(s, lambda: _run_redundancy(ctx, s))


def _run_redundancy(ctx: _Context, s: RedundancySettings) -> tuple[str, dict[str, Any], str]:
    r = redundancy.run(ctx.store, ctx.model, s, log=ctx.log)
    m, sw = r.metrics, r.metrics["switch_on"]
    links = m["links"]
    tail = (f"; stage-3 sets alone reproduce {links['n_reproduced']} of {links['n_set_jailbroken']} jailbreaks"
            if links["status"] == "run" else "")
    return r.analysis_id, {"n_kept": m["n_kept"]}, (
        f"{m['n_inactive']} of {m['n_features']} set features dormant ({m['n_prompts_with_inactive']} of "
        f"{m['n_prompts']} prompts); {m['n_kept']} prompts need them; {sw['n_switched']} switch on when the rest "
        f"is ablated ({sw['n_switched_beyond_pos0']} beyond position 0){_all_prompts(m)}{tail}")


def _all_prompts(m: dict[str, Any]) -> str:
    """With no switch-on in a kept prompt, the switch-on over every prompt (what the clamping then uses)."""
    a = m["switch_on_all"]
    if m["switch_on"]["n_events"] or not a["n_events"]:
        return ""
    return f" (over all prompts: {a['n_switched']}, {a['n_switched_beyond_pos0']} beyond position 0)"


def _plan_controls(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if importlib.util.find_spec("analyze.controls") is None:
        return _Plan(skip="not available")
    if not _n_sets(done):
        return _Plan(skip="no stage-2 sets")
    module = importlib.import_module("analyze.controls")
    s = module.ControlsSettings.from_dict({**ctx.settings.controls, "prune_id": done["prune"].result_id})
    return _Plan(s, lambda: _run_controls(ctx, module, s))


def _run_controls(ctx: _Context, module: Any, s: Any) -> tuple[str, dict[str, Any], str]:
    r = module.run(ctx.store, ctx.model, s, log=ctx.log)
    m = r.summary
    per_k = ", ".join(f"k={row['k']} {_pct(row['asr'])}" for row in m.get("per_k", ()))
    random = m.get("random") or {}
    return r.controls_id, {}, (f"O'Brien et al. ASR on {m.get('n_refused')} refused stage-2 prompts: {per_k or '-'}; "
                               f"random active features {_pct(random.get('asr'))}")


def _plan_costs(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = ctx.settings.costs
    set_id = {1: done["candidates"].result_id, 2: done["prune"].result_id,
              3: done["fm"].outputs.get("sweep_id")}[s.stage]
    return _Plan(s, lambda: _run_costs(ctx, s, done["direction"].result_id, set_id, _specs(done)))


def _run_costs(ctx: _Context, s: CostsSettings, direction_id: str, set_id: str | None,
               specs: tuple[str, ...]) -> tuple[str, dict[str, Any], str]:
    vector = direction.load_direction(ctx.store, direction_id)[1]
    sets = _feature_sets(ctx.store, set_id, s.stage) if set_id else {}
    saes = resolve_saes(ctx.store, ctx.model, specs, "") if "feature_ablation" in s.conditions and sets else []
    r = costs.run(ctx.store, ctx.model, saes, s, direction=vector, feature_sets=sets, log=ctx.log)
    parts = [f"{row['condition']} {_num(row['ce_alpaca'])}/{_num(row['ce_text'])}/{_pct(row['over_refusal'])}"
             for row in r.table.iter_rows(named=True)]
    skipped = "".join(f"; {c} skipped" for c in r.skipped)
    return r.costs_id, {}, f"CE Alpaca/WikiText-2 (nats) and over-refusal: {', '.join(parts)}{skipped}"


def _feature_sets(store: Store, set_id: str, stage: int) -> dict[str, tuple[tuple[int, int], ...]]:
    df = store.sql("SELECT DISTINCT prompt_id, layer, feature FROM feature_sets WHERE set_id = ? AND stage = ? "
                   "AND selected ORDER BY ALL", [set_id, stage])
    sets: dict[str, list[tuple[int, int]]] = {}
    for prompt_id, layer, feature in df.iter_rows():
        sets.setdefault(prompt_id, []).append((int(layer), int(feature)))
    return {p: tuple(f) for p, f in sets.items()}


def _plan_taxonomy(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = {"n_coconot": ctx.settings.n_coconot, "taxonomy": asdict(ctx.settings.taxonomy)}
    return _Plan(s, lambda: _run_taxonomy(ctx, _specs(done)))


def _run_taxonomy(ctx: _Context, specs: tuple[str, ...]) -> tuple[str, dict[str, Any], str]:
    prompts = load_prompts("coconot", limit=ctx.settings.n_coconot or None)
    refs = resolve_saes(ctx.store, ctx.model, specs, "")
    ctx.log(f"taxonomy: {len(prompts)} CoCoNot prompts with SAEs at layers {_span([r.layer for r in refs])}")
    run_id = extract(ctx.store, ctx.model, make_items(ctx.model, prompts), refs,
                     ExtractSettings(layers=(), positions="all")).run_id
    s = ctx.settings.taxonomy
    has_sets = ctx.store.sql("SELECT count(*) AS n FROM feature_sets WHERE selected")["n"][0] > 0
    if s.features == "sets" and not has_sets:
        return run_id, {}, f"{len(prompts)} CoCoNot prompts extracted; no feature sets to map"
    r = taxonomy.run(ctx.store, s)
    multi = int(r.multi_category.filter(pl.col("n_categories") > 1)["n_features"].sum())
    return run_id, {"n_features": r.mapping.height}, (
        f"{r.mapping.height} {'set ' if s.features == 'sets' else ''}features fire on {len(prompts)} CoCoNot prompts, "
        f"in {r.per_category.height} categories ({multi} in more than one)")


def _plan_report(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = ctx.settings.report
    return _Plan(s, lambda: _run_report(ctx, s))


def _run_report(ctx: _Context, s: ReportSettings) -> tuple[str, dict[str, Any], str]:
    r = report.run(ctx.store, s)
    n_ok = sum(status == "ok" for _, status in r.sections)
    return str(r.html), {"html": str(r.html), "markdown": str(r.markdown)}, \
        f"{n_ok} of {len(r.sections)} sections have results: {r.html}"


_PLANNERS: dict[str, Callable[[_Context, dict[str, StageOutcome]], _Plan]] = {
    "saes": _plan_saes, "direction": _plan_direction, "candidates": _plan_candidates, "prune": _plan_prune,
    "fm": _plan_fm, "redundancy": _plan_redundancy, "controls": _plan_controls, "costs": _plan_costs,
    "taxonomy": _plan_taxonomy, "report": _plan_report,
}
