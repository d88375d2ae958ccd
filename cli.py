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

# ---- analyze fm (issue 6) -------------------------------------------------------------------

# ---- analyze redundancy (issue 7) -----------------------------------------------------------

# ---- controls, costs, taxonomy, feature, report, run (issue 8) ------------------------------


if __name__ == "__main__":
    app()
