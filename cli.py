"""refusalscope command line: a thin layer over the library; errors become one line and exit 2."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from store.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Why does a chat model refuse? An activation store plus the analyses of "
                       "arXiv 2509.09708 over it.")

sae_app = typer.Typer(no_args_is_help=True, help="Sparse autoencoders: train the model's own SAEs.")
analyze_app = typer.Typer(no_args_is_help=True, help="The paper's analysis stages over a store.")
app.add_typer(sae_app, name="sae")
app.add_typer(analyze_app, name="analyze")

DEFAULT_STORE = "stores/default"
StoreOpt = typer.Option(DEFAULT_STORE, "--store", help="Store directory (created when missing).")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user mistake into one `error:` line on stderr and exit code 2."""
    try:
        yield
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume from the last written chunk", err=True)
        raise typer.Exit(130)


@app.command()
def extract(
    model: str = typer.Option("qwen-coder-0.5b", "--model", help="Registry name, HF id, .gguf file or HF directory."),
    dataset: list[str] = typer.Option(["advbench", "alpaca"], "--dataset", help="Dataset name or CSV/JSONL path; repeatable."),
    limit: Optional[int] = typer.Option(64, "--limit", help="At most N prompts per dataset (the same ones for the same seed); 0 = all."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt order and the 80/10/10 split."),
    layers: str = typer.Option("all", "--layers", help="Residual layers to store: all, none, 2-16 or 3,7,12."),
    positions: str = typer.Option("all", "--positions", help="Token positions that get rows: all or last:N."),
    sae: list[str] = typer.Option([], "--sae", help="LAYER=SOURCE (SAE directory or sae-lens release:id); repeatable. "
                                                   "Default: the store's trained SAEs for this model."),
    sae_layers: str = typer.Option("", "--sae-layers", help="Layers to encode with the model's default SAEs: 2-16, all."),
    intervention: Optional[Path] = typer.Option(None, "--intervention", help="Intervention spec (JSON file)."),
    generate: int = typer.Option(0, "--generate", help="Greedy completion length in tokens (0: none)."),
    save_logits: bool = typer.Option(False, "--save-logits", help="Store last-position logits (float16) in Zarr."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)."),
    store: str = StoreOpt,
) -> None:
    """Run prompts through a model and store residuals, SAE activations, P("I") and completions.

    Example: python cli.py extract --model qwen-coder-0.5b --dataset advbench --dataset alpaca --limit 32 --generate 32
    """
    from extract.pipeline import ExtractRequest, run_extract

    with user_errors():
        request = ExtractRequest(
            model=model, datasets=tuple(dataset), limit=limit or None, seed=seed, layers=layers,
            positions=positions, saes=tuple(sae), sae_layers=sae_layers, intervention=intervention,
            generate=generate, save_logits=save_logits, batch_size=batch_size, device=device, dtype=dtype, store=store,
        )
        summary = run_extract(request, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(summary)


@app.command()
def sql(
    query: Optional[str] = typer.Argument(None, help="A DuckDB SQL query over the catalog."),
    named: Optional[str] = typer.Option(None, "--named", help="Run a named query from queries/ instead."),
    fmt: str = typer.Option("table", "--format", help="table, csv, json or parquet."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result to this file."),
    store: str = StoreOpt,
) -> None:
    """Run read-only SQL over a store's catalog (tables: prompts, runs, tokens, sae_acts, ...).

    Example: python cli.py sql "SELECT layer, count(*) FROM sae_acts GROUP BY layer" --store stores/default
    """
    from queries.run import format_result, run_query

    with user_errors():
        df = run_query(store, query, named)
        text = format_result(df, fmt, out)
    if text:
        typer.echo(text)


# ---- sae (issue 4) ------------------------------------------------------------------------

# ---- analyze direction | candidates | prune (issue 5) ---------------------------------------

ModelOpt = typer.Option("qwen-coder-0.5b", "--model", help="Registry name, HF id, .gguf file or HF directory.")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
DtypeOpt = typer.Option(None, "--dtype", help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu).")
JudgeOpt = typer.Option("content", "--judge", help="content (refusal/compliance/evasive), phrase, p_i[@T], "
                                                   "harmbench or llamaguard (GPU + weights).")
GenerateOpt = typer.Option(64, "--generate", help="Greedy completion tokens for judges that read completions.")


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _analysis_model(model: str, device: Optional[str], dtype: Optional[str]):
    from extract.models import load_model

    _log(f"loading {model} ...")
    return load_model(model, device=device, dtype=dtype)


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _csv_numbers(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list, got {text!r}") from None



# ---- issue 4: the project's own SAEs ---------------------------------------------------------

@sae_app.command("train")
def sae_train(
    model: str = ModelOpt,
    layers: str = typer.Option("", "--layers", help="Layers to train (2-16, 3,7,12); default: 2 .. 2/3 of the depth."),
    width: Optional[int] = typer.Option(None, "--width", help="Latents per SAE. [default: 4096]"),
    k: Optional[int] = typer.Option(None, "--k", help="Active latents per token (TopK, BatchTopK). [default: 32]"),
    architecture: Optional[str] = typer.Option(None, "--architecture", help="topk, batchtopk or jumprelu. [default: topk]"),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Training rows per layer. [default: 100000; --quick 24000]"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the training rows. [default: 2; --quick 1]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (cosine decay to lr/10). [default: 3e-3]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data order and initialisation. [default: 0]"),
    quick: bool = typer.Option(False, "--quick", help="The CI profile: fewer tokens, one epoch, fewer held-out windows."),
    device: Optional[str] = DeviceOpt,
    store: str = StoreOpt,
) -> None:
    """Train one SAE per layer on the store's residuals (sae-lens), measure FVU, L0, dead latents, spliced-in CE.

    Activations come from cached extraction runs over WikiText-2 (train part) and the shipped
    prompt sets' train split; position 0 and other massive-norm rows are excluded from training
    and measured separately. Each SAE is saved in sae-lens's format under STORE/saes and registered
    in `saes`, so later extractions and analyses use it by default. Rerunning reuses finished layers.

    Example: python cli.py sae train --model qwen-coder-0.5b --quick --layers 2-16 --store stores/default
    """
    import time

    from extract import sae_train as st
    from extract.models import load_model
    from extract.pipeline import parse_layers
    from store import Store

    with user_errors():
        t0 = time.perf_counter()
        the_store = Store.create(store)
        _log(f"loading {model} ...")
        loaded = load_model(model, device=device)
        chosen = parse_layers(layers, loaded.n_layers) if layers else st.default_layers(loaded.n_layers)
        settings = st.settings_with_profile(quick, layers=chosen, width=width, k=k, architecture=architecture,
                                            tokens=tokens, epochs=epochs, lr=lr, seed=seed)
        results = st.train_saes(the_store, loaded, settings, log=_log)
    typer.echo(f"SAEs for {loaded.name} ({settings.architecture}, width {settings.width}, k {settings.k}, "
               f"settings {settings.settings_hash()}), held-out WikiText-2, ordinary positions:")
    typer.echo(f"{'layer':>5} {'FVU':>6} {'L0':>6} {'dead':>6} {'dCE':>7} {'dCE0':>7} {'ratio':>6} "
               f"{'massive':>8} {'rows':>7}")
    for r in results:
        m = r.metrics
        typer.echo(f"{r.layer:>5} {m['fvu']:>6.3f} {m['l0']:>6.1f} {m['dead_frac']:>6.1%} {m['ce_increase']:>7.3f} "
                   f"{m['ce_zero_increase']:>7.3f} {m['ce_ratio']:>6.3f} {m['massive_rel_err']:>8.3f} "
                   f"{m['n_train_rows']:>7}{'  (reused)' if r.reused else ''}")
    typer.echo("dCE: loss increase with the reconstruction spliced in; dCE0: with zero-ablation; massive: "
               "relative error on position-0 / massive-norm rows (excluded from training)")
    typer.echo(f"done in {time.perf_counter() - t0:.0f} s; SAEs under {Path(store) / 'saes'}")

@analyze_app.command("direction")
def analyze_direction(
    model: str = ModelOpt,
    harmful: str = typer.Option("advbench", "--harmful", help="Harmful prompt set (name or file)."),
    harmless: str = typer.Option("alpaca", "--harmless", help="Harmless prompt set (name or file)."),
    n_train: int = typer.Option(64, "--n-train", help="Train-split prompts per set for the difference in means."),
    n_val: int = typer.Option(32, "--n-val", help="Val-split prompts per set for ASR, KL and controls."),
    seed: int = typer.Option(0, "--seed", help="Seed of the datasets' order and split, and of the random directions."),
    layers: str = typer.Option("", "--layers", help="Candidate layers for l* (2-16, 3,7,12); default: the first 80%."),
    judge: str = JudgeOpt,
    generate: int = GenerateOpt,
    n_random: int = typer.Option(3, "--n-random", help="Random unit directions in each control."),
    add_scale: Optional[float] = typer.Option(None, "--add-scale", help="direction_add scale (default: |diff in means| at l*)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Directory for the PNG plots (default: STORE/plots)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """Refusal direction per layer (difference in means), its ablation ASR on held-out prompts, l*, controls, plots.

    Example: python cli.py analyze direction --n-train 64 --n-val 32 --store stores/default
    """
    from analyze import direction, plots as plotting
    from extract.pipeline import parse_layers
    from store import Store

    with user_errors():
        the_store = Store.create(store)
        loaded = _analysis_model(model, device, dtype)
        settings = direction.DirectionSettings(
            harmful=harmful, harmless=harmless, n_train=n_train, n_val=n_val, seed=seed,
            layers=parse_layers(layers, loaded.n_layers) if layers else (), judge=judge, generate=generate,
            n_random=n_random, add_scale=add_scale, batch_size=batch_size)
        result = direction.run(the_store, loaded, settings, log=_log)
        files = plotting.direction_plots(the_store, result.direction_id, plots or Path(store) / "plots")
    c = result.controls
    typer.echo(f"direction {result.direction_id}: l* = {result.layer}  (judge {result.judge}; "
               f"{c['n_refused']}/{c['n_val_harmful']} val harmful prompts refused)")
    typer.echo(f"{'layer':>5} {'|r|':>8} {'ASR':>5} {'phrase':>6} {'P(I)':>6} {'KL':>6} {'cos_h':>6} {'cos_b':>6}")
    for row in result.layers.iter_rows(named=True):
        typer.echo(f"{row['layer']:>5} {row['raw_norm']:>8.2f} {_fmt(row['asr']):>5} {_fmt(row['asr_phrase']):>6} "
                   f"{_fmt(row['mean_p_i'], '.3f'):>6} {_fmt(row['kl_harmless']):>6} {row['cos_harmful']:>6.3f} "
                   f"{row['cos_benign']:>6.3f}{'  <- l*' if row['selected'] else ''}")
    listed = lambda xs: " ".join(_fmt(x) for x in xs) or "-"  # noqa: E731
    typer.echo(f"ablation at every layer, {c['n_refused']} refused val prompts: r_l* ASR {_fmt(c['asr'])} "
               f"(phrase judge {_fmt(c['asr_phrase'])}); random directions ASR {listed(c['random_ablation_asr'])} "
               f"(phrase {listed(c['random_ablation_asr_phrase'])})")
    typer.echo(f"adding at layer {result.layer} (scale {c['add_scale']:.2f}), {c['n_val_benign']} harmless val prompts: "
               f"refusal r_l* {_fmt(c['add_refusal'])} (phrase {_fmt(c['add_refusal_phrase'])}), "
               f"random {listed(c['random_add_refusal'])}, none {_fmt(c['baseline_benign_refusal'])}")
    for file in files:
        typer.echo(f"plot: {file}")


@analyze_app.command("candidates")
def analyze_candidates(
    model: str = ModelOpt,
    direction_id: Optional[str] = typer.Option(None, "--direction", help="Direction analysis id (default: the newest)."),
    sae: list[str] = typer.Option([], "--sae", help="LAYER=SOURCE; repeatable. Default: the store's trained SAEs."),
    sae_store: Optional[str] = typer.Option(None, "--sae-store", help="Use the trained SAEs of another store."),
    exclude_layers: str = typer.Option("0,1", "--exclude-layers", help="SAE layers left out of the candidates."),
    dataset: str = typer.Option("advbench", "--dataset", help="Harmful prompt set (name or file)."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    n_prompts: int = typer.Option(32, "--n-prompts", help="Prompts taken from the split (only refused ones are swept)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dataset's order and split."),
    k_max: int = typer.Option(200, "--k-max", help="Largest K (latents per layer)."),
    k_step: int = typer.Option(10, "--k-step", help="K = k_step, 2 k_step, ... k_max."),
    ks_per_round: int = typer.Option(5, "--ks-per-round", help="Values of K per batched run."),
    judge: str = JudgeOpt,
    generate: int = GenerateOpt,
    batch_size: int = typer.Option(16, "--batch-size", help="Rows per forward pass."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """Stage 1: per refused prompt, the smallest K whose top-K latents per layer by cos(r, W_dec) jailbreak it.

    Example: python cli.py analyze candidates --n-prompts 16 --sae-store stores/saes --store stores/default
    """
    from analyze import candidates
    from analyze.common import sae_specs_from_store
    from store import Store

    with user_errors():
        the_store = Store.create(store)
        loaded = _analysis_model(model, device, dtype)
        saes = tuple(sae) + (sae_specs_from_store(sae_store, loaded.name) if sae_store else ())
        settings = candidates.CandidateSettings(
            direction_id=direction_id, saes=saes, exclude_layers=_csv_numbers(exclude_layers, int, "--exclude-layers"),
            dataset=dataset, split=split, n_prompts=n_prompts, seed=seed,
            ks=tuple(range(k_step, k_max + 1, k_step)) if k_step > 0 else (), ks_per_round=ks_per_round,
            judge=judge, generate=generate, batch_size=batch_size)
        result = candidates.run(the_store, loaded, settings, log=_log)
    m = result.metrics
    typer.echo(f"candidates {result.candidates_id} (direction {result.direction_id}, l* = {result.layer}, "
               f"SAE layers {m['sae_layers'][0]}..{m['sae_layers'][-1]}): {m['n_refused']}/{m['n_prompts']} refused, "
               f"{m['n_jailbroken']} jailbroken at some K <= {settings.ks[-1]}")
    for row in result.prompts.iter_rows(named=True):
        k = f"K={row['k']:<4} ({row['n_features']} latents) P(I) {row['p_i_clean']:.3f} -> {row['p_i_at_k']:.3f}" \
            if row["k"] is not None else f"{'not jailbroken' if row['clean_verdict'] == 'refusal' else 'not refused':<28} " \
            f"P(I) {row['p_i_clean']:.3f}"
        typer.echo(f"  {k}  {row['text'][:60]}")


@analyze_app.command("prune")
def analyze_prune(
    model: str = ModelOpt,
    candidates_id: Optional[str] = typer.Option(None, "--candidates", help="Candidates analysis id (default: the newest)."),
    block_size: int = typer.Option(5, "--block-size", help="N: features per block."),
    taus: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", "--taus", help="Thresholds on delta P(\"I\")."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds of the block order; features kept under all count."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="Prune at most N stage-1 prompts."),
    pool: str = typer.Option("candidates", "--pool", help="candidates (C_K) or active (C_K ∩ latents active on the prompt)."),
    judge: str = JudgeOpt,
    generate: int = GenerateOpt,
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per forward pass in the lockstep runs."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """Stage 2: Algorithm 1 (blocks of N, keep if delta P("I") >= tau) in lockstep, minimal sets, jailbreak table.

    Example: python cli.py analyze prune --max-prompts 16 --store stores/default
    """
    from analyze import prune
    from store import Store

    with user_errors():
        the_store = Store.create(store)
        loaded = _analysis_model(model, device, dtype)
        settings = prune.PruneSettings(
            candidates_id=candidates_id, block_size=block_size, taus=_csv_numbers(taus, float, "--taus"),
            seeds=_csv_numbers(seeds, int, "--seeds"), max_prompts=max_prompts, pool=pool, judge=judge,
            generate=generate, batch_size=batch_size)
        result = prune.run(the_store, loaded, settings, log=_log)
    s = result.summary
    typer.echo(f"prune {result.prune_id} (candidates {result.candidates_id}): {s['n_steps']} lockstep steps, "
               f"{s['n_evaluations']} evaluations in {s['n_forward_items']} forward rows, "
               f"{s['seconds_pruning']:.0f} s ({s['seconds_per_prompt']:.1f} s per prompt; {s['seconds_total']:.0f} s with checks)")
    typer.echo(f"{'tau':>5} {'jailbroken':>10} {'features':>8}")
    for row in result.per_tau.iter_rows(named=True):
        typer.echo(f"{row['tau']:>5.1f} {row['n_jailbroken']:>6}/{row['n_prompts']:<3} {row['mean_features']:>8.1f}")
    typer.echo(f"minimal sets (largest tau that jailbreaks): {s['n_jailbroken']}/{s['n_prompts']} prompts jailbroken; "
               f"random active features of equal size: {s['n_random_jailbroken']}/{s['n_prompts']}")
    typer.echo(f"unique features {s['n_unique_features']}, features per prompt {_fmt(s['features_per_prompt'], '.1f')}, "
               f"per layer " + (" ".join(f"{k}:{v}" for k, v in s["per_layer_unique"].items()) or "-"))


# ---- analyze fm (issue 6) -------------------------------------------------------------------

@analyze_app.command("fm")
def analyze_fm(
    model: str = ModelOpt,
    prune_id: Optional[str] = typer.Option(None, "--prune", help="Prune analysis whose stage-2 sets are swept (default: the newest)."),
    layers: str = typer.Option("", "--layers", help="FM input layers (2-12, 3,7,12); default: 2..l* of the direction behind --prune."),
    sae: list[str] = typer.Option([], "--sae", help="LAYER=SOURCE; repeatable. Default: the candidates analysis' SAEs."),
    limit: int = typer.Option(520, "--limit", help="AdvBench and Alpaca prompts each (seeded; splits as stored)."),
    embedding: int = typer.Option(20, "--embedding", help="FM embedding size k (paper: 20; 5 and 50 as diagnostics)."),
    epochs: int = typer.Option(20, "--epochs", help="FM epochs; the best validation epoch is kept."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    diagnostics: str = typer.Option("5,20,50", "--diagnostic-embeddings", help="Embedding sizes for the similarity diagnostic."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Run the ablation sweep (needs stage-2 sets)."),
    k_max: int = typer.Option(2000, "--k-max", help="Largest K (FM-ranked latents ablated with the stage-2 set)."),
    k_step: int = typer.Option(100, "--k-step", help="K = k_step, 2 k_step, ... k_max."),
    probe_ks: str = typer.Option("100,500,1000,2000", "--probe-ks", help="K values for the probe-ranked sweep."),
    aggregate: str = typer.Option("max", "--aggregate", help="FM score over a prompt's stage-2 set: max or mean cosine."),
    max_prompts: int = typer.Option(0, "--max-prompts", help="Sweep at most N stage-2 prompts (0: all)."),
    judge: str = JudgeOpt,
    generate: int = GenerateOpt,
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    fm_device: str = typer.Option("auto", "--fm-device", help="Where the FM trains: auto (cuda if available), cpu, cuda."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of ASR per K (default: STORE/plots/stage3_<sweep>.png)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """Stage 3: factorization machine vs linear probe on SAE activations, and the top-K ablation sweep.

    Example: python cli.py analyze fm --layers 2-12 --k-max 500 --max-prompts 8 --store stores/default
    """
    from analyze import stage3
    from analyze.fm import FmSettings
    from extract.pipeline import parse_layers
    from store import Store

    with user_errors():
        the_store = Store.create(store)
        loaded = _analysis_model(model, device, dtype)
        settings = stage3.Stage3Settings(
            prune_id=prune_id, layers=parse_layers(layers, loaded.n_layers) if layers else (), saes=tuple(sae),
            limit=limit, fm=FmSettings(embedding=embedding, epochs=epochs, lr=lr, device=fm_device),
            diagnostic_embeddings=_csv_numbers(diagnostics, int, "--diagnostic-embeddings"), sweep=sweep,
            ks=tuple(range(k_step, k_max + 1, k_step)) if k_step > 0 else (),
            probe_ks=_csv_numbers(probe_ks, int, "--probe-ks"), aggregate=aggregate, max_prompts=max_prompts,
            judge=judge, generate=generate, batch_size=batch_size)
        result = stage3.run(the_store, loaded, settings, log=_log)
        png = None
        if result.asr is not None:
            png = plot or Path(store) / "plots" / f"stage3_{result.sweep_id}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            stage3.plot_asr(result.asr, png, title=f"Stage 3 on {loaded.name}: FM vs probe")
    n = result.n_prompts
    acc = lambda a: f"test {a['test']:.3f} (train {a['train']:.3f}, val {a['val']:.3f})"  # noqa: E731
    typer.echo(f"FM data: layers {result.layers[0]}..{result.layers[-1]}, {result.n_features} latents, "
               f"prompts train {n['train']} / val {n['val']} / test {n['test']}")
    typer.echo(f"FM    {result.fm_model_id}  k={embedding}: accuracy {acc(result.fm_accuracy)}")
    typer.echo(f"probe {result.probe_model_id}  C={result.probe_C:g}: accuracy {acc(result.probe_accuracy)}")
    typer.echo(f"{'k':>4} {'test acc':>8} {'mean cos':>8} {'epoch':>5}")
    for row in result.similarity.iter_rows(named=True):
        typer.echo(f"{row['embedding']:>4} {row['test_acc']:>8.3f} {row['mean_cosine']:>8.3f} {row['best_epoch']:>5}")
    if result.asr is None:
        return
    typer.echo(f"sweep {result.sweep_id} (judge {result.judge}): {result.n_swept} stage-2 prompts swept, "
               f"{result.n_skipped} skipped (no stage-2 latent among the FM's columns)")
    typer.echo(f"{'K':>5} {'stage2':>6} {'FM':>6} {'probe':>6}")
    for row in stage3.asr_table(result.asr).iter_rows(named=True):
        typer.echo(f"{row['k']:>5} {_fmt(row.get('stage2')):>6} {_fmt(row.get('fm')):>6} {_fmt(row.get('probe')):>6}")
    typer.echo(f"stage-3 sets (FM top-K at the smallest K that jailbreaks): {result.n_stage3_sets} prompts")
    typer.echo(f"plot: {png}")


# ---- analyze redundancy (issue 7) -----------------------------------------------------------

@analyze_app.command("redundancy")
def analyze_redundancy(
    model: str = ModelOpt,
    prune_id: Optional[str] = typer.Option(None, "--prune", help="Prune analysis whose stage-2 sets are read (default: the newest)."),
    stage3_id: Optional[str] = typer.Option(None, "--stage3", help="Stage-3 sets (sweep id; default: the newest); none: skip item 5."),
    sae: list[str] = typer.Option([], "--sae", help="LAYER=SOURCE over the SAEs the stage-2 checks ran with; repeatable."),
    clamp_values: str = typer.Option("2,4,6,8,10", "--clamp-values", help="Values the switched-on features are clamped to."),
    clamp_positions: str = typer.Option("0", "--clamp-positions", help="Prompt positions clamped (0: the first token)."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="At most N stage-2 prompts (by prompt id)."),
    judge: str = JudgeOpt,
    generate: int = GenerateOpt,
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward pass."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """Dormant ("hydra") features of the stage-2 sets, their switch-on by token role, clamping, stage-3 links.

    Example: python cli.py analyze redundancy --max-prompts 16 --store stores/default
    """
    from analyze import redundancy
    from store import Store

    with user_errors():
        the_store = Store.create(store)
        settings = redundancy.RedundancySettings(
            prune_id=prune_id, stage3_id=stage3_id, saes=tuple(sae),
            clamp_values=_csv_numbers(clamp_values, float, "--clamp-values"),
            clamp_positions=_csv_numbers(clamp_positions, int, "--clamp-positions"), max_prompts=max_prompts,
            judge=judge, generate=generate, batch_size=batch_size)
        loaded = _analysis_model(model, device, dtype)
        result = redundancy.run(the_store, loaded, settings, log=_log)
    typer.echo(redundancy.summary(result))
    clamped = result.tables["redundancy_clamping"]
    for (text,), rows in clamped.group_by("text", maintain_order=True) if clamped.height else ():
        typer.echo(f"clamped on {text!r}:")
        for value, verdict, completion in rows.select("value", "verdict", "completion").iter_rows():
            typer.echo(f"  {'none' if value is None else format(value, 'g'):>5}  {verdict:<10}  "
                       f"{' '.join((completion or '').split())[:90]}")


# ---- controls, costs, taxonomy, feature, report, run (issue 8) ------------------------------

def _print_frame(df) -> None:
    import polars as pl

    with pl.Config(tbl_rows=60, tbl_cols=14, fmt_str_lengths=70, tbl_hide_dataframe_shape=True,
                   tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True):
        typer.echo(str(df))


@analyze_app.command("controls")
def analyze_controls(
    model: str = ModelOpt,
    prune_id: Optional[str] = typer.Option(None, "--prune", help="Prune analysis whose prompts and SAEs are used (default: the newest)."),
    ks: str = typer.Option("1,2,3,4,5,8", "--ks", help="Ablate the features active on >= k of a prompt's tokens, for each k."),
    roles: str = typer.Option("user,post_instruction", "--roles", help="Token roles counted (first, template, user, post_instruction)."),
    max_prompts: Optional[int] = typer.Option(None, "--max-prompts", help="At most N stage-2 prompts (by prompt id)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Judge (content, phrase, p_i[@T], ...); default: the prune analysis' judge."),
    generate: Optional[int] = typer.Option(None, "--generate", help="Completion tokens; default: the prune analysis' value."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows per forward pass."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """O'Brien et al. baseline: ablate every SAE feature active on >= k prompt tokens; ASR per k beside the random control.

    Example: python cli.py analyze controls --ks 1,2,3,4,5,8 --store stores/default
    """
    from analyze import controls
    from store import Store

    with user_errors():
        the_store = Store.open(store, read_only=False)
        settings = controls.ControlsSettings(
            prune_id=prune_id, ks=_csv_numbers(ks, int, "--ks"), roles=_csv_numbers(roles, str, "--roles"),
            max_prompts=max_prompts, judge=judge, generate=generate, batch_size=batch_size)
        loaded = _analysis_model(model, device, dtype)
        result = controls.run(the_store, loaded, settings, log=_log)
    s = result.summary
    typer.echo(f"controls {result.controls_id} (prune {result.prune_id}, judge {result.judge}): {s['n_prompts']} "
               f"stage-2 prompts, {s['n_refused']} refused without intervention (the ASR denominator)")
    typer.echo(f"O'Brien et al.: features active on >= k {'+'.join(s['roles'])} tokens, zero-ablated together")
    typer.echo(f"{'k':>4} {'features':>9} {'ASR':>5}")
    for row in s["per_k"]:
        typer.echo(f"{row['k']:>4} {_fmt(row['mean_features'], '.1f'):>9} {_fmt(row['asr']):>5}  "
                   f"({row['n_jailbroken']}/{row['n_prompts']})")
    for kind, what in (("stage2", "stage-2 selected sets"), ("random", "random control (as many active features)")):
        c = s[kind]
        typer.echo(f"{what}: " + (f"ASR {_fmt(c['asr'])} ({c['n_jailbroken']}/{c['n_prompts']}), "
                                  f"{_fmt(c['mean_features'], '.1f')} features per prompt" if c else
                                  "no rows in set_checks"))


@analyze_app.command("costs")
def analyze_costs(
    model: str = ModelOpt,
    sae: list[str] = typer.Option([], "--sae", help="LAYER=SOURCE for the feature sets' layers; repeatable. "
                                                   "Default: the store's trained SAEs."),
    n_alpaca: int = typer.Option(100, "--n-alpaca", help="Alpaca test-split prompts (CE over their instruction tokens)."),
    n_text: int = typer.Option(100, "--n-text", help="WikiText-2 eval windows (CE over raw text)."),
    window: int = typer.Option(128, "--window", help="Tokens per WikiText-2 window."),
    n_xstest: int = typer.Option(250, "--n-xstest", help="XSTest safe prompts for over-refusal (0: skip)."),
    stage: int = typer.Option(2, "--stage", help="Ablate the store's per-prompt feature sets of this stage."),
    max_sets: int = typer.Option(0, "--max-sets", help="At most N feature sets (by prompt id); 0 = all."),
    conditions: str = typer.Option("baseline,direction_ablation,feature_ablation", "--conditions",
                                   help="Comma-separated subset of baseline, direction_ablation, feature_ablation."),
    judge: str = JudgeOpt,
    generate: int = GenerateOpt,
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per forward (the loss keeps logits at every position)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the samples."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """CE loss on Alpaca and WikiText-2 and over-refusal on XSTest, unmodified vs direction vs feature ablation.

    Example: python cli.py analyze costs --max-sets 8 --store stores/default
    """
    from analyze import costs
    from extract.pipeline import resolve_saes
    from store import Store

    with user_errors():
        the_store = Store.create(store)
        settings = costs.CostsSettings(
            n_alpaca=n_alpaca, n_text=n_text, window=window, n_xstest=n_xstest, generate=generate, judge=judge,
            stage=stage, max_sets=max_sets, conditions=_csv_numbers(conditions, str, "--conditions"),
            batch_size=batch_size, seed=seed)
        loaded = _analysis_model(model, device, dtype)
        saes = resolve_saes(the_store, loaded, tuple(sae), "") if "feature_ablation" in settings.conditions else []
        result = costs.run(the_store, loaded, saes, settings, log=_log)
    typer.echo(f"costs {result.costs_id} ({model}; CE in nats per token)")
    _print_frame(costs.costs_table(result))
    for condition, why in result.skipped.items():
        typer.echo(f"skipped {condition}: {why}")


@analyze_app.command("taxonomy")
def analyze_taxonomy(
    explanations: Optional[Path] = typer.Option(None, "--explanations", help="Import feature explanations first "
                                                "(CSV/JSON/JSONL: layer, feature or index, explanation or description)."),
    level: str = typer.Option("category", "--level", help="category or subcategory."),
    min_prompts: int = typer.Option(1, "--min-prompts", help="A feature belongs to a category when it fires on >= N of its prompts."),
    features: str = typer.Option("sets", "--features", help="sets (the store's feature sets) or all."),
    store: str = StoreOpt,
) -> None:
    """Map features to CoCoNot categories by where they fire (paper Fig. 3); optionally import explanations.

    Example: python cli.py analyze taxonomy --features all --explanations neuronpedia_export.json --store stores/default
    """
    from analyze import taxonomy
    from store import Store

    with user_errors():
        the_store = Store.open(store, read_only=False)
        if explanations is not None:
            n = taxonomy.import_explanations(the_store, explanations)
            typer.echo(f"imported {n} explanations from {explanations}")
        result = taxonomy.run(the_store, taxonomy.TaxonomySettings(level=level, min_prompts=min_prompts, features=features))
    if result.mapping.is_empty():
        typer.echo("no feature fires on CoCoNot prompts; extract them with SAEs first: "
                   "python cli.py extract --dataset coconot --limit 0")
        return
    _print_frame(result.per_category)
    _print_frame(result.multi_category)
    _print_frame(result.mapping.head(40))


@app.command()
def feature(
    name: str = typer.Argument(..., metavar="LAYER:ID", help="The feature, e.g. 12:345."),
    contexts: int = typer.Option(10, "--contexts", help="Top-activating contexts shown."),
    window: int = typer.Option(8, "--window", help="Tokens shown on each side of the highlighted one."),
    store: str = StoreOpt,
) -> None:
    """Print a feature's card: top-activating contexts, density, datasets and categories, explanation.

    Example: python cli.py feature 12:345 --store stores/default
    """
    from analyze import cards
    from store import Store

    with user_errors():
        layer, index = cards.parse_feature(name)
        card = cards.card(Store.open(store, read_only=False), layer, index,
                          cards.CardSettings(n_contexts=contexts, window=window))
    typer.echo(cards.format_card(card))


@app.command()
def report(
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: STORE/report)."),
    cards: int = typer.Option(24, "--cards", help="Feature cards shown (most frequent features of the sets)."),
    store: str = StoreOpt,
) -> None:
    """Write the HTML report (self-contained) and its Markdown twin with every table and plot the store has.

    Example: python cli.py report --store stores/default --out reports/default
    """
    from analyze import report as report_module
    from store import Store

    with user_errors():
        settings = report_module.ReportSettings(out=str(out) if out else None, max_cards=cards)
        result = report_module.run(Store.open(store, read_only=False), settings)
    done = sum(status == "ok" for _, status in result.sections)
    typer.echo(f"{done} of {len(result.sections)} sections have results")
    for title, status in result.sections:
        if status != "ok":
            typer.echo(f"  {status}: {title}")
    typer.echo(f"report: {result.html}\nmarkdown: {result.markdown}")


@app.command("run")
def run_job(
    model: str = ModelOpt,
    quick: bool = typer.Option(False, "--quick", help="The quick profile (small numbers, aimed at under 15 minutes on 2 CPU cores) "
                                                     "instead of the paper's parameters."),
    settings_file: Optional[Path] = typer.Option(None, "--settings", help="Pipeline settings as JSON (a custom profile) "
                                                 "instead of --quick or the default."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: STORE/report)."),
    start: Optional[str] = typer.Option(None, "--from", help="Rerun from this stage on, even where done: saes, direction, "
                                        "candidates, prune, fm, redundancy, controls, costs, taxonomy, report."),
    only: Optional[str] = typer.Option(None, "--only", help="Run this stage alone (the stages before it must be done)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    store: str = StoreOpt,
) -> None:
    """The main job: SAEs, refusal direction, stages 1-3, redundancy, controls, costs, taxonomy, report; resumable.

    Example: python cli.py run --quick --model qwen-coder-0.5b --store stores/default
    """
    from dataclasses import replace

    from analyze import pipeline
    from store import Store

    with user_errors():
        if quick and settings_file:
            raise UsageError("give --quick or --settings, not both")
        pipeline.check_stage_options(start, only)
        the_store = Store.create(store)
        loaded = _analysis_model(model, device, dtype)
        if settings_file:
            settings = pipeline.load_settings(settings_file)
            settings = replace(settings, report=replace(settings.report, out=str(out))) if out else settings
        else:
            settings = pipeline.profile("quick" if quick else "default", loaded, out=out)
        result = pipeline.run(the_store, loaded, settings, log=_log, on_stage=typer.echo, start=start, only=only)
    if result.report is not None:
        typer.echo(f"report: {result.report}\nmarkdown: {result.markdown}")


if __name__ == "__main__":
    app()
