"""Transfer: what the pipeline found, applied to harmful prompts it was not found on.

Each intervention is applied to every held-out prompt (a dataset's split, seeded; prompts the stage-2
sets were found on are dropped unless `exclude_found` is off), at every position:
- direction: ablation of the l* refusal direction of a direction analysis at every layer (skipped
  when the store has none and none was asked for);
- union: zero-ablation of the union of a prune analysis' selected stage-2 sets;
- core: the features in at least `core_share` of those sets (the shared core);
- stage3: the union of the selected sets of the newest stage-3 analysis on that prune analysis (skipped
  when there is none, or its SAE layers are not among the stage-2 analysis' SAEs);
- per feature set, two random controls of its size, drawn with `seed` (never the set's own features):
  random_count: as many features per SAE layer as the set has there, from every latent of that SAE;
  random_active: per set feature, a feature of its layer active on the held-out prompts whose clean
  activation (the mean over prompts of its max over the user + post_instruction tokens, 0 where it is
  silent) falls in the same of `n_bins` quantile bins among that layer's active features (the nearest
  non-empty bin when that one is used up); a set feature silent on these prompts gets a silent one
  (either kind falls back to the other when its pool is empty, so the size matches while the layer lasts).
Refusal rate: prompts judged refusal without intervention; ASR: the share of those judged compliance
under the intervention; both with Wilson 95% intervals. CE: next-token loss on the instruction tokens
of Alpaca's test split under the same interventions (`costs.loss_run`), beside the unmodified model.
Table `transfer_results` (0012); the analysis is an `analyses` row of kind 'transfer' whose parent is
the prune analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from analyze import catalog
from analyze.direction import load_direction
from analyze.common import Feature, Log, ablation, analysis_id, model_key, evaluate, no_log, split_prompts
from analyze.controls import stage2_saes
from analyze.costs import loss_run
from analyze.judges import Judge, get_judge, judge_run
from analyze.metrics import Rate
from analyze.settings import JudgedSettings
from extract.datasets import Prompt, load_prompts
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef, extract, make_items
from store import Store, UsageError

COUNTED_ROLES = ["user", "post_instruction"]          # the harmful instruction and the template tail after it

# per (layer, feature): the mean over the n items of its max value over an item's counted tokens
MAGNITUDES_SQL = """
SELECT layer, feature, sum(peak) / ? AS magnitude FROM (
    SELECT t.item, a.layer, a.feature, max(a.value) AS peak
    FROM sae_acts a JOIN tokens t ON t.run_id = a.run_id AND t.row = a.row
    WHERE a.run_id = ? AND list_contains(?, t.role) AND list_contains(?, a.layer)
    GROUP BY t.item, a.layer, a.feature)
GROUP BY layer, feature ORDER BY layer, feature
"""


@dataclass(frozen=True)
class TransferSettings(JudgedSettings):
    dataset: str = "harmbench"            # held-out harmful prompts: a dataset name or a file
    split: str = "test"                   # train, val, test, or all
    limit: int = 100                      # at most this many prompts of the split, in the seeded order
    seed: int = 0                         # the dataset's order and the random controls
    direction_id: str | None = None       # direction analysis; None: the model's newest (skipped if none)
    prune_id: str | None = None           # prune analysis whose stage-2 sets are applied; None: the newest
    core_share: float = 0.5               # shared core: features in at least this share of the stage-2 sets
    n_bins: int = 10                      # activation quantile bins of the random_active control
    n_alpaca: int = 100                   # Alpaca test prompts for CE (0: skip CE)
    exclude_found: bool = True            # drop held-out prompts that have a stage-2 set
    judge: str | None = None              # None: the prune analysis' judge
    generate: int | None = None           # completion tokens; None: the prune analysis' value

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in ("train", "val", "test", "all"):
            raise UsageError(f"split must be train, val, test or all, got {self.split!r}")
        if self.limit < 1 or self.n_bins < 1 or self.n_alpaca < 0:
            raise UsageError(f"limit and n_bins must be >= 1 and n_alpaca >= 0; got {self.limit}, {self.n_bins}, "
                             f"{self.n_alpaca}")
        if not 0 < self.core_share <= 1:
            raise UsageError(f"core_share must be in (0, 1], got {self.core_share}")


@dataclass(frozen=True)
class _Arm:
    intervention: str                     # none | direction | union | core | stage3 | random_count | random_active
    matched_to: str | None                # the set a random control is drawn for
    features: tuple[Feature, ...]
    spec: Intervention


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    prune_id: str
    judge: str
    table: pl.DataFrame = field(repr=False)   # the `transfer_results` rows, the unmodified model first
    skipped: dict[str, str] = field(default_factory=dict)   # intervention -> why it did not run
    summary: dict[str, Any] = field(default_factory=dict)


def run(store: Store, model: LoadedModel, settings: TransferSettings = TransferSettings(),
        log: Log = no_log) -> TransferResult:
    """Refusal rate, ASR on the refused prompts and Alpaca CE of each found intervention on held-out prompts."""
    prune = catalog.latest_analysis(store, "prune", model.name, settings.prune_id)
    prune_id = prune["analysis_id"]
    judge = get_judge(settings.judge or prune["settings"].get("judge", "content"))
    generate = prune["settings"].get("generate", 64) if settings.generate is None else settings.generate
    found = catalog.feature_sets(store, prune_id, 2)
    if not found:
        raise UsageError(f"prune analysis {prune_id} selected no stage-2 sets; run `python cli.py analyze prune`")
    prompts = held_out(settings, set(found))
    saes = stage2_saes(store, model, prune)
    sets, skipped, inputs = _feature_sets(store, model.name, prune_id, found, saes, settings.core_share)
    direction, why = _direction(store, model.name, settings.direction_id)
    if why:
        skipped["direction"] = why
    tid = analysis_id("transfer", model_key(model), prune_id, settings, {
        **inputs, "direction": direction[0] if direction else None, "saes": {str(s.layer): s.source for s in saes},
        "judge": judge.judge_id, "generate": generate})
    log(f"transfer: {len(prompts)} held-out prompts of {settings.dataset} ({settings.split})")
    magnitudes = clean_magnitudes(store, model, prompts, saes)
    arms = _arms(sets, direction, saes, magnitudes, settings, catalog.ablates_first(store, prune_id))
    judged = _judged(store, model, prompts, arms, saes, judge, generate if judge.needs_completion else 0,
                     settings.batch_size, log)
    ce = _ce(store, model, arms, saes, settings, log)
    table = _table(tid, arms, judged, ce)
    summary = {"dataset": settings.dataset, "split": settings.split, "n_prompts": len(prompts),
               "judged_run_id": judged["run_id"][0], "skipped": skipped, **inputs,
               "direction_id": direction[0] if direction else None}
    catalog.save_analysis(store, tid, "transfer", model.name, prune_id, judge.judge_id, settings, summary,
                          {"transfer_results": ("transfer_id", table)})
    return TransferResult(tid, prune_id, judge.judge_id, table, skipped, summary)


# ---- inputs -----------------------------------------------------------------------------------

def held_out(settings: TransferSettings, found: set[str]) -> list[Prompt]:
    """The split's first `limit` prompts in the seeded order, less those with a stage-2 set (`exclude_found`)."""
    if settings.split == "all":
        chosen = load_prompts(settings.dataset, seed=settings.seed)
    else:
        chosen = split_prompts(settings.dataset, settings.split, settings.limit + len(found), settings.seed)
    if settings.exclude_found:
        chosen = [p for p in chosen if p.prompt_id not in found]
    if not chosen:
        raise UsageError(f"no held-out prompts in {settings.dataset} ({settings.split}) once the prompts the stage-2 "
                         f"sets were found on are dropped; pass another --dataset or --split")
    return chosen[:settings.limit]


def shared_core(sets: Sequence[Sequence[Feature]], share: float) -> tuple[Feature, ...]:
    """The features in at least `share` of the sets, sorted."""
    counts: dict[Feature, int] = {}
    for s in sets:
        for f in set(s):
            counts[f] = counts.get(f, 0) + 1
    return tuple(sorted(f for f, n in counts.items() if n >= share * len(sets)))


def _feature_sets(store: Store, model: str, prune_id: str, found: dict[str, tuple[Feature, ...]],
                  saes: Sequence[SaeRef], share: float) -> tuple[dict[str, tuple[Feature, ...]], dict[str, str], dict]:
    """union, core and stage3 (when there is one) by name, why any was skipped, the stage-3 id for the hash."""
    sets = {"union": tuple(sorted({f for s in found.values() for f in s})),
            "core": shared_core(list(found.values()), share)}
    skipped = {}
    stage3_id = catalog.newest_stage3(store, model, prune_id)
    if stage3_id is None:
        skipped["stage3"] = (f"no stage-3 sets on prune analysis {prune_id}; run `python cli.py analyze stage3` "
                             "(with its sweep)")
    else:
        union3 = tuple(sorted({f for s in catalog.feature_sets(store, stage3_id, 3).values() for f in s}))
        missing = sorted({layer for layer, _ in union3} - {s.layer for s in saes})
        if missing:
            skipped["stage3"] = f"stage-3 sets {stage3_id} use layers {missing} that have no stage-2 SAE"
        else:
            sets["stage3"] = union3
    if not sets["core"]:
        skipped["core"] = f"no feature is in {share:.0%} of the {len(found)} stage-2 sets"
        del sets["core"]
    return sets, skipped, {"n_sets": len(found), "stage3_id": stage3_id if "stage3" in sets else None}


def _direction(store: Store, model: str, wanted: str | None) -> tuple[tuple[str, tuple[float, ...]] | None, str | None]:
    """(direction id, its l* vector), or None and why."""
    if wanted is None and store.sql("SELECT 1 FROM analyses WHERE kind = 'direction' AND model = ? LIMIT 1",
                                    [model]).is_empty():
        return None, f"no direction analysis for {model}; run `python cli.py analyze direction`"
    row = catalog.latest_analysis(store, "direction", model, wanted)
    try:
        vector = load_direction(store, row["analysis_id"])[1]
    except UsageError:
        return None, f"direction analysis {row['analysis_id']} selected no l*"
    return (row["analysis_id"], tuple(float(x) for x in vector)), None


def clean_magnitudes(store: Store, model: LoadedModel, prompts: Sequence[Prompt],
                     saes: Sequence[SaeRef]) -> dict[Feature, float]:
    """(layer, feature) -> mean over prompts of its max over the counted tokens, for features active on any."""
    done = extract(store, model, make_items(model, prompts), list(saes), ExtractSettings(positions="all"))
    df = store.sql(MAGNITUDES_SQL, [len(prompts), done.run_id, COUNTED_ROLES, [s.layer for s in saes]])
    return {(int(layer), int(f)): float(v) for layer, f, v in df.iter_rows()}


# ---- the interventions and their random controls -------------------------------------------------

def _arms(sets: dict[str, tuple[Feature, ...]], direction: tuple[str, tuple[float, ...]] | None,
          saes: Sequence[SaeRef], magnitudes: dict[Feature, float], settings: TransferSettings,
          first: bool = True) -> list[_Arm]:
    """The interventions and their controls; feature sets ablated at position 0 too when `first` (the rule
    under which the prune analysis found them)."""
    arms = [_Arm("none", None, (), Intervention())]
    if direction is not None:
        arms.append(_Arm("direction", None, (), Intervention(direction_ablate=direction[1])))
    d_sae = {s.layer: s.d_sae for s in saes}
    for k, (name, features) in enumerate(sets.items()):
        rng = np.random.default_rng([settings.seed, k])
        count = random_count(features, d_sae, rng)
        active = random_active(features, magnitudes, d_sae, settings.n_bins, rng)
        arms += [_Arm(name, None, features, ablation(features, first)),
                 _Arm("random_count", name, count, ablation(count, first)),
                 _Arm("random_active", name, active, ablation(active, first))]
    return arms


def random_count(features: Sequence[Feature], d_sae: dict[int, int], rng: np.random.Generator) -> tuple[Feature, ...]:
    """As many random features per layer as `features` has there, none of them."""
    mine, out = set(features), []
    for layer in sorted({layer for layer, _ in features}):
        pool = [f for f in range(d_sae[layer]) if (layer, f) not in mine]
        need = sum(1 for l, _ in features if l == layer)
        out += [(layer, pool[i]) for i in rng.choice(len(pool), size=min(need, len(pool)), replace=False)]
    return tuple(sorted(out))


def random_active(features: Sequence[Feature], magnitudes: dict[Feature, float], d_sae: dict[int, int],
                  n_bins: int, rng: np.random.Generator) -> tuple[Feature, ...]:
    """Per feature, a random other one of its layer from the same clean-activation quantile bin (see the module doc)."""
    mine, out = set(features), []
    for layer in sorted({layer for layer, _ in features}):
        active = sorted((v, f) for (l, f), v in magnitudes.items() if l == layer)
        bins: dict[int, list[int]] = {}                  # quantile bin -> features of the layer not in the set
        for rank, (_, f) in enumerate(active):
            if (layer, f) not in mine:
                bins.setdefault(rank * n_bins // len(active), []).append(f)
        bins[-1] = [f for f in range(d_sae[layer]) if (layer, f) not in magnitudes and (layer, f) not in mine]
        rank_of = {f: rank for rank, (_, f) in enumerate(active)}
        for _, f in sorted(x for x in features if x[0] == layer):
            want = rank_of[f] * n_bins // len(active) if f in rank_of else -1
            left = [b for b in bins if bins[b] and (b >= 0) == (want >= 0)] or [b for b in bins if bins[b]]
            if left:
                b = min(left, key=lambda b: (abs(b - want), b))
                out.append((layer, bins[b].pop(int(rng.integers(len(bins[b]))))))
    return tuple(sorted(out))


# ---- measuring ----------------------------------------------------------------------------------

def _judged(store: Store, model: LoadedModel, prompts: Sequence[Prompt], arms: Sequence[_Arm], saes: Sequence[SaeRef],
            judge: Judge, generate: int, batch_size: int, log: Log) -> pl.DataFrame:
    """Every (arm, prompt) in one extraction run, judged: arm index, prompt_id, verdict, run_id."""
    pairs = [(k, p) for k in range(len(arms)) for p in prompts]
    settings = ExtractSettings(positions="last:1", generate=generate, batch_size=batch_size, sae_rows=False)
    log(f"  judging {len(arms)} interventions x {len(prompts)} prompts")
    done = evaluate(store, model, [p for _, p in pairs], [arms[k].spec for k, _ in pairs], saes, settings, log=log)
    verdicts = judge_run(store, done.run_id, judge)["verdict"].to_numpy()[done.items]
    return pl.DataFrame({"arm": [k for k, _ in pairs], "prompt_id": [p.prompt_id for _, p in pairs],
                         "verdict": verdicts, "run_id": done.run_id})


def _ce(store: Store, model: LoadedModel, arms: Sequence[_Arm], saes: Sequence[SaeRef], settings: TransferSettings,
        log: Log) -> dict[str, tuple[float, str]]:
    """spec_hash -> (CE on Alpaca's instruction tokens in nats, the loss run); empty when n_alpaca is 0."""
    if not settings.n_alpaca:
        return {}
    alpaca = split_prompts("alpaca", "test", settings.n_alpaca, settings.seed)
    specs = list({a.spec.spec_hash(): a.spec for a in arms}.values())
    refs = [s for s in saes if s.layer in {layer for spec in specs for layer in spec.layers}]
    log(f"  CE on {len(alpaca)} Alpaca prompts x {len(specs)} interventions")
    run_id, per_spec = loss_run(store, model, refs, specs, alpaca)
    return {h: (float(ce), run_id) for h, ce, _, _ in per_spec.iter_rows()}


_COLUMNS = {"transfer_id": pl.String, "intervention": pl.String, "matched_to": pl.String, "n_features": pl.Int32,
            "n_prompts": pl.Int32, "n_refused": pl.Int32, "n_jailbroken": pl.Int32, "asr": pl.Float64,
            "ci_low": pl.Float64, "ci_high": pl.Float64, "ce_alpaca": pl.Float64, "spec_hash": pl.String,
            "run_id": pl.String, "alpaca_run_id": pl.String}


def _table(tid: str, arms: Sequence[_Arm], judged: pl.DataFrame, ce: dict[str, tuple[float, str]]) -> pl.DataFrame:
    """One `transfer_results` row per arm: ASR over the prompts refused without intervention."""
    refused = set(judged.filter((pl.col("arm") == 0) & (pl.col("verdict") == "refusal"))["prompt_id"])
    rows = []
    for k, arm in enumerate(arms):
        mine = judged.filter(pl.col("arm") == k)
        jailbroken = mine.filter(pl.col("prompt_id").is_in(list(refused)) & (pl.col("verdict") == "compliance")).height
        r = Rate(jailbroken, len(refused))
        loss, alpaca_run = ce.get(arm.spec.spec_hash(), (None, None))
        rows.append({"transfer_id": tid, "intervention": arm.intervention, "matched_to": arm.matched_to,
                     "n_features": len(arm.features), "n_prompts": mine.height, "n_refused": len(refused),
                     "n_jailbroken": jailbroken, "asr": r.value if r.n else None, "ci_low": r.low if r.n else None,
                     "ci_high": r.high if r.n else None, "ce_alpaca": loss, "spec_hash": arm.spec.spec_hash(),
                     "run_id": mine["run_id"][0], "alpaca_run_id": alpaca_run})
    return pl.DataFrame(rows, schema=_COLUMNS)


# ---- printing -----------------------------------------------------------------------------------

def _label(row: dict[str, Any]) -> str:
    kind = row["intervention"].removeprefix("random_")
    return f"{row['matched_to']}~{kind}" if row["matched_to"] else kind


def summary_line(r: TransferResult) -> str:
    """One line: the held-out refusal rate and the ASR of each found intervention."""
    clean = r.table.row(0, named=True)
    found = ", ".join(f"{row['intervention']} {Rate(row['n_jailbroken'], row['n_refused']).text()}"
                      for row in r.table.iter_rows(named=True) if row["intervention"] != "none"
                      and row["matched_to"] is None)
    return (f"transfer to {r.summary['dataset']} ({r.summary['split']}): refused "
            f"{Rate(clean['n_refused'], clean['n_prompts']).text()}; ASR {found} (prune {r.prune_id}, judge {r.judge})")


def detail_lines(r: TransferResult) -> list[str]:
    """One row per intervention: features, ASR with its interval, CE change on Alpaca; then what was skipped."""
    base = r.table.row(0, named=True)["ce_alpaca"]
    lines = []
    for row in r.table.iter_rows(named=True):
        if row["intervention"] == "none":
            lines.append(f"{'none':<16} refused {Rate(row['n_refused'], row['n_prompts']).text()}  CE "
                         + (f"{base:.2f}" if base is not None else "-"))
            continue
        ce = f"{row['ce_alpaca'] - base:+.2f}" if base is not None and row["ce_alpaca"] is not None else "-"
        size = "every layer" if row["intervention"] == "direction" else f"{row['n_features']:>4} features"
        lines.append(f"{_label(row):<16} {size:>13}  "
                     f"ASR {Rate(row['n_jailbroken'], row['n_refused']).text()}  CE {ce}")
    return lines + [f"skipped {name}: {why}" for name, why in r.skipped.items()]
