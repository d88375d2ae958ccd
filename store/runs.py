"""Writing one run: arrays to Zarr, rows staged as Parquet, one catalog transaction to commit.

Life of a run:
  begin_run   one short transaction: the `runs` row (status 'running'), its prompts, chats and
              intervention specs. A run that is already complete is not begun again (cache hit).
  submit      per chunk of items: Zarr regions of the run's own arrays, then the chunk's catalog
              rows as Parquet files under staging/<run_id>/, then a `.done` marker (atomic rename).
              Runs on a background thread so the forward pass never waits on compression.
  commit      one transaction: every staged row into the catalog, status 'complete'.
A killed run leaves status 'running' and no rows in the public tables; rerunning it skips the
chunks whose marker exists and rewrites the rest. A run never touches another run's files, and its
staged Parquet is a self-contained batch a driver can merge into any store (see DESIGN, Scale-out).
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import zarr
from zarr.codecs import BloscCodec

from store.schema import RUN_TABLES
from store.store import STAGING, Store, code_version

ROW_CHUNK = 1024                 # rows per Zarr chunk along the row axis
MAX_PENDING = 2                  # chunks queued for the writer thread before submit() waits


@dataclass(frozen=True)
class RunPlan:
    """Everything the catalog needs to know about a run before its first forward pass."""

    run_id: str
    model: str
    sae_set: dict[str, Any]
    intervention: dict[str, Any]
    settings: dict[str, Any]
    n_items: int
    n_rows: int
    prompts: pl.DataFrame                              # rows for `prompts` (upserted)
    chats: pl.DataFrame                                # rows for `chats` (upserted)
    specs: dict[str, str] = field(default_factory=dict)  # spec_hash -> canonical JSON


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def begin_run(store: Store, plan: RunPlan) -> "RunWriter | None":
    """Register a run (or find it). None when the run is already complete: nothing to compute."""
    info = store.run_info(plan.run_id)
    if info is not None and info["status"] == "complete":
        return None
    with store.transaction() as con:
        if info is None:
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, NULL, ?)",
                [plan.run_id, plan.model, json.dumps(plan.sae_set, sort_keys=True),
                 json.dumps(plan.intervention, sort_keys=True), json.dumps(plan.settings, sort_keys=True),
                 plan.n_items, plan.n_rows, _now(), code_version()],
            )
        _upsert(con, "prompts", plan.prompts, ["prompt_id"])
        _upsert(con, "chats", plan.chats, ["model", "prompt_id"])
        specs = pl.DataFrame({"spec_hash": list(plan.specs), "spec": list(plan.specs.values())},
                             schema={"spec_hash": pl.String, "spec": pl.String})
        _upsert(con, "interventions", specs, ["spec_hash"])
    return RunWriter(store, plan)


def _upsert(con, table: str, df: pl.DataFrame, keys: list[str]) -> None:
    if df.is_empty():
        return
    con.register("incoming", df.to_arrow())
    on = " AND ".join(f"t.{k} = i.{k}" for k in keys)
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming i "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {on})")
    con.unregister("incoming")


class RunWriter:
    """Writes one run's arrays and staged rows; `commit` makes the run visible."""

    def __init__(self, store: Store, plan: RunPlan) -> None:
        self.store = store
        self.plan = plan
        self.run_id = plan.run_id
        self.staging = store.path / STAGING / plan.run_id
        self.staging.mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, zarr.Array] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{plan.run_id}")
        self._pending: list[Future] = []

    def done_chunks(self) -> set[int]:
        """Chunks whose rows are fully staged (their marker exists)."""
        return {int(p.name.split("-")[1].split(".")[0]) for p in self.staging.glob("chunk-*.done")}

    def array(self, name: str, shape: tuple[int, ...], dtype: str = "float32") -> zarr.Array:
        """This run's array `name`, created on first use (reopened when resuming)."""
        if name in self._arrays:
            return self._arrays[name]
        path = self.store.array_path(self.run_id, name)
        if (path / "zarr.json").exists():
            arr = zarr.open_array(str(path), mode="r+")
            if tuple(arr.shape) != tuple(shape):
                raise RuntimeError(f"array {path} has shape {arr.shape}, expected {shape}")
        else:
            chunks = (min(ROW_CHUNK, max(shape[0], 1)), *shape[1:])
            arr = zarr.create_array(
                store=str(path), shape=shape, chunks=chunks, dtype=dtype,
                compressors=BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),
                fill_value=0, overwrite=True,
            )
        self._arrays[name] = arr
        return arr

    def submit(self, chunk: int, arrays: list[tuple[str, int, np.ndarray]],
               tables: dict[str, pl.DataFrame]) -> None:
        """Queue one chunk: array regions [(name, row_start, data)] and rows {table: frame}."""
        unknown = set(tables) - set(RUN_TABLES)
        assert not unknown, f"not run tables: {unknown}"
        for arr_name, _, _ in arrays:
            assert arr_name in self._arrays, f"create array {arr_name} with .array() first"
        while len(self._pending) >= MAX_PENDING:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._write_chunk, chunk, arrays, tables))

    def _write_chunk(self, chunk: int, arrays: list[tuple[str, int, np.ndarray]],
                     tables: dict[str, pl.DataFrame]) -> None:
        for name, row_start, data in arrays:
            self._arrays[name][row_start:row_start + len(data)] = data
        for table, df in tables.items():
            _atomic_parquet(df, self.staging / f"chunk-{chunk:06d}.{table}.parquet")
        marker = self.staging / f"chunk-{chunk:06d}.done"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text("")
        os.replace(tmp, marker)

    def flush(self) -> None:
        """Wait for every queued chunk; re-raises a write error."""
        while self._pending:
            self._pending.pop(0).result()

    def commit(self, tables: dict[str, pl.DataFrame] | None = None) -> None:
        """Make the run visible: staged rows (plus `tables`) and status 'complete' in one transaction."""
        self.flush()
        self._pool.shutdown()
        for table, df in (tables or {}).items():
            _atomic_parquet(df, self.staging / f"final.{table}.parquet")
        done = self.done_chunks()
        with self.store.transaction() as con:
            for table in RUN_TABLES:
                files = sorted(str(p) for p in self.staging.glob(f"*.{table}.parquet")
                               if _belongs(p, done))
                if files:
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [files])
            con.execute("UPDATE runs SET status = 'complete', completed_at = ? WHERE run_id = ?",
                        [_now(), self.run_id])
        shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        """Stop the writer thread without committing (the run stays resumable)."""
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)


def _belongs(path: Path, done: set[int]) -> bool:
    name = path.name
    if name.startswith("final."):
        return True
    return int(name.split("-")[1].split(".")[0]) in done


def _atomic_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.write_parquet(tmp, compression="zstd")
    os.replace(tmp, path)
