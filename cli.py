"""refusalscope command line: parse, call one library function, print its summary; errors are one line, exit 2.

Every option defaults to None, "the settings default": each default is stated once, in its settings
dataclass (or a profile under profiles/). `stage_command` opens the store before any model loads, so
a mistyped --store fails at once and creates nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from cli_analyze import analyze_app
from cli_support import (BatchOpt, DeviceOpt, DtypeOpt, ModelOpt, RayAddressOpt, SaeOpt, StoreOpt, WorkersOpt, _load_model,
                         _log, _open_store, opt, stage_command, user_errors, worker_settings)
from store.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Why does a chat model refuse? An activation store plus the analyses of "
                       "arXiv 2509.09708 over it.")
sae_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Sparse autoencoders: train the model's own SAEs.")
app.add_typer(sae_app, name="sae")
app.add_typer(analyze_app, name="analyze")
store_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The store itself: check its arrays against the catalog.")
app.add_typer(store_app, name="store")
judge_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Judges: how well each one agrees with labelled completions.")
app.add_typer(judge_app, name="judge")

@app.command()
def extract(
    model: Optional[str] = ModelOpt,
    dataset: list[str] = typer.Option([], "--dataset", help="Dataset name or CSV/JSONL path; repeatable (default: advbench, alpaca)."),
    limit: Optional[int] = opt("--limit", "At most N prompts per dataset (the same ones for the same seed); 0: all (default: 64)."),
    seed: Optional[int] = opt("--seed", "Seed of the prompt order and the 80/10/10 split."),
    layers: Optional[str] = opt("--layers", "Residual layers to store: all, none, 2-16, 3,7,12 or 5/12-5/8."),
    positions: Optional[str] = opt("--positions", "Token positions that get rows: all or last:N."),
    sae: list[str] = SaeOpt,
    sae_layers: Optional[str] = opt("--sae-layers", "Layers to encode with the model's default SAEs: 2-16, all."),
    intervention: Optional[Path] = opt("--intervention", "Intervention spec (JSON file)."),
    generate: Optional[int] = opt("--generate", "Greedy completion length in tokens (0: none)."),
    save_logits: Optional[bool] = opt("--save-logits/--no-save-logits", "Store last-position logits (float16) in Zarr."),
    batch_size: Optional[int] = BatchOpt, device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt, store: str = StoreOpt,
) -> None:
    """Run prompts through a model and store residuals, SAE activations, P("I") and completions.

    Example: python cli.py extract --model qwen-coder-0.5b --dataset advbench --dataset alpaca --limit 32 --generate 32
    """
    from extract import request

    with user_errors():
        req = request.ExtractRequest.from_options(
            model=model, datasets=tuple(dataset) or None, seed=seed, layers=layers, positions=positions,
            saes=tuple(sae) or None, sae_layers=sae_layers, intervention=str(intervention) if intervention else None,
            generate=generate, save_logits=save_logits, batch_size=batch_size, device=device, dtype=dtype,
            limit=limit or None)
        req = replace(req, limit=None) if limit == 0 else req            # --limit 0: every prompt
        summary = request.run_extract(store, req, log=_log, workers=worker_settings(workers, ray_address))
    typer.echo(request.summary_line(summary))
    for line in request.detail_lines(summary):
        typer.echo(line)


@app.command()
def sql(
    query: Optional[str] = typer.Argument(None, help="A DuckDB SQL query over the catalog."),
    named: Optional[str] = opt("--named", "Run a named query from queries/ instead."),
    fmt: str = opt("--format", "table, csv, json or parquet.", "table"),
    out: Optional[Path] = opt("--out", "Write the result to this file."), store: str = StoreOpt,
) -> None:
    """Run read-only SQL over a store's catalog (tables: prompts, runs, tokens, sae_acts, ...).

    Example: python cli.py sql "SELECT layer, count(*) FROM sae_acts GROUP BY layer" --store stores/default
    """
    from queries.run import format_result, run_query

    with user_errors():
        text = format_result(run_query(store, query, named), fmt, out)
    if text:
        typer.echo(text)


@sae_app.command("train")
def sae_train(
    model: Optional[str] = ModelOpt,
    layers: Optional[str] = opt("--layers", "Layers to train (2-16, 3,7,12, 5/12-5/8) (default: the profile's)."),
    width: Optional[int] = opt("--width", "Latents per SAE."),
    k: Optional[int] = opt("--k", "Active latents per token (TopK, BatchTopK)."),
    architecture: Optional[str] = opt("--architecture", "topk, batchtopk or jumprelu."),
    sparse: Optional[bool] = typer.Option(None, "--sparse-step/--dense-step", help=(
        "TopK: the step that gathers the k active latents (default), or sae-lens's dense step.")),
    tokens: Optional[int] = opt("--tokens", "Training rows per layer."),
    epochs: Optional[float] = opt("--epochs", "Passes over the training rows."),
    lr: Optional[float] = opt("--lr", "Adam learning rate (cosine decay to lr/10)."),
    seed: Optional[int] = opt("--seed", "Seed of data order and initialisation."),
    quick: bool = typer.Option(False, "--quick", help="The quick profile's SAE settings (profiles/quick.json)."),
    settings_file: Optional[Path] = opt("--settings", "A profile (JSON) whose `sae` section is used."),
    device: Optional[str] = DeviceOpt, store: str = StoreOpt,
) -> None:
    """Train one SAE per layer on the store's residuals (sae-lens), measure FVU, L0, dead latents, spliced-in CE.

    Activations come from cached extraction runs over WikiText-2 (train part) and the shipped
    prompt sets' train split; position 0 and other massive-norm rows are excluded from training
    and measured separately. Each SAE is saved in sae-lens's format under STORE/saes and registered
    in `saes`, so later extractions and analyses use it by default. Rerunning reuses finished layers.

    Example: python cli.py sae train --model qwen-coder-0.5b --quick --layers 2-16 --store stores/default
    """
    from analyze import pipeline
    from extract import sae_train as st
    from extract.layers import parse_layers

    with user_errors():
        profile = _profile_name(quick, settings_file)
        the_store = _open_store(store, create=True)
        loaded = _load_model(model, device, None)
        section = pipeline.read_profile(profile, loaded.n_layers).get("sae") or {}
        chosen = list(parse_layers(layers, loaded.n_layers)) if layers else None
        settings = st.TrainSettings.from_dict({**section, **{k: v for k, v in dict(
            layers=chosen, width=width, k=k, architecture=architecture, sparse=sparse, tokens=tokens,
            epochs=epochs, lr=lr, seed=seed).items() if v is not None}})
        results = st.train_saes(the_store, loaded, settings, log=_log)
    for line in [st.summary_line(results), *st.detail_lines(results, settings)]:
        typer.echo(line)


def _profile_name(quick: bool, settings_file: Path | None) -> str:
    if quick and settings_file:
        raise UsageError("give --quick or --settings, not both")
    return str(settings_file) if settings_file else "quick" if quick else "default"


@app.command()
def feature(
    name: str = typer.Argument(..., metavar="LAYER:ID", help="The feature, e.g. 12:345."),
    n_contexts: Optional[int] = opt("--contexts", "Top-activating contexts shown."),
    window: Optional[int] = opt("--window", "Tokens shown on each side of the highlighted one."), store: str = StoreOpt,
) -> None:
    """Print a feature's card: top-activating contexts, density, datasets and categories, explanation.

    Example: python cli.py feature 12:345 --store stores/default
    """
    def run(m, s, _, built):
        return m.card(s, *m.parse_feature(name), built)
    stage_command("analyze.cards", store, lambda m: m.CardSettings.from_options(n_contexts=n_contexts, window=window),
                  run, needs_model=False)


@app.command()
def report(
    out: Optional[Path] = opt("--out", "Output directory (default: STORE/report)."),
    max_cards: Optional[int] = opt("--cards", "Feature cards shown (most frequent features of the sets)."),
    store: str = StoreOpt,
) -> None:
    """Write the HTML report (self-contained) and its Markdown twin with every table and plot the store has.

    Example: python cli.py report --store stores/default --out reports/default
    """
    result = stage_command("analyze.report", store, lambda m: m.ReportSettings.from_options(
        out=str(out) if out else None, max_cards=max_cards), lambda m, s, _, built: m.run(s, built), needs_model=False)
    failed = [title for title, status in result.sections if status.startswith("error")]
    if failed:
        typer.echo(f"error: {len(failed)} report sections failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@store_app.command("init")
def store_init(
    arrays: Optional[str] = opt("--arrays", "URL for the Zarr arrays (s3://bucket/prefix, gs://..., any fsspec "
                                "URL) (default: STORE/arrays.zarr)."),
    store: str = StoreOpt,
) -> None:
    """Create a store; with --arrays its arrays live on object storage, its catalog in the local STORE directory.

    Example: python cli.py store init --arrays s3://my-bucket/refusalscope/arrays.zarr --store stores/default
    """
    with user_errors():
        created = _open_store(store, create=True, arrays=arrays)
        where = created.arrays_url or str(created.arrays_root)
    typer.echo(f"store {created.path}: catalog {created.path / 'catalog.duckdb'}, arrays {where}")


@store_app.command("check")
def store_check(
    repair: bool = typer.Option(False, "--repair", help="Mark damaged runs so that the same extraction recomputes them."),
    store: str = StoreOpt,
) -> None:
    """Verify every committed run's Zarr arrays against the catalog: shapes, chunks present, sizes and checksums.

    Example: python cli.py store check --repair --store stores/default
    """
    from store.check import check_store, summary_lines

    with user_errors():
        result = check_store(_open_store(store, read_only=not repair), repair=repair)
    for line in summary_lines(result):
        typer.echo(line)
    if result.damaged and not repair:
        raise typer.Exit(1)


@judge_app.command("eval")
def judge_eval(
    gold: Path = typer.Option(..., "--gold", help="JSONL with prompt, completion, label (and optional split)."),
    judges: str = opt("--judges", "Comma-separated judges to score.", "content,phrase,rubric,p_i"),
    split: Optional[str] = opt("--split", "Score only this split (train or test) (default: every row)."),
) -> None:
    """Accuracy, Cohen's kappa and compliance precision/recall of each judge against labels, with 95% CIs.

    Example: python cli.py judge eval --gold data/judge_gold/gold_shared.jsonl --split test
    """
    from analyze.judge_eval import evaluate_judges, load_gold, summary_lines
    from analyze.settings import JudgedSettings

    with user_errors():
        result = evaluate_judges(load_gold(gold), [j.strip() for j in judges.split(",") if j.strip()], split=split)
    for line in summary_lines(result, JudgedSettings().judge):
        typer.echo(line)


@judge_app.command("rerun")
def judge_rerun(
    judge: Optional[str] = opt("--judge", "The judge whose verdicts are added (content, phrase, rubric, p_i[@T])."),
    runs: Optional[str] = opt("--runs", "Comma-separated run ids (default: every run with completions)."),
    store: str = StoreOpt,
) -> None:
    """Judge the store's stored completions again with another judge (no model), and compare with the judges before.

    Example: python cli.py judge rerun --judge rubric --store stores/default
    """
    stage_command("analyze.rejudge", store, lambda m: m.RejudgeSettings.from_options(judge=judge, runs=runs),
                  lambda m, s, _, built: m.run(s, built), needs_model=False)


@app.command("run")
def run_job(
    model: Optional[str] = ModelOpt,
    quick: bool = typer.Option(False, "--quick", help="The quick profile (profiles/quick.json: small numbers, "
                                                     "minutes on 2 CPU cores) instead of the paper's parameters."),
    settings_file: Optional[Path] = opt("--settings", "A profile (JSON, like profiles/*.json) instead of the default."),
    out: Optional[Path] = opt("--out", "Report directory (default: STORE/report)."),
    start: Optional[str] = opt("--from", "Rerun from this stage on, even where done: saes, direction, candidates, "
                               "prune, stage3, redundancy, controls, costs, taxonomy, report."),
    only: Optional[str] = opt("--only", "Run this stage alone (the stages before it must be done)."),
    workers: Optional[int] = WorkersOpt, ray_address: Optional[str] = RayAddressOpt,
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt, store: str = StoreOpt,
) -> None:
    """The main job: SAEs, refusal direction, stages 1-3, redundancy, controls, costs, taxonomy, report; resumable.

    Example: python cli.py run --quick --model qwen-coder-0.5b --store stores/default
    """
    from analyze import pipeline
    from extract import workers as pools

    with user_errors():
        profile = _profile_name(quick, settings_file)
        pipeline.check_stage_options(start, only)
        checked = pipeline.check_profile(profile)         # a bad file fails before anything is created
        worker_settings(workers, ray_address, checked.workers)
        the_store = _open_store(store, create=True)
        loaded = _load_model(model, device, dtype)
        settings = pipeline.load_settings(profile, loaded, out=out)
        with pools.started(worker_settings(workers, ray_address, settings.workers), loaded, log=_log):
            result = pipeline.run(the_store, loaded, settings, log=_log, on_stage=typer.echo, start=start, only=only)
    if result.report is not None:
        typer.echo(f"report: {result.report}\nmarkdown: {result.markdown}")


if __name__ == "__main__":
    app()
