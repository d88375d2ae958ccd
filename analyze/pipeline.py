"""The main job, `cli.py run`: every stage of the paper on one model, in order, resumable at every stage.

Stages (STAGES): saes (train the model's own SAEs, reusing finished layers, or take given or published
ones), direction, candidates (stage 1), prune (stage 2), stage3 (FM vs probe), redundancy, controls
(O'Brien et al.), costs, taxonomy (CoCoNot prompts extracted with the SAEs,
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
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

from analyze import candidates, catalog, controls, costs, direction, prune, redundancy, report, stage3, taxonomy
from analyze.candidates import CandidateSettings
from analyze.common import Log, model_key, no_log
from analyze.controls import ControlsSettings
from analyze.costs import CostsSettings
from analyze.direction import DirectionSettings
from analyze.prune import PruneSettings
from analyze.redundancy import RedundancySettings
from analyze.report import ReportSettings
from analyze.stage3 import Stage3Settings
from analyze.taxonomy import TaxonomySettings
from extract import sae_train
from analyze.text import span
from extract.layers import parse_layers
from extract.models import LoadedModel
from extract.saes import resolve_saes
from extract.run import ExtractSettings, extract, make_items
from extract.workers import WorkerSettings
from store import Store, UsageError
from store.settings import Settings

STAGES = ("saes", "direction", "candidates", "prune", "stage3", "redundancy", "controls", "costs", "taxonomy",
          "report")
PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
PROFILES = ("quick", "default", "medium")           # profiles/<name>.json
# the stages whose results each stage reads: a change there reruns it
READS: dict[str, tuple[str, ...]] = {
    "saes": (), "direction": (), "candidates": ("saes", "direction"), "prune": ("candidates",),
    "stage3": ("saes", "direction", "prune"), "redundancy": ("saes", "prune", "stage3"),
    "controls": ("saes", "prune"), "costs": ("saes", "direction", "prune", "stage3"),
    "taxonomy": ("saes", "prune", "stage3"), "report": STAGES[:-1],
}


@dataclass(frozen=True)
class PipelineSettings(Settings):
    profile: str = "default"              # a name recorded with every stage: quick, default, a settings file's
    sae: sae_train.TrainSettings | None = None   # SAE training; None: use `saes` as they are
    saes: tuple[str, ...] = ()            # LAYER=SOURCE (directories or sae-lens release:id) instead of training
    direction: DirectionSettings = field(default_factory=DirectionSettings)
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    stage3: Stage3Settings = field(default_factory=Stage3Settings)
    redundancy: RedundancySettings = field(default_factory=RedundancySettings)
    controls: ControlsSettings = field(default_factory=ControlsSettings)
    costs: CostsSettings = field(default_factory=CostsSettings)
    n_coconot: int | None = None          # CoCoNot prompts of the taxonomy's subset extracted with the SAEs (None: all;
                                          # the unsafe subset of the shipped file holds 395)
    taxonomy: TaxonomySettings = field(default_factory=TaxonomySettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)   # where forward passes run; in no stage's key

    def __post_init__(self) -> None:
        if self.sae is None and not self.saes:
            raise UsageError("no SAEs: give SAE training settings (sae) or LAYER=SOURCE entries (saes)")
        if self.n_coconot is not None and self.n_coconot < 1:
            raise UsageError(f"n_coconot must be >= 1 (or null: all), got {self.n_coconot}")


def profile_path(name_or_path: str | Path) -> Path:
    """profiles/<name>.json for a profile name, else the path as given (a custom profile)."""
    return PROFILE_DIR / f"{name_or_path}.json" if str(name_or_path) in PROFILES else Path(name_or_path)


def read_profile(name_or_path: str | Path, n_layers: int) -> dict[str, Any]:
    """A profile's JSON with every `layers` entry written as text ("5/12-5/8") resolved for this depth."""
    path = profile_path(name_or_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read settings {path}: {err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"settings {path} must be a JSON object, got {type(raw).__name__}")
    raw.setdefault("profile", path.stem)
    return _resolve_layers(raw, n_layers)


def check_profile(name_or_path: str | Path) -> PipelineSettings:
    """Read and type-check a profile before any model loads (layers resolve for the model's depth later: these
    settings resolve them for a depth of 24, so read only what does not depend on it, such as `workers`)."""
    return PipelineSettings.from_dict(read_profile(name_or_path, n_layers=24))


def _resolve_layers(raw: Any, n_layers: int) -> Any:
    if isinstance(raw, dict):
        return {k: list(parse_layers(v, n_layers, clamp=True)) if k == "layers" and isinstance(v, str)
                else _resolve_layers(v, n_layers) for k, v in raw.items()}
    return raw


def load_settings(name_or_path: str | Path, model: LoadedModel, out: str | Path | None = None) -> PipelineSettings:
    """PipelineSettings from a profile for this model; published SAEs replace training where the model has them."""
    raw = read_profile(name_or_path, model.n_layers)
    release = model.spec.sae_release if model.spec is not None else None
    if release and raw.get("sae") is not None and not raw.get("saes"):
        layers = raw.pop("sae").get("layers") or []
        raw["saes"] = [f"{layer}={release}:{model.spec.sae_id(layer)}" for layer in layers]
    if out is not None:
        raw["report"] = {**raw.get("report", {}), "out": str(out)}
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
    key = stage_key(name, model_key(ctx.model), plan.settings, {s: done[s].result_id for s in READS[name]})
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
    if isinstance(settings, Settings):
        return settings.hashed()
    return asdict(settings) if is_dataclass(settings) else settings


# ---- the record --------------------------------------------------------------------------------

_RESULT_SQL = {
    "direction": "SELECT 1 FROM analyses WHERE analysis_id = ?",
    "candidates": "SELECT 1 FROM analyses WHERE analysis_id = ?",
    "prune": "SELECT 1 FROM analyses WHERE analysis_id = ?",
    "stage3": "SELECT 1 FROM analyses WHERE analysis_id = ? UNION ALL SELECT 1 FROM fm_models WHERE model_id = ?",
    "redundancy": "SELECT 1 FROM redundancy_analyses WHERE analysis_id = ?",
    "costs": "SELECT 1 FROM costs WHERE costs_id = ?",
    "taxonomy": "SELECT 1 FROM runs WHERE run_id = ? AND status = 'complete'",
}


def _recorded(store: Store, stage: str, model: str, key: str) -> StageOutcome | None:
    """The stage's recorded outcome for this key, if its result is still in the store."""
    row = catalog.recorded_stage(store, model, stage, key)
    if row is None or not _still_there(store, stage, row["result_id"], row["outputs"]):
        return None
    return StageOutcome(stage, "resumed", row["summary"], row["seconds"], row["result_id"], row["outputs"])


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
    catalog.record_stage(ctx.store, ctx.model.name, outcome.stage, key, ctx.settings.profile, outcome.result_id,
                         outcome.outputs, outcome.summary, _jsonable(settings), outcome.seconds)


# ---- the stages: each planner is cheap; the work is in the closure it returns --------------------

def _specs(done: dict[str, StageOutcome]) -> tuple[str, ...]:
    return tuple(done["saes"].outputs["saes"])


def _sae_layers(done: dict[str, StageOutcome]) -> list[int]:
    return sorted(int(spec.partition("=")[0]) for spec in _specs(done))


def _n_sets(done: dict[str, StageOutcome]) -> int:
    return int(done["prune"].outputs.get("n_sets", 0))


def _plan_saes(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if ctx.settings.sae is None:
        return _Plan({"saes": list(ctx.settings.saes)}, lambda: _given_saes(ctx))
    return _Plan(ctx.settings.sae, lambda: _train_saes(ctx))


def _given_saes(ctx: _Context) -> tuple[str, dict[str, Any], str]:
    refs = resolve_saes(ctx.store, ctx.model, ctx.settings.saes, "")          # loads each: a bad one fails here
    specs = [f"{r.layer}={r.source}" for r in refs]
    return (hashlib.sha256("\n".join(specs).encode()).hexdigest()[:16], {"saes": specs},
            f"{len(refs)} given SAEs at layers {span([r.layer for r in refs])}, none trained")


def _train_saes(ctx: _Context) -> tuple[str, dict[str, Any], str]:
    s = ctx.settings.sae
    results = sae_train.train_saes(ctx.store, ctx.model, s, log=ctx.log)
    specs = [f"{r.layer}={r.source if Path(r.source).is_absolute() else ctx.store.path / r.source}" for r in results]
    return f"{ctx.model.name}/{s.settings_hash()}", {"saes": specs}, sae_train.summary_line(results)


def _plan_direction(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = ctx.settings.direction
    return _Plan(s, lambda: _finish(direction.run(ctx.store, ctx.model, s, log=ctx.log), direction,
                                    lambda r: (r.direction_id, {"layer": r.layer})))


def _finish(result: Any, module: Any, outputs: Callable[[Any], tuple[str | None, dict[str, Any]]]
            ) -> tuple[str | None, dict[str, Any], str]:
    """(result id, outputs, the stage module's summary line) of a stage's result."""
    return (*outputs(result), module.summary_line(result))


def _plan_candidates(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = replace(ctx.settings.candidates, direction_id=done["direction"].result_id, saes=_specs(done))
    keep = ("n_prompts", "n_refused", "n_jailbroken")
    return _Plan(s, lambda: _finish(candidates.run(ctx.store, ctx.model, s, log=ctx.log), candidates,
                                    lambda r: (r.candidates_id, {k: r.metrics[k] for k in keep})))


def _plan_prune(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if not done["candidates"].outputs.get("n_jailbroken"):
        return _Plan(skip="stage 1 jailbroke no prompt: nothing to prune")
    s = replace(ctx.settings.prune, candidates_id=done["candidates"].result_id)

    def outputs(r: Any) -> tuple[str, dict[str, Any]]:
        n_sets = len(catalog.feature_sets(ctx.store, r.prune_id, stage=2))
        return r.prune_id, {"n_sets": n_sets, "n_jailbroken": r.summary["n_jailbroken"]}
    return _Plan(s, lambda: _finish(prune.run(ctx.store, ctx.model, s, log=ctx.log), prune, outputs))


def _plan_stage3(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    base = ctx.settings.stage3
    l_star = done["direction"].outputs["layer"]
    layers = base.layers or tuple(layer for layer in _sae_layers(done) if base.min_layer <= layer <= l_star)
    if not layers:
        return _Plan(skip=f"no SAE layer in {base.min_layer}..l* = {l_star} for the FM")
    has_sets = _n_sets(done) > 0
    s = replace(base, prune_id=done["prune"].result_id if has_sets else None, layers=layers, saes=_specs(done),
                sweep=base.sweep and has_sets)
    return _Plan(s, lambda: _run_stage3(ctx, s))


def _run_stage3(ctx: _Context, s: Stage3Settings) -> tuple[str, dict[str, Any], str]:
    note = "" if s.sweep else "; no sweep (no stage-2 sets)"
    try:
        r = stage3.run(ctx.store, ctx.model, s, log=ctx.log)
    except UsageError as err:             # e.g. no stage-2 latent among the FM's columns: fit and compare only
        if not s.sweep:
            raise
        note = f"; sweep not run: {err}"
        r = stage3.run(ctx.store, ctx.model, replace(s, sweep=False), log=ctx.log)
    outputs = {"fm_model_id": r.fm_model_id, "sweep_id": r.sweep_id, "n_stage3_sets": r.n_stage3_sets}
    return r.sweep_id or r.fm_model_id, outputs, stage3.summary_line(r) + note


def _plan_redundancy(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if not _n_sets(done):
        return _Plan(skip="no stage-2 sets")
    found = done["stage3"].outputs
    s = replace(ctx.settings.redundancy, prune_id=done["prune"].result_id, saes=_specs(done),
                stage3_id=found["sweep_id"] if found.get("n_stage3_sets") else "none")
    return _Plan(s, lambda: _finish(redundancy.run(ctx.store, ctx.model, s, log=ctx.log), redundancy,
                                    lambda r: (r.analysis_id, {"n_kept": r.metrics["n_kept"]})))


def _plan_controls(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    if not _n_sets(done):
        return _Plan(skip="no stage-2 sets")
    s = replace(ctx.settings.controls, prune_id=done["prune"].result_id)
    return _Plan(s, lambda: _finish(controls.run(ctx.store, ctx.model, s, log=ctx.log), controls,
                                    lambda r: (r.controls_id, {})))


def _plan_costs(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = ctx.settings.costs
    set_id = {1: done["candidates"].result_id, 2: done["prune"].result_id,
              3: done["stage3"].outputs.get("sweep_id")}[s.stage]
    return _Plan(s, lambda: _run_costs(ctx, s, done["direction"].result_id, set_id, _specs(done)))


def _run_costs(ctx: _Context, s: CostsSettings, direction_id: str, set_id: str | None,
               specs: tuple[str, ...]) -> tuple[str, dict[str, Any], str]:
    vector = direction.load_direction(ctx.store, direction_id)[1]
    sets = catalog.feature_sets(ctx.store, set_id, s.stage) if set_id else {}
    saes = resolve_saes(ctx.store, ctx.model, specs, "") if "feature_ablation" in s.conditions and sets else []
    r = costs.run(ctx.store, ctx.model, saes, s, direction=vector, feature_sets=sets, log=ctx.log, sets_from=set_id)
    return r.costs_id, {}, costs.summary_line(r)


def _plan_taxonomy(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = {"n_coconot": ctx.settings.n_coconot, "taxonomy": asdict(ctx.settings.taxonomy)}
    return _Plan(s, lambda: _run_taxonomy(ctx, _specs(done)))


def _run_taxonomy(ctx: _Context, specs: tuple[str, ...]) -> tuple[str, dict[str, Any], str]:
    prompts = taxonomy.coconot_prompts(ctx.settings.taxonomy.subset, limit=ctx.settings.n_coconot)
    refs = resolve_saes(ctx.store, ctx.model, specs, "")
    ctx.log(f"taxonomy: {len(prompts)} CoCoNot prompts with SAEs at layers {span([r.layer for r in refs])}")
    run_id = extract(ctx.store, ctx.model, make_items(ctx.model, prompts), refs,
                     ExtractSettings(layers=(), positions="all")).run_id
    s = ctx.settings.taxonomy
    if s.features == "sets" and not catalog.has_feature_sets(ctx.store):
        return run_id, {}, f"{len(prompts)} CoCoNot prompts extracted; no feature sets to map"
    r = taxonomy.run(ctx.store, s)
    return run_id, {"n_features": r.mapping.height}, f"{len(prompts)} CoCoNot prompts: {taxonomy.summary_line(r)}"


def _plan_report(ctx: _Context, done: dict[str, StageOutcome]) -> _Plan:
    s = ctx.settings.report
    return _Plan(s, lambda: _finish(report.run(ctx.store, s), report,
                                    lambda r: (str(r.html), {"html": str(r.html), "markdown": str(r.markdown)})))


_PLANNERS: dict[str, Callable[[_Context, dict[str, StageOutcome]], _Plan]] = {
    "saes": _plan_saes, "direction": _plan_direction, "candidates": _plan_candidates, "prune": _plan_prune,
    "stage3": _plan_stage3, "redundancy": _plan_redundancy, "controls": _plan_controls, "costs": _plan_costs,
    "taxonomy": _plan_taxonomy, "report": _plan_report,
}
