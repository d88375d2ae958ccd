"""What every command shares: options that mean "the settings default", one-line errors, and
`stage_command`, which checks the settings, opens the store before any model loads (a mistyped
--store fails at once and creates nothing), runs the stage and prints its summary."""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

from store.errors import UsageError

DEFAULT_STORE = "stores/default"


def opt(flag: str, help_text: str, default: Any = None) -> Any:
    """An option whose None means the settings default."""
    return typer.Option(default, flag, help=help_text)


StoreOpt = opt("--store", "Store directory.", DEFAULT_STORE)
ModelOpt = opt("--model", "Registry name, HF id, .gguf file or HF directory (default: qwen-coder-0.5b).")
DeviceOpt = opt("--device", "cpu, cuda, cuda:1 ... (default: cuda if available).")
DtypeOpt = opt("--dtype", "auto, float32 or bfloat16 (default auto: bfloat16 on cuda and on CPUs with "
                           "native bf16, AMX or AVX512-BF16; float32 elsewhere).")
JudgeOpt = opt("--judge", "rubric, content, phrase, p_i[@T], harmbench or llamaguard (GPU + weights).")
GenerateOpt = opt("--generate", "Greedy completion tokens for judges that read completions.")
BatchOpt = opt("--batch-size", "Rows per forward pass.")
MaxPromptsOpt = opt("--max-prompts", "At most N prompts, the first by prompt id (default: all).")
WorkersOpt = opt("--workers", "Ray actors that compute the forward passes (one GPU or CPU slot each); 0: this "
                            "process, no Ray (default: 0, or the profile's).")
RayAddressOpt = opt("--ray-address", "Join this Ray cluster (auto, or host:port) instead of starting a local one.")
EXECUTION = ("workers", "ray_address")                 # where forward passes run: never part of a settings hash
SaeOpt = typer.Option([], "--sae", help="LAYER=SOURCE (SAE directory or sae-lens release:id); repeatable. "
                                        "Default: the store's trained SAEs for the model.")


def _log(message: str) -> None:
    typer.echo(message, err=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user mistake into one `error:` line on stderr and exit code 2."""
    try:
        yield
    except UsageError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume from the last written batch", err=True)
        raise typer.Exit(130)


def _open_store(path: str, create: bool = False, read_only: bool = False, arrays: str | None = None):
    from store import Store

    return Store.create(path, arrays=arrays) if create else Store.open(path, read_only=read_only)


def _load_model(name: str | None, device: str | None, dtype: str | None):
    from extract.models import DEFAULT_MODEL, load_model

    _log(f"loading {name or DEFAULT_MODEL} ...")
    return load_model(name or DEFAULT_MODEL, device=device, dtype=dtype)


def worker_settings(workers: int | None, ray_address: str | None, base: Any = None) -> Any:
    """The pool's settings: --workers/--ray-address over `base` (a profile's), over the defaults. --workers 0 runs
    in this process, so it also drops a cluster address the profile gives."""
    from dataclasses import asdict

    from extract.workers import WorkerSettings

    given = {k: v for k, v in (("n", workers), ("ray_address", ray_address)) if v is not None}
    if workers == 0 and ray_address is None:
        given["ray_address"] = None
    return WorkerSettings.from_dict({**(asdict(base) if base is not None else {}), **given})


def stage_command(module_name: str, store: str, settings: Callable[[Any], Any] | None,
                  run: Callable[[Any, Any, Any, Any], Any], model: str | None = None, device: str | None = None,
                  dtype: str | None = None, needs_model: bool = True, read_only: bool = False,
                  then: Callable[[Any, Any, Any], list[str]] | None = None, workers: int | None = None,
                  ray_address: str | None = None) -> Any:
    """Settings checked, store opened, then the model loaded and the stage run; its summary printed.

    `settings(module)` builds the settings, `run(module, store, model, settings)` the result, and
    `then(module, store, result)` any extra lines (plot files). `workers`/`ray_address`: the stage's
    forward passes run on that many Ray actors (extract/workers.py).
    """
    with user_errors():
        from extract import workers as pools

        module = importlib.import_module(module_name)
        built = settings(module) if settings else None
        pool = worker_settings(workers, ray_address)
        the_store = _open_store(store, read_only=read_only)
        loaded = _load_model(model, device, dtype) if needs_model else None
        with pools.started(pool, loaded, log=_log) if needs_model else pools.using(pools.LOCAL):
            result = run(module, the_store, loaded, built)
        extra = then(module, the_store, result) if then else []
    typer.echo(module.summary_line(result))
    for line in [*module.detail_lines(result), *extra]:
        typer.echo(line)
    return result


def _stage(module_name: str, cls: str, options: dict[str, Any], store: str, **kw: Any) -> Any:
    """stage_command for a stage whose entry point is run(store, model, settings, log)."""
    model, device, dtype, workers, ray_address = (options.pop(k, None) for k in ("model", "device", "dtype",
                                                                                 *EXECUTION))
    return stage_command(module_name, store, lambda m: getattr(m, cls).from_options(**options),
                         lambda m, s, loaded, built: m.run(s, loaded, built, log=_log),
                         model=model, device=device, dtype=dtype, workers=workers, ray_address=ray_address, **kw)


def _options(scope: dict[str, Any], *drop: str) -> dict[str, Any]:
    """A command's parameters as settings options, less the store and the named others (the pool's options
    stay in for `_stage`, which takes them out)."""
    return {k: v for k, v in scope.items()
            if k not in ("store", *drop) and not callable(v) and not isinstance(v, types.ModuleType)}
