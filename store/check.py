"""`cli.py store check`: verify every committed run's Zarr arrays against the catalog, optionally repair.

A committed run must have, for each array it wrote, the shape the catalog implies (resid/<layer>:
[n_rows, d_model]; completion_ids and logits_last: one row per item) and every chunk file of that
shape, each of the size and checksum recorded at commit (`array_chunks`; runs committed before it
existed are held to the array's shape and codecs). Repair marks a damaged run `damaged` and removes
its bad files: the next identical extraction recomputes the run and replaces its rows.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import zarr

from store.chunks import ZARR_CONFIG, chunk_keys, chunk_problems
from store.store import Store


@dataclass(frozen=True)
class Damage:
    """One damaged array file of a committed run."""

    run_id: str
    layer: int | None                 # the residual layer, None for completion_ids / logits_last
    array: str                        # resid/<layer>, completion_ids, logits_last
    problem: str                      # missing | truncated (n of m bytes) | corrupt (...) | shape ...
    file: str                         # the damaged file (chunk or zarr.json), absolute


@dataclass(frozen=True)
class CheckResult:
    """What `check_store` verified and found."""

    n_runs: int                       # committed runs checked
    n_arrays: int
    n_chunks: int                     # chunk files verified
    damaged: tuple[Damage, ...]
    repaired: tuple[str, ...]         # run ids marked 'damaged' for recompute (repair=True only)

    @property
    def damaged_runs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.run_id for d in self.damaged))


def check_store(store: Store, repair: bool = False) -> CheckResult:
    """Verify every committed run's arrays; with repair, mark the damaged runs for recompute."""
    runs = store.sql("SELECT run_id, n_items, n_rows, settings FROM runs WHERE status = 'complete' ORDER BY run_id")
    recorded = _recorded(store)
    damaged: list[Damage] = []
    n_arrays = n_chunks = 0
    for run_id, n_items, n_rows, settings in runs.iter_rows():
        for name, shape in _expected_arrays(store, run_id, n_items, n_rows, settings).items():
            found, n = _check_array(store, run_id, name, shape, recorded.get((run_id, name), {}))
            damaged += found
            n_arrays += 1
            n_chunks += n
    repaired: tuple[str, ...] = ()
    if repair and damaged:
        repaired = _mark_damaged(store, damaged)
    return CheckResult(runs.height, n_arrays, n_chunks, tuple(damaged), repaired)


def summary_lines(result: CheckResult) -> list[str]:
    """What `cli.py store check` prints: one line per damaged file, then the verdict."""
    lines = [f"damaged: run {d.run_id} {d.array}: {d.file} is {d.problem}" for d in result.damaged]
    checked = f"{result.n_runs} committed runs, {result.n_arrays} arrays, {result.n_chunks} chunk files checked"
    if not result.damaged:
        return [*lines, f"store ok: {checked}"]
    runs = result.damaged_runs
    if result.repaired:
        lines.append(f"{checked}; {len(runs)} damaged runs marked for recompute: rerun the extractions "
                     f"that made them ({', '.join(result.repaired)})")
    else:
        lines.append(f"{checked}; {len(runs)} damaged runs ({', '.join(runs)}): run "
                     f"`python cli.py store check --repair`, then the same extractions again")
    return lines


def _recorded(store: Store) -> dict[tuple[str, str], dict[str, tuple[int, int]]]:
    cols = store.fetch_numpy("SELECT run_id, array_name, chunk_key, n_bytes, crc32 FROM array_chunks")
    out: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
    for run_id, name, key, size, crc in zip(*(cols[c] for c in ("run_id", "array_name", "chunk_key", "n_bytes", "crc32"))):
        out.setdefault((str(run_id), str(name)), {})[str(key)] = (int(size), int(crc))
    return out


def _expected_arrays(store: Store, run_id: str, n_items: int, n_rows: int,
                     settings_json: str | None) -> dict[str, tuple[int | None, ...]]:
    """Array name -> the shape the catalog implies (None: a dimension the catalog does not know)."""
    layers = store.sql("SELECT resid_array, d_model FROM layers WHERE run_id = ? AND resid_array IS NOT NULL",
                       [run_id])
    expected: dict[str, tuple[int | None, ...]] = {name: (n_rows, d) for name, d in layers.iter_rows()}
    settings = json.loads(settings_json) if settings_json else {}
    if settings.get("generate"):
        expected["completion_ids"] = (n_items, int(settings["generate"]))
    if settings.get("save_logits"):
        expected["logits_last"] = (n_items, None)
    return expected


def _check_array(store: Store, run_id: str, name: str, shape: tuple[int | None, ...],
                 recorded: dict[str, tuple[int, int]]) -> tuple[list[Damage], int]:
    """The array's damage and how many chunk files were verified."""
    path = store.array_path(run_id, name)
    layer = int(name.split("/")[1]) if name.startswith("resid/") else None

    def damage(problem: str, file: Path) -> Damage:
        return Damage(run_id, layer, name, problem, str(file))

    try:
        arr = zarr.open_array(str(path), mode="r", config=ZARR_CONFIG)
    except Exception:                                 # absent or unparsable metadata
        return [damage("missing or unreadable (array metadata)", path / "zarr.json")], 0
    if len(arr.shape) != len(shape) or any(w is not None and w != s for w, s in zip(shape, arr.shape)):
        return [damage(f"of shape {tuple(arr.shape)}, but the catalog implies {shape}", path / "zarr.json")], 0
    problems = [damage(p.problem, p.file) for p in chunk_problems(arr, path, recorded=recorded or None, decode=True)]
    return problems, sum(1 for _ in chunk_keys(arr))


def _mark_damaged(store: Store, damaged: list[Damage]) -> tuple[str, ...]:
    """Status 'damaged' (the next identical extraction recomputes and replaces), bad files removed."""
    runs = tuple(dict.fromkeys(d.run_id for d in damaged))
    with store.transaction() as con:
        for run_id in runs:
            con.execute("UPDATE runs SET status = 'damaged' WHERE run_id = ? AND status = 'complete'", [run_id])
    for d in damaged:
        _remove(str(d.file), whole_array=Path(d.file).name == "zarr.json")
    return runs


def _remove(file: str, whole_array: bool) -> None:
    """Delete a bad chunk file, or for bad metadata (zarr.json: shape) the whole array; local or on object
    storage alike (a missing chunk reads as zeros while the array is rewritten: fine)."""
    if "://" not in file:
        if whole_array:
            shutil.rmtree(Path(file).parent, ignore_errors=True)
        else:
            Path(file).unlink(missing_ok=True)
        return
    from upath import UPath

    target = UPath(file).parent if whole_array else UPath(file)
    if target.fs.exists(target.path):
        target.fs.rm(target.path, recursive=whole_array)
