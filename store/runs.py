"""Writing one run: arrays to Zarr, rows staged as Parquet, one catalog transaction to commit.

Life of a run:
  begin_run   one short transaction: the `runs` row (status 'running'), its prompts, chats and
              intervention specs. A run that is already complete is not begun again (cache hit).
  submit      per chunk of items (one batch): Zarr regions of the run's own arrays, then the
              chunk's catalog rows as Parquet files under staging/<run_id>/, then a `.done` marker
              (atomic rename). Runs on a background thread so the forward pass never waits on it.
  commit      one transaction: every staged row into the catalog, the chunk files written
              (`array_chunks`), status 'complete'. Idempotent: a complete run is never re-inserted.
One process writes a run at a time (flock on staging/<run_id>.lock, held from begin_run to commit).
A killed run leaves status 'running' and no rows in the public tables; rerunning it skips the
chunks whose marker exists (all but the batches in flight) and rewrites the rest. A run never
touches another run's files, and its staged Parquet is a self-contained batch a driver can merge into any store (see DESIGN, Scale-out).
"""

from __future__ import annotations

import fcntl
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

from store.chunks import ZARR_CONFIG, manifest
from store.errors import UsageError
from store.schema import RUN_TABLES
from store.store import STAGING, Store, code_version

# feature-major order: a feature's rows sit together (feature cards, GROUP BY feature) and the
# feature column run-length encodes; measured 10.3 -> 6.1 bytes per latent on synthetic data
RUN_TABLE_ORDER = {"sae_acts": "layer, feature, row"}
# rows per Zarr chunk along the row axis: below a batch's rows (16 prompts x 40 tokens), so the partial
# last chunk each batch rewrites to be durable stays small (1024 halved write throughput; 256 matches it)
ROW_CHUNK = 256
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


def begin_run(store: Store, plan: RunPlan, wait: bool = True) -> "RunWriter | None":
    """Register a run (or find it). None when the run is already complete: nothing to compute.

    A run is written by one process at a time (a lock file under staging/). When another process
    holds it, wait=True waits for that writer (and usually finds the run complete); wait=False raises.
    """
    info = store.run_info(plan.run_id)
    if info is not None and info["status"] == "complete":
        return None
    lock = RunLock.acquire(store.path / STAGING / f"{plan.run_id}.lock", plan.run_id, wait)
    try:
        info = store.run_info(plan.run_id)           # the writer we waited for may have finished it
        if info is not None and info["status"] == "complete":
            lock.release()
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
        return RunWriter(store, plan, lock)
    except BaseException:
        lock.release()
        raise


class RunLock:
    """An exclusive flock on one run's lock file; the kernel drops it when the holder dies (kill -9)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, run_id: str, wait: bool) -> "RunLock":
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise UsageError(f"run {run_id} is being written by pid {holder}; wait for it to "
                                     f"finish (rerun then reuses the run) or stop that process") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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

    def __init__(self, store: Store, plan: RunPlan, lock: RunLock | None = None) -> None:
        self.store = store
        self._lock = lock
        self.plan = plan
        self.run_id = plan.run_id
        self.staging = store.path / STAGING / plan.run_id
        self.staging.mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, zarr.Array] = {}
        self._tails: dict[str, tuple[int, list[np.ndarray]]] = {}  # row-buffered arrays: (first row, parts)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{plan.run_id}")
        self._pending: list[Future] = []

    def done_chunks(self) -> set[int]:
        """Chunks whose rows are fully staged (their marker exists)."""
        return {int(p.name.split("-")[1].split(".")[0]) for p in self.staging.glob("chunk-*.done")}

    def array(self, name: str, shape: tuple[int, ...], dtype: str = "float32",
              row_buffered: bool = True) -> zarr.Array:
        """This run's array `name`, created on first use (reopened when resuming).

        A row-buffered array keeps the rows of its last, partial Zarr chunk in memory: every batch
        writes its rows (so its marker can follow at once), and the batch that fills a chunk rewrites
        it whole instead of reading it back (read-modify-write cost 2-3x in throughput). Regions must
        then be submitted in increasing row order, as extraction does.
        """
        if name in self._arrays:
            return self._arrays[name]
        path = self.store.array_path(self.run_id, name)
        if (path / "zarr.json").exists():
            arr = zarr.open_array(str(path), mode="r+", config=ZARR_CONFIG)
            if tuple(arr.shape) != tuple(shape):
                raise RuntimeError(f"array {path} has shape {arr.shape}, expected {shape}")
        else:
            chunks = (min(ROW_CHUNK, max(shape[0], 1)), *shape[1:])
            arr = zarr.create_array(
                store=str(path), shape=shape, chunks=chunks, dtype=dtype,
                # float32 residuals compress to ~0.93 of raw: not worth the CPU (bench/bench_store.py)
                compressors=None if dtype.startswith("float") else BloscCodec(cname="zstd", clevel=1),
                fill_value=0, overwrite=True, config=ZARR_CONFIG,
            )
        self._arrays[name] = arr
        if row_buffered:
            self._tails[name] = (0, [])
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
            if name in self._tails:
                self._buffer(name, row_start, data)
            else:
                self._arrays[name][row_start:row_start + len(data)] = data
        for table, df in tables.items():
            _atomic_parquet(df, self.staging / f"chunk-{chunk:06d}.{table}.parquet")
        marker = self.staging / f"chunk-{chunk:06d}.done"      # every row of this batch is on disk
        tmp = marker.with_suffix(".tmp")
        tmp.write_text("")
        os.replace(tmp, marker)

    def _buffer(self, name: str, row_start: int, data: np.ndarray) -> None:
        """Append rows to the array's tail and write it out (see `_write_tail`)."""
        start, parts = self._tails[name]
        if row_start != start + sum(len(p) for p in parts):   # a gap (resumed run): start a new tail
            start, parts = row_start, []
        parts.append(data)
        self._tails[name] = (start, parts)
        self._write_tail(name)

    def _write_tail(self, name: str) -> None:
        """Write every buffered row; keep the rows of the last, partial Zarr chunk for the next batch.

        So each batch is on disk when its marker is written (resume loses at most the batch in flight),
        and the batch that completes a chunk writes it whole, without reading it back.
        """
        start, parts = self._tails[name]
        arr = self._arrays[name]
        step = arr.chunks[0]
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        end = start + len(rows)
        stop = end
        if start % step == 0:        # pad to the chunk's end: a whole-chunk write, never a read-back.
            # Rows past `end` are not written yet: batches arrive in row order and resume skips a prefix.
            stop = min(-(-end // step) * step, arr.shape[0])
        padded = rows if stop == end else np.concatenate([rows, np.zeros((stop - end, *rows.shape[1:]), rows.dtype)])
        arr[start:stop] = padded
        cut = max(start, (end // step) * step)
        self._tails[name] = (cut, [rows[cut - start:]] if end > cut else [])

    def flush(self) -> None:
        """Wait for every queued chunk to be written; re-raises a write error."""
        while self._pending:
            self._pending.pop(0).result()

    def commit(self, tables: dict[str, pl.DataFrame] | None = None) -> bool:
        """Make the run visible: staged rows (plus `tables`), its chunk manifest and status 'complete'.

        One transaction. Idempotent: a run that is already complete is left as it is (False); a run
        marked damaged (store/check.py) has its old rows replaced by the recomputed ones.
        """
        try:
            self.flush()
            self._pool.shutdown()
            for table, df in (tables or {}).items():
                _atomic_parquet(df, self.staging / f"final.{table}.parquet")
            done = self.done_chunks()
            chunks = manifest(self.store.run_arrays(self.run_id))
            with self.store.transaction() as con:
                status = con.execute("SELECT status FROM runs WHERE run_id = ?", [self.run_id]).fetchall()
                if status and status[0][0] == "complete":
                    return False
                if status and status[0][0] == "damaged":
                    for table in (*RUN_TABLES, "array_chunks"):
                        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [self.run_id])
                for table in RUN_TABLES:
                    files = sorted(str(p) for p in self.staging.glob(f"*.{table}.parquet")
                                   if _belongs(p, done))
                    if files:
                        order = f" ORDER BY {RUN_TABLE_ORDER[table]}" if table in RUN_TABLE_ORDER else ""
                        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?){order}", [files])
                if chunks:
                    con.executemany("INSERT INTO array_chunks VALUES (?, ?, ?, ?, ?)",
                                    [(self.run_id, *c) for c in chunks])
                con.execute("UPDATE runs SET status = 'complete', completed_at = ? WHERE run_id = ?",
                            [_now(), self.run_id])
            shutil.rmtree(self.staging, ignore_errors=True)
            return True
        finally:
            self._release()

    def abort(self) -> None:
        """Stop the writer thread without committing (the run stays resumable)."""
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()


def _belongs(path: Path, done: set[int]) -> bool:
    name = path.name
    if name.startswith("final."):
        return True
    return int(name.split("-")[1].split(".")[0]) in done


def _atomic_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.write_parquet(tmp, compression="zstd")
    os.replace(tmp, path)
