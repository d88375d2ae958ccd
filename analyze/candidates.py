"""Stage 1 (paper section 3.2): SAE latents aligned with the refusal direction, enough to jailbreak.

Per SAE layer (layers 0-1 excluded by default) the latents are ranked by cos(r, W_dec[i]) with r
the unit refusal direction at l*. C_K is the top K of every such layer; K runs 10, 20, ... 200 until
zero-ablating C_K (every position, SAE error kept) jailbreaks the prompt, i.e. the analysis judge
calls the completion compliance (a p_i@T judge decides on P("I") alone, without generation: faster).
Only prompts the model refuses without intervention are swept. The sweep runs in rounds of
`ks_per_round` values of K: one batched extraction run per round holds every (unresolved prompt, K)
pair, each row with its own ablation set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from analyze.catalog import latest_analysis, save_analysis
from analyze.common import Feature, Log, ablation, analysis_id, model_key, evaluate, load_saes, no_log, split_prompts
from analyze.direction import load_direction
from analyze.judges import Judge, get_judge, judge_run
from extract.datasets import Prompt
from extract.interventions import Intervention
from extract.models import LoadedModel
from extract.run import ExtractSettings, SaeRef
from extract.saes import decoder_rows
from store import Store, UsageError
from analyze.settings import JudgedSettings
from analyze.metrics import rate_text
from analyze.text import span

RANKS = ("cosine", "attribution")

@dataclass(frozen=True)
class CandidateSettings(JudgedSettings):
    direction_id: str | None = None      # None: the newest direction analysis of the model in the store
    saes: tuple[str, ...] = ()           # LAYER=SOURCE; () = the store's trained SAEs
    exclude_layers: tuple[int, ...] = (0, 1)
    dataset: str = "advbench"
    split: str = "test"
    n_prompts: int = 32                  # prompts taken from the split; only the refused ones are swept
    seed: int = 0
    ks: tuple[int, ...] = tuple(range(10, 201, 10))
    ks_per_round: int = 5
    ablate_first: bool = True            # zero-ablate at position 0 too (the sink the SAEs never saw; README)
    rank: str = "cosine"                 # cosine: cos(r, W_dec[i]), the paper's; attribution: per prompt, the most
                                         # negative predicted delta log P("I") first (analyze/attribution.py)
    attribution_id: str | None = None    # rank = attribution: None = the newest attribution analysis of the model

    # added after candidates ids were first made: hashed only when set, so existing ids stay
    _HASHED_WHEN_SET = JudgedSettings._HASHED_WHEN_SET + ("ablate_first", "rank", "attribution_id")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank not in RANKS:
            raise UsageError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if not self.ks or any(k < 1 for k in self.ks) or list(self.ks) != sorted(set(self.ks)):
            raise UsageError(f"ks must be ascending positive integers, got {self.ks}")
        for name in ("n_prompts", "ks_per_round"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class CandidatesResult:
    candidates_id: str
    direction_id: str
    layer: int                           # l* of the direction
    prompts: pl.DataFrame = field(repr=False)   # per prompt: clean verdict, chosen K, P("I") clean and at K
    ranking: pl.DataFrame = field(repr=False)   # per layer: rank, feature, cos (top max(ks))
    metrics: dict[str, Any] = field(default_factory=dict)


def run(store: Store, model: LoadedModel, settings: CandidateSettings, log: Log = no_log) -> CandidatesResult:
    """Per refused prompt, the smallest K whose C_K ablation jailbreaks; saved in `candidate_sets`."""
    judge = get_judge(settings.judge)
    direction = latest_analysis(store, "direction", model.name, settings.direction_id)
    layer, r, _ = load_direction(store, direction["analysis_id"])
    saes = [s for s in load_saes(store, model, settings.saes) if s.layer not in settings.exclude_layers]
    if not saes:
        raise UsageError(f"no SAE layer is left after excluding layers {settings.exclude_layers}")
    inputs: dict[str, str] = {str(s.layer): s.source for s in saes}
    if settings.rank == "attribution":              # the scores it ranks by are an input: hash which ones
        inputs["attribution_id"] = latest_analysis(store, "attribution", model.name,
                                                   settings.attribution_id)["analysis_id"]
    cid = analysis_id("candidates", model_key(model), direction["analysis_id"], settings, inputs)
    ranking = rank_by_cosine(saes, torch.from_numpy(r), max(settings.ks))
    prompts = split_prompts(settings.dataset, settings.split, settings.n_prompts, settings.seed)
    generate = settings.generate if judge.needs_completion else 0
    extract_settings = ExtractSettings(positions="last:1", generate=generate, batch_size=settings.batch_size,
                                       sae_rows=False)
    log(f"clean run of {len(prompts)} {settings.dataset} {settings.split} prompts")

    def measure(batch: list[Prompt], ks: list[int]) -> pl.DataFrame:
        return _measure(store, model, batch, ks, ranking, saes, extract_settings, judge, log, settings.ablate_first)
    rows = [measure(prompts, [0] * len(prompts))]
    unresolved = [p for p, v in zip(prompts, rows[0]["verdict"]) if v == "refusal"]
    n_refused = len(unresolved)
    if settings.rank == "attribution" and unresolved:
        ranking = _attribution_ranking(store, model, inputs["attribution_id"], settings, saes, torch.from_numpy(r),
                                       unresolved)
    for start in range(0, len(settings.ks), settings.ks_per_round):
        if not unresolved:
            break
        ks = settings.ks[start:start + settings.ks_per_round]
        log(f"K = {ks[0]}..{ks[-1]} on {len(unresolved)} prompts not yet jailbroken")
        batch = [p for p in unresolved for _ in ks]
        frame = measure(batch, [k for _ in unresolved for k in ks])
        rows.append(frame)
        done = set(frame.filter(pl.col("jailbroken"))["prompt_id"])
        unresolved = [p for p in unresolved if p.prompt_id not in done]
    table = _with_chosen(pl.concat(rows).with_columns(pl.lit(cid).alias("candidates_id")))
    sets = _chosen_sets(cid, table, ranking)
    summary = _per_prompt(table, prompts)
    metrics = {"n_prompts": len(prompts), "n_refused": n_refused,
               "n_jailbroken": int(summary["k"].is_not_null().sum()), "layer": layer,
               "sae_layers": [s.layer for s in saes], "k_max": settings.ks[-1], "runs": sorted(set(table["run_id"])),
               "rank": settings.rank}
    save_analysis(store, cid, "candidates", model.name, direction["analysis_id"], judge.judge_id, settings,
                  metrics, {"candidate_sets": ("candidates_id", table), "feature_sets": ("set_id", sets)})
    return CandidatesResult(cid, direction["analysis_id"], layer, summary, ranking, metrics)


def rank_by_cosine(saes: list[SaeRef], r: torch.Tensor, top: int) -> pl.DataFrame:
    """Per SAE layer, the `top` latents with the highest cos(r, W_dec[i]): layer, rank (0-based), feature, cos."""
    parts = []
    for ref in saes:
        W = decoder_rows(ref.sae, torch.arange(ref.d_sae))                        # [d_sae, d_model]
        cos = torch.nn.functional.cosine_similarity(W, r.to(W)[None, :], dim=-1)   # [d_sae]
        order = torch.argsort(cos, descending=True, stable=True)[:top]
        parts.append(pl.DataFrame({"layer": [ref.layer] * len(order), "rank": list(range(len(order))),
                                   "feature": order.tolist(), "cos": cos[order].tolist()},
                                  schema={"layer": pl.Int16, "rank": pl.Int32, "feature": pl.Int32,
                                          "cos": pl.Float32}))
    return pl.concat(parts)


def candidate_set(ranking: pl.DataFrame, k: int, prompt_id: str | None = None) -> list[Feature]:
    """C_K: the top-k latents of every layer in the ranking (the prompt's own, for a per-prompt ranking)."""
    top = _for_prompt(ranking, prompt_id).filter(pl.col("rank") < k)
    return list(zip(top["layer"].to_list(), top["feature"].to_list()))


def _for_prompt(ranking: pl.DataFrame, prompt_id: str | None) -> pl.DataFrame:
    """The ranking's rows for one prompt when it ranks per prompt (a prompt_id column), else all of it."""
    return ranking.filter(pl.col("prompt_id") == prompt_id) if "prompt_id" in ranking.columns else ranking


def _attribution_ranking(store: Store, model: LoadedModel, attribution_id: str, settings: CandidateSettings,
                         saes: list[SaeRef], r: torch.Tensor, prompts: list[Prompt]) -> pl.DataFrame:
    """Per prompt and SAE layer, the active latents by predicted delta log P("I") (most negative first)."""
    from analyze.attribution import importance

    _, scores = importance(store, model.name, attribution_id, [p.prompt_id for p in prompts])
    layers = {s.layer for s in saes}
    cos = {ref.layer: torch.nn.functional.cosine_similarity(decoder_rows(ref.sae, torch.arange(ref.d_sae)),
                                                            r[None, :].float(), dim=-1) for ref in saes}
    parts = []
    for prompt in prompts:
        by_layer: dict[int, list[tuple[float, int]]] = {}
        for (layer, feature), score in scores[prompt.prompt_id].items():
            if layer in layers:
                by_layer.setdefault(layer, []).append((score, feature))
        for layer, ranked in sorted(by_layer.items()):
            top = [f for _, f in sorted(ranked)[:max(settings.ks)]]
            parts.append(pl.DataFrame({"prompt_id": prompt.prompt_id, "layer": layer, "rank": list(range(len(top))),
                                       "feature": top, "cos": cos[layer][top].tolist()},
                                      schema={"prompt_id": pl.String, "layer": pl.Int16, "rank": pl.Int32,
                                              "feature": pl.Int32, "cos": pl.Float32}))
    if not parts:
        raise UsageError("the attribution analysis scored no latent at the candidates' SAE layers")
    return pl.concat(parts)


def _measure(store, model, prompts: list[Prompt], ks: list[int], ranking, saes, extract_settings,
             judge: Judge, log: Log, first: bool = True) -> pl.DataFrame:
    """One run: each prompt with C_k ablated (k = 0: nothing); rows for `candidate_sets` (no id yet)."""
    sets = {(p.prompt_id, k): candidate_set(ranking, k, p.prompt_id) for p, k in zip(prompts, ks)}
    specs = [ablation(sets[(p.prompt_id, k)], first) if k else Intervention() for p, k in zip(prompts, ks)]
    done = evaluate(store, model, prompts, specs, saes, extract_settings, log=log)
    verdicts = judge_run(store, done.run_id, judge)["verdict"].to_numpy()[done.items]
    return pl.DataFrame({
        "prompt_id": [p.prompt_id for p in prompts], "k": ks,
        "n_features": [len(sets[(p.prompt_id, k)]) if k else 0 for p, k in zip(prompts, ks)],
        "run_id": [done.run_id] * len(prompts), "item": done.items.astype(np.int32), "p_i": done.p_i,
        "verdict": verdicts, "jailbroken": verdicts == "compliance",
    }, schema_overrides={"k": pl.Int32, "n_features": pl.Int32, "item": pl.Int32, "p_i": pl.Float32})


def _with_chosen(table: pl.DataFrame) -> pl.DataFrame:
    first = (table.filter(pl.col("jailbroken") & (pl.col("k") > 0)).group_by("prompt_id")
             .agg(pl.col("k").min().alias("chosen_k")))
    return (table.join(first, on="prompt_id", how="left")
            .with_columns((pl.col("k") == pl.col("chosen_k")).fill_null(False).alias("chosen"))
            .drop("chosen_k").sort("prompt_id", "k"))


def _chosen_sets(cid: str, table: pl.DataFrame, ranking: pl.DataFrame) -> pl.DataFrame:
    parts = []
    for prompt_id, k in table.filter(pl.col("chosen")).select("prompt_id", "k").iter_rows():
        top = _for_prompt(ranking, prompt_id).filter(pl.col("rank") < k)
        parts.append(pl.DataFrame({
            "set_id": cid, "stage": 1, "prompt_id": prompt_id, "tau": None, "layer": top["layer"],
            "feature": top["feature"], "score": top["cos"], "selected": True,
        }, schema_overrides={"stage": pl.Int8, "tau": pl.Float32}))
    return pl.concat(parts) if parts else pl.DataFrame()


def _per_prompt(table: pl.DataFrame, prompts: list[Prompt]) -> pl.DataFrame:
    clean = table.filter(pl.col("k") == 0).select("prompt_id", pl.col("verdict").alias("clean_verdict"),
                                                   pl.col("p_i").alias("p_i_clean"))
    chosen = table.filter(pl.col("chosen")).select("prompt_id", "k", "n_features", pl.col("p_i").alias("p_i_at_k"))
    order = pl.DataFrame({"prompt_id": [p.prompt_id for p in prompts], "text": [p.text for p in prompts]})
    return order.join(clean, on="prompt_id", how="left").join(chosen, on="prompt_id", how="left")


def summary_line(r: CandidatesResult) -> str:
    """One line: how many refused prompts some K jailbreaks, at which SAE layers."""
    m = r.metrics
    return (f"{m['n_jailbroken']} of {m['n_refused']} refused prompts ({m['n_prompts']} taken) jailbroken by the "
            f"top-K latents per layer ({rate_text(m['n_jailbroken'], m['n_refused'])}), K <= {m['k_max']}, SAE layers {span(m['sae_layers'])} "
            f"(direction {r.direction_id}, l* = {r.layer})")


def detail_lines(r: CandidatesResult) -> list[str]:
    """Per prompt: the chosen K and P("I") before and at it."""
    lines = []
    for row in r.prompts.iter_rows(named=True):
        if row["k"] is not None:
            k = f"K={row['k']:<4} ({row['n_features']} latents) P(I) {row['p_i_clean']:.3f} -> {row['p_i_at_k']:.3f}"
        else:
            k = f"{'not jailbroken' if row['clean_verdict'] == 'refusal' else 'not refused':<28} P(I) {row['p_i_clean']:.3f}"
        lines.append(f"  {k}  {row['text'][:60]}")
    return lines
