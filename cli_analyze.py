"""`cli.py analyze ...`: the paper's stages over a store, each a thin call to its module's `run`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from cli_support import (EXECUTION, BatchOpt, DeviceOpt, DtypeOpt, GenerateOpt, JudgeOpt, MaxPromptsOpt, ModelOpt,
                         RayAddressOpt, SaeOpt, StoreOpt, WorkersOpt, _log, _options, _stage, opt, stage_command)

analyze_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The paper's analysis stages over a store.")


@analyze_app.command("direction")
def analyze_direction(
    model: Optional[str] = ModelOpt, harmful: Optional[str] = opt("--harmful", "Harmful prompt set (name or file)."),
    harmless: Optional[str] = opt("--harmless", "Harmless prompt set (name or file)."),
    n_train: Optional[int] = opt("--n-train", "Train-split prompts per set for the difference in means."),
    n_val: Optional[int] = opt("--n-val", "Val-split prompts per set for ASR, KL and controls."),
    seed: Optional[int] = opt("--seed", "Seed of the datasets' order and split, and of the random directions."),
    layers: Optional[str] = opt("--layers", "Candidate layers for l* (2-16, 3,7,12) (default: the first 80%)."),
    judge: Optional[str] = JudgeOpt, generate: Optional[int] = GenerateOpt,
    n_random: Optional[int] = opt("--n-random", "Random unit directions in each control."),
    add_scale: Optional[float] = opt("--add-scale", "direction_add scale (default: |diff in means| at l*)."),
    batch_size: Optional[int] = BatchOpt,
    plots: Optional[Path] = opt("--plots", "Directory for the PNG plots (default: STORE/plots)."),
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Refusal direction per layer (difference in means), its ablation ASR on held-out prompts, l*, controls, plots.

    Example: python cli.py analyze direction --n-train 64 --n-val 32 --store stores/default
    """
    from analyze import plots as plotting
    from extract.layers import parse_layers

    options = _options(locals(), "plots", "layers", "model", "device", "dtype", *EXECUTION)

    def run(m, s, loaded, built):
        chosen = parse_layers(layers, loaded.n_layers) if layers else built.layers
        return m.run(s, loaded, replace(built, layers=chosen), log=_log)
    stage_command("analyze.direction", store, lambda m: m.DirectionSettings.from_options(**options), run, model,
                  device, dtype, workers=workers, ray_address=ray_address, then=lambda m, s, r: [
        f"plot: {f}" for f in plotting.direction_plots(s, r.direction_id, plots or Path(store) / "plots")])


@analyze_app.command("candidates")
def analyze_candidates(
    model: Optional[str] = ModelOpt,
    direction_id: Optional[str] = opt("--direction", "Direction analysis id (default: the newest)."),
    sae: list[str] = SaeOpt, sae_store: Optional[str] = opt("--sae-store", "Use the trained SAEs of another store."),
    exclude_layers: Optional[str] = opt("--exclude-layers", "SAE layers left out of the candidates."),
    dataset: Optional[str] = opt("--dataset", "Harmful prompt set (name or file)."),
    split: Optional[str] = opt("--split", "train, val or test."),
    n_prompts: Optional[int] = opt("--n-prompts", "Prompts taken from the split (only refused ones are swept)."),
    seed: Optional[int] = opt("--seed", "Seed of the dataset's order and split."),
    ks: Optional[str] = opt("--ks", "K values (latents per layer): 10,20,50 or start:stop:step."),
    ks_per_round: Optional[int] = opt("--ks-per-round", "Values of K per batched run."),
    ablate_first: Optional[bool] = opt("--ablate-first/--no-ablate-first",
                                       "Zero-ablate at position 0 (the massive-activation sink) too."),
    rank: Optional[str] = opt("--rank", "cosine (the paper's cos(r, W_dec)) or attribution (per prompt, by "
                              "predicted delta log P(\"I\"); needs `analyze attribution`)."),
    attribution_id: Optional[str] = opt("--attribution", "Attribution analysis id for --rank attribution "
                                        "(default: the newest)."),
    judge: Optional[str] = JudgeOpt, generate: Optional[int] = GenerateOpt, batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Stage 1: per refused prompt, the smallest K whose top-K latents per layer by cos(r, W_dec) jailbreak it.

    Example: python cli.py analyze candidates --n-prompts 16 --sae-store stores/saes --store stores/default
    """
    options = _options(locals(), "sae", "sae_store", "model", "device", "dtype", *EXECUTION)

    def run(m, s, loaded, built):
        from analyze.common import sae_specs_from_store

        saes = tuple(sae) + (sae_specs_from_store(sae_store, loaded.name) if sae_store else ())
        return m.run(s, loaded, replace(built, saes=saes), log=_log)
    stage_command("analyze.candidates", store, lambda m: m.CandidateSettings.from_options(**options), run, model,
                  device, dtype, workers=workers, ray_address=ray_address)


@analyze_app.command("prune")
def analyze_prune(
    model: Optional[str] = ModelOpt,
    candidates_id: Optional[str] = opt("--candidates", "Candidates analysis id (default: the newest)."),
    block_size: Optional[int] = opt("--block-size", "N: features per block."),
    taus: Optional[str] = opt("--taus", "Thresholds on delta P(\"I\"), comma-separated."),
    seeds: Optional[str] = opt("--seeds", "Seeds of the block order; features kept under all count."),
    max_prompts: Optional[int] = MaxPromptsOpt,
    pool: Optional[str] = opt("--pool", "candidates (C_K) or active (C_K ∩ latents active on the prompt)."),
    variant: Optional[str] = opt("--variant", "Reading of Algorithm 1: prose (accepted blocks stay ablated) or "
                                 "literal (the pseudocode: accepted blocks are restored too)."),
    last_block: Optional[str] = opt("--last-block", "A last block of fewer than N features: test it, or skip it "
                                    "(the pseudocode's while |C\\K| >= N)."),
    ablate_first: Optional[bool] = opt("--ablate-first/--no-ablate-first",
                                       "Zero-ablate at position 0 (the massive-activation sink) too."),
    magnitude_bins: Optional[int] = opt("--magnitude-bins", "Quantile bins of the magnitude-matched random control "
                                        "(4: quartiles of the prompt's activation values per layer)."),
    order: Optional[str] = opt("--order", "Block order: random (the paper's), attribution (least |attribution| "
                               "first), bisect (bisection over the attribution-sorted pool) or gallop (Algorithm 1 "
                               "from the least attributed end, blocks doubling while they are pruned)."),
    attribution_id: Optional[str] = opt("--attribution", "Attribution analysis id for --order attribution|bisect "
                                        "(default: the newest)."),
    bisect_base: Optional[str] = opt("--bisect-base", "--order bisect: delta against P(C), the pool ablated (pool), "
                                     "or against the last passing prefix, as Algorithm 1's base drifts (last_pass)."),
    tau_search: Optional[str] = opt("--tau-search", "sweep (every tau searched and judged, the paper's) or descending "
                                    "(largest tau first; a prompt stops at its first jailbreaking tau: the same "
                                    "selected set, fewer evaluations)."),
    refine: Optional[bool] = opt("--refine/--no-refine", "Search each jailbreaking selected set again with blocks of "
                                 "one; the smaller set replaces it when it still jailbreaks."),
    judge: Optional[str] = JudgeOpt, generate: Optional[int] = GenerateOpt, batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Stage 2: Algorithm 1 (blocks of N, keep if delta P("I") >= tau) in lockstep, minimal sets, jailbreak table.

    Example: python cli.py analyze prune --max-prompts 16 --store stores/default
    """
    _stage("analyze.prune", "PruneSettings", _options(locals()), store)


@analyze_app.command("attribution")
def analyze_attribution(
    model: Optional[str] = ModelOpt,
    candidates_id: Optional[str] = opt("--candidates", "Candidates analysis whose refused prompts and SAE layers "
                                       "are scored (default: the newest)."),
    metric: Optional[str] = opt("--metric", "log_p (log P(\"I\")) or logit_diff (\"I\" minus the top other token)."),
    steps: Optional[int] = opt("--steps", "Integrated-gradient points (1 = attribution patching)."),
    max_prompts: Optional[int] = MaxPromptsOpt,
    n_single: Optional[int] = opt("--n-single", "Faithfulness: single latents ablated per prompt and layer."),
    n_blocks: Optional[int] = opt("--n-blocks", "Faithfulness: blocks ablated per prompt and layer."),
    block_size: Optional[int] = opt("--block-size", "Latents per faithfulness block."),
    check_seed: Optional[int] = opt("--check-seed", "Seed of the faithfulness sample."),
    batch_size: Optional[int] = BatchOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Gradient attribution of every active SAE latent on the stage-1 prompts, checked against real ablations.

    Example: python cli.py analyze attribution --steps 1 --store stores/default
    """
    _stage("analyze.attribution", "AttributionSettings", _options(locals()), store)


@analyze_app.command("stage3")
def analyze_stage3(
    model: Optional[str] = ModelOpt,
    prune_id: Optional[str] = opt("--prune", "Prune analysis whose stage-2 sets are swept (default: the newest)."),
    layers: Optional[str] = opt("--layers", "FM input layers (2-12, 3,7,12) (default: 2..l*)."),
    sae: list[str] = SaeOpt,
    limit: Optional[int] = opt("--limit", "AdvBench and Alpaca prompts each (seeded; splits as stored)."),
    embedding: Optional[int] = opt("--embedding", "FM embedding size k (paper: 20; 5 and 50 as diagnostics)."),
    epochs: Optional[int] = opt("--epochs", "FM epochs; the best validation epoch is kept."),
    lr: Optional[float] = opt("--lr", "Adam learning rate of the FM."),
    diagnostic_embeddings: Optional[str] = opt("--diagnostic-embeddings", "Embedding sizes for the similarity diagnostic."),
    sweep: Optional[bool] = opt("--sweep/--no-sweep", "Run the ablation sweep (needs stage-2 sets)."),
    ks: Optional[str] = opt("--ks", "K values (FM-ranked latents ablated with the stage-2 set): list or start:stop:step."),
    probe_ks: Optional[str] = opt("--probe-ks", "K values for the probe-ranked sweep (default: the FM's, paired)."),
    aggregate: Optional[str] = opt("--aggregate", "FM score over a prompt's stage-2 set: max or mean cosine."),
    stage2_set: Optional[str] = opt("--stage2-set", "Stage-2 part ablated under the top-K: active (the paper: "
                                    "dormant features removed) or full."),
    max_prompts: Optional[int] = MaxPromptsOpt,
    judge: Optional[str] = JudgeOpt, generate: Optional[int] = GenerateOpt, batch_size: Optional[int] = BatchOpt,
    fm_device: Optional[str] = opt("--fm-device", "Where the FM trains: auto (cuda if available), cpu, cuda."),
    plot: Optional[Path] = opt("--plot", "PNG of ASR per K (default: STORE/plots/stage3_<sweep>.png)."),
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Stage 3: factorization machine vs linear probe on SAE activations, and the top-K ablation sweep.

    Example: python cli.py analyze stage3 --layers 2-12 --ks 100:500:100 --max-prompts 8 --store stores/default
    """
    from analyze import plots
    from extract.layers import parse_layers

    options = _options(locals(), "layers", "sae", "embedding", "epochs", "lr", "fm_device", "plot", "model", "device",
                       "dtype", *EXECUTION)

    def settings(m):
        from analyze.stage3.fm import FmSettings

        fm = FmSettings.from_options(embedding=embedding, epochs=epochs, lr=lr, device=fm_device)
        return m.Stage3Settings.from_options(**options, saes=tuple(sae) or None, fm=fm)

    def run(m, s, loaded, built):
        chosen = parse_layers(layers, loaded.n_layers) if layers else built.layers
        return m.run(s, loaded, replace(built, layers=chosen), log=_log)
    stage_command("analyze.stage3", store, settings, run, model, device, dtype, workers=workers,
                  ray_address=ray_address, then=lambda m, s, r: [] if r.asr is None else [
        f"plot: {plots.stage3_plot(r, plot or Path(store) / 'plots' / f'stage3_{r.sweep_id}.png')}"])


@analyze_app.command("redundancy")
def analyze_redundancy(
    model: Optional[str] = ModelOpt,
    prune_id: Optional[str] = opt("--prune", "Prune analysis whose stage-2 sets are read (default: the newest)."),
    stage3_id: Optional[str] = opt("--stage3", "Stage-3 sets (sweep id) (default: the newest); none: skip them."),
    sae: list[str] = SaeOpt,
    clamp_values: Optional[str] = opt("--clamp-values", "Values the switched-on features are clamped to."),
    clamp_positions: Optional[str] = opt("--clamp-positions", "Prompt positions clamped (0: the first token)."),
    max_prompts: Optional[int] = MaxPromptsOpt,
    judge: Optional[str] = JudgeOpt, generate: Optional[int] = GenerateOpt, batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Dormant ("hydra") features of the stage-2 sets, their switch-on by token role, clamping, stage-3 links.

    Example: python cli.py analyze redundancy --max-prompts 16 --store stores/default
    """
    options = _options(locals(), "sae")
    _stage("analyze.redundancy", "RedundancySettings", {**options, "saes": tuple(sae) or None}, store)


@analyze_app.command("controls")
def analyze_controls(
    model: Optional[str] = ModelOpt,
    prune_id: Optional[str] = opt("--prune", "Prune analysis whose prompts and SAEs are used (default: the newest)."),
    ks: Optional[str] = opt("--ks", "Ablate the features active on >= k of a prompt's tokens, for each k."),
    roles: Optional[str] = opt("--roles", "Token roles counted (first, template, user, post_instruction)."),
    population: Optional[str] = opt("--population", "Prompts: refused (every prompt stage 1 took from its evaluation "
                                    "split) or stage2 (only those stage 1 broke)."),
    max_prompts: Optional[int] = MaxPromptsOpt,
    judge: Optional[str] = opt("--judge", "Judge (default: the prune analysis' judge)."),
    generate: Optional[int] = opt("--generate", "Completion tokens (default: the prune analysis' value)."),
    batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """O'Brien et al. baseline: ablate every SAE feature active on >= k prompt tokens; ASR per k beside the random controls.

    Example: python cli.py analyze controls --ks 1,2,3,4,5,8 --store stores/default
    """
    _stage("analyze.controls", "ControlsSettings", _options(locals()), store)


@analyze_app.command("transfer")
def analyze_transfer(
    model: Optional[str] = ModelOpt,
    dataset: Optional[str] = opt("--dataset", "Held-out harmful prompt set (name or file)."),
    split: Optional[str] = opt("--split", "train, val, test or all."),
    limit: Optional[int] = opt("--limit", "At most N prompts of the split (seeded order)."),
    seed: Optional[int] = opt("--seed", "Seed of the dataset's order and of the random controls."),
    direction_id: Optional[str] = opt("--direction", "Direction analysis id (default: the newest)."),
    prune_id: Optional[str] = opt("--prune", "Prune analysis whose stage-2 sets are applied (default: the newest)."),
    core_share: Optional[float] = opt("--core-share", "Shared core: features in at least this share of the sets."),
    n_alpaca: Optional[int] = opt("--n-alpaca", "Alpaca test prompts for CE (0: skip)."),
    judge: Optional[str] = opt("--judge", "Judge (default: the prune analysis' judge)."),
    generate: Optional[int] = opt("--generate", "Completion tokens (default: the prune analysis' value)."),
    batch_size: Optional[int] = BatchOpt,
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """Apply the direction, the stage-2 union and shared core and the stage-3 features to held-out harmful prompts.

    Example: python cli.py analyze transfer --dataset harmbench --limit 100 --store stores/default
    """
    _stage("analyze.transfer", "TransferSettings", _options(locals()), store)


@analyze_app.command("costs")
def analyze_costs(
    model: Optional[str] = ModelOpt, sae: list[str] = SaeOpt,
    n_alpaca: Optional[int] = opt("--n-alpaca", "Alpaca test-split prompts (CE over their instruction tokens)."),
    n_text: Optional[int] = opt("--n-text", "WikiText-2 eval windows (CE over raw text)."),
    window: Optional[int] = opt("--window", "Tokens per WikiText-2 window."),
    n_xstest: Optional[int] = opt("--n-xstest", "XSTest safe prompts for over-refusal (0: skip)."),
    stage: Optional[int] = opt("--stage", "Ablate the store's per-prompt feature sets of this stage."),
    max_prompts: Optional[int] = opt("--max-prompts", "At most N feature sets, the first by prompt id (default: all)."),
    conditions: Optional[str] = opt("--conditions", "Subset of baseline, direction_ablation, feature_ablation."),
    judge: Optional[str] = JudgeOpt, generate: Optional[int] = GenerateOpt, batch_size: Optional[int] = BatchOpt,
    seed: Optional[int] = opt("--seed", "Seed of the samples."),
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """CE loss on Alpaca and WikiText-2 and over-refusal on XSTest, unmodified vs direction vs feature ablation.

    Example: python cli.py analyze costs --max-prompts 8 --store stores/default
    """
    options = _options(locals(), "sae", "model", "device", "dtype", *EXECUTION)

    def run(m, s, loaded, built):
        from extract.saes import resolve_saes

        saes = resolve_saes(s, loaded, tuple(sae), "") if "feature_ablation" in built.conditions else []
        return m.run(s, loaded, saes, built, log=_log)
    stage_command("analyze.costs", store, lambda m: m.CostsSettings.from_options(**options), run, model, device, dtype,
                  workers=workers, ray_address=ray_address)


@analyze_app.command("taxonomy")
def analyze_taxonomy(
    explanations: Optional[Path] = opt("--explanations", "Import feature explanations first (CSV/JSON/JSONL: "
                                       "layer, feature or index, explanation or description)."),
    level: Optional[str] = opt("--level", "category or subcategory."),
    subset: Optional[str] = opt("--subset", "unsafe (CoCoNot's unsafe requests, as the paper's Fig. 3) or all."),
    min_prompts: Optional[int] = opt("--min-prompts", "A feature belongs to a category when it fires on >= N of its prompts."),
    features: Optional[str] = opt("--features", "sets (the store's feature sets) or all."), store: str = StoreOpt,
) -> None:
    """Map features to CoCoNot categories by where they fire (paper Fig. 3); optionally import explanations.

    Example: python cli.py analyze taxonomy --features all --explanations neuronpedia_export.json --store stores/default
    """
    def run(m, s, _, built):
        if explanations is not None:
            _log(f"imported {m.import_explanations(s, explanations)} explanations from {explanations}")
        return m.run(s, built)
    stage_command("analyze.taxonomy", store, lambda m: m.TaxonomySettings.from_options(
        level=level, subset=subset, min_prompts=min_prompts, features=features), run, needs_model=False)
