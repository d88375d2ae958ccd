"""The activation store: one directory with a DuckDB catalog and a Zarr v3 tree of arrays.

DuckDB allows one writing process at a time, so every write here is a short transaction on a
connection that is opened and closed around it; readers open read-only and retry while a writer
holds the lock. Long work (extraction) never holds the catalog: it stages a run's rows as Parquet
files beside its Zarr arrays (see `store.runs`) and merges them in one transaction at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import polars as pl
import zarr
import zarr.errors

from store.chunks import ZARR_CONFIG, chunk_keys, chunk_problems, decode_problem
from store.errors import StoreDamaged, StoreError, UsageError
from store.schema import FORMAT_VERSION, MIGRATIONS

CATALOG = "catalog.duckdb"
ARRAYS = "arrays.zarr"
STAGING = "staging"
LOCK_TIMEOUT_S = 30.0
CATALOG_ALIAS = "catalog"        # the name a user query sees the catalog under (ATTACH ... AS catalog)
# what a user query may be: one statement that only reads (DESCRIBE, SUMMARIZE, SHOW parse as SELECT)
READ_ONLY_HELP = "SELECT, WITH, DESCRIBE, SUMMARIZE, SHOW, EXPLAIN or PRAGMA table_info"
READ_ONLY_PRAGMAS = ("table_info", "show_tables", "show_tables_expanded")


def code_version() -> str:
    """The project's version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"0.1.0+{sha}" if sha else "0.1.0"


def _is_lock_error(err: Exception) -> bool:
    text = str(err)
    return "lock" in text.lower() or "Conflicting lock" in text


class Store:
    """A store directory: `catalog.duckdb` + `arrays.zarr` + `staging/` for runs being written."""

    def __init__(self, path: Path, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._arrays_root: Any = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, arrays: str | None = None) -> "Store":
        """Create a new store (or open an existing one for writing, migrating it).

        `arrays`: a URL (s3://bucket/prefix, gs://..., any fsspec URL) where the store's Zarr arrays live
        instead of <store>/arrays.zarr; recorded in the catalog when the store is created. The catalog
        and the staged rows stay in the local directory `path`.
        """
        root = Path(path)
        if "://" in str(path):
            raise UsageError(f"--store is the local directory of the catalog, got the URL {path}; create the "
                             f"store with `python cli.py store init --store DIR --arrays {path}`")
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        (root / STAGING).mkdir(exist_ok=True)
        store = cls(root, read_only=False)
        store._migrate()
        if arrays is not None:
            store._record_arrays_url(arrays)
        else:
            _ensure_group(store.arrays_root)
        return store

    def _record_arrays_url(self, url: str) -> None:
        """Bind the catalog to arrays at `url`, once the Zarr group there exists: a URL that cannot be written
        (no bucket, no credentials, no fsspec backend for it) fails in one line and binds nothing."""
        if "://" not in url:
            raise UsageError(f"--arrays must be a URL such as s3://bucket/prefix, got {url!r}")
        with self.transaction() as con:
            found = con.execute("SELECT value FROM meta WHERE key = 'arrays_url'").fetchall()
            n_runs = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
        if found and found[0][0] != url or not found and n_runs:
            raise UsageError(f"store {self.path} keeps its arrays at {found[0][0] if found else 'arrays.zarr'}; "
                             f"give a new store directory for arrays at {url}")
        try:
            _ensure_group(_url_root(url))
        except UsageError:
            raise
        except Exception as err:                        # botocore, fsspec, zarr: the filesystem's own errors
            raise UsageError(f"cannot create the arrays at {url}: {type(err).__name__}: {err}") from None
        if not found:
            with self.transaction() as con:
                con.execute("INSERT INTO meta VALUES ('arrays_url', ?) ON CONFLICT DO NOTHING", [url])
        self._arrays_root = None

    @property
    def arrays_url(self) -> str | None:
        """The URL the arrays live at, None when they are in <store>/arrays.zarr."""
        return self._meta().get("arrays_url")

    @property
    def arrays_root(self) -> Any:
        """The root of the store's Zarr tree: a local Path, or a UPath for a URL (fsspec underneath)."""
        if getattr(self, "_arrays_root", None) is None:
            url = self.arrays_url
            if url is None:
                self._arrays_root = self.path / ARRAYS
            else:
                self._arrays_root = _url_root(url, f"store {self.path} keeps its arrays at {url}")
        return self._arrays_root

    @classmethod
    def open(cls, path: str | Path, read_only: bool = True) -> "Store":
        """Open an existing store; refuses a missing store or one of an unknown format."""
        root = Path(path)
        if not (root / CATALOG).exists():
            raise StoreError(f"no store at {root} (no {CATALOG}); create one with `python cli.py extract --store {root}`")
        store = cls(root, read_only=read_only)
        if read_only:
            store._check_version()
        else:
            store._migrate()
        return store

    def _check_version(self) -> None:
        meta = self._meta()
        fmt = int(meta.get("format_version", -1))
        if fmt != FORMAT_VERSION:
            raise StoreError(
                f"store {self.path} has format version {fmt}; this refusalscope reads version "
                f"{FORMAT_VERSION} only"
            )
        schema = int(meta.get("schema_version", 0))
        if schema > len(MIGRATIONS):
            raise StoreError(
                f"store {self.path} has schema version {schema}, newer than this refusalscope "
                f"({len(MIGRATIONS)}); upgrade refusalscope"
            )

    def _meta(self) -> dict[str, str]:
        with self.connect() as con:
            has = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
            ).fetchall()[0][0]
            if not has:
                return {}
            return dict(con.execute("SELECT key, value FROM meta").fetchall())

    def _migrate(self) -> None:
        with self.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                con.execute("INSERT INTO meta VALUES ('format_version', ?), ('schema_version', '0')",
                            [str(FORMAT_VERSION)])
                meta = {"format_version": str(FORMAT_VERSION), "schema_version": "0"}
        self._check_version()
        done = self._renumbered(int(meta.get("schema_version", 0)))
        for version, sql in enumerate(MIGRATIONS[done:], start=done + 1):
            with self.transaction() as con:
                # another process opening the store for writing may have applied it meanwhile
                now = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0]
                if int(now) < version:
                    con.execute(sql)
                    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])

    def _renumbered(self, done: int) -> int:
        """The schema version to migrate from. The attribution branch numbered its migration 0013; on main it
        is 0014, after 0013_stats. A store made on that branch is at schema version 12 (file 0013 is the 12th
        migration) with the attribution tables but without 0013_stats' tables: it goes back to 11 and applies
        both (each is idempotent: IF NOT EXISTS throughout)."""
        if done != 12:
            return done
        with self.transaction() as con:
            has_stats = con.execute("SELECT count(*) FROM information_schema.tables "
                                    "WHERE table_name = 'paired_tests'").fetchall()[0][0]
            if not has_stats:
                con.execute("UPDATE meta SET value = '11' WHERE key = 'schema_version'")
                return 11
        return done

    # ---- connections ---------------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived catalog connection; waits up to LOCK_TIMEOUT_S for another writer."""
        ro = self.read_only if read_only is None else read_only
        con = self._retry_locked(lambda: duckdb.connect(str(self.path / CATALOG), read_only=ro))
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def sandboxed(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for user SQL: the catalog attached read-only, then no file, network or settings.

        An in-memory database attaches the catalog and `USE`s it, then turns external access off
        and locks the configuration: COPY, ATTACH, read_csv/read_text/glob, INSTALL/LOAD all fail.
        """
        con = duckdb.connect(":memory:")
        try:
            catalog = str(self.path / CATALOG).replace("'", "''")
            self._retry_locked(lambda: con.execute(f"ATTACH '{catalog}' AS {CATALOG_ALIAS} (READ_ONLY)"))
            con.execute(f"USE {CATALOG_ALIAS}")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            yield con
        finally:
            con.close()

    def _retry_locked(self, open_: Any) -> Any:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        delay = 0.02
        while True:
            try:
                return open_()
            except duckdb.Error as err:
                if not _is_lock_error(err) or time.monotonic() > deadline:
                    raise StoreError(f"store {self.path} is busy or unreadable: {_one_line(err)}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write transaction: all or nothing."""
        if self.read_only:
            raise StoreError(f"store {self.path} was opened read-only")
        with self.connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---- queries -------------------------------------------------------------------------
    def sql(self, query: str, params: list[Any] | None = None,
            frames: dict[str, pl.DataFrame] | None = None) -> pl.DataFrame:
        """Run one query on the catalog and return its result as a polars DataFrame.

        `frames` are registered as tables under their names for this query (joins with data in hand).
        """
        with self.connect() as con:
            for name, frame in (frames or {}).items():
                con.register(name, frame.to_arrow())
            try:
                rel = con.sql(query, params=params or None)
                return pl.DataFrame() if rel is None else rel.pl()
            except duckdb.Error as err:
                raise UsageError(f"SQL error: {_one_line(err)}") from None

    def read_only_sql(self, query: str) -> pl.DataFrame:
        """Run one user query (`cli.py sql`): a single reading statement, sandboxed (see `sandboxed`)."""
        check_read_only(query)
        with self.sandboxed() as con:
            try:
                rel = con.sql(query)
                return pl.DataFrame() if rel is None else rel.pl()
            except duckdb.Error as err:
                raise UsageError(f"SQL error: {_one_line(err)}") from None

    def fetch_numpy(self, query: str, params: list[Any] | None = None,
                    frames: dict[str, pl.DataFrame] | None = None) -> dict[str, np.ndarray]:
        """Run one query and return its columns as numpy arrays (no polars/pandas detour)."""
        with self.connect() as con:
            for name, frame in (frames or {}).items():
                con.register(name, frame.to_arrow())
            try:
                return con.sql(query, params=params or None).fetchnumpy()
            except duckdb.Error as err:
                raise UsageError(f"SQL error: {_one_line(err)}") from None

    def run_info(self, run_id: str) -> dict[str, Any] | None:
        """The `runs` row of one run as a dict, JSON columns decoded; None when absent."""
        df = self.sql("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if df.is_empty():
            return None
        row = df.row(0, named=True)
        for key in ("sae_set", "intervention", "settings"):
            row[key] = json.loads(row[key]) if row[key] else None
        return row

    # ---- arrays --------------------------------------------------------------------------
    def run_arrays(self, run_id: str) -> Path:
        """The directory of one run's arrays: arrays.zarr/runs/<run_id> (a UPath for a URL store)."""
        return self.arrays_root / "runs" / run_id

    def array_path(self, run_id: str, name: str) -> Path:
        """Where one run's array lives: arrays.zarr/runs/<run_id>/<name> (a UPath for a URL store)."""
        return self.arrays_root / "runs" / run_id / name

    def open_array(self, run_id: str, name: str) -> zarr.Array:
        path = self.array_path(run_id, name)
        if not (path / "zarr.json").exists():
            raise StoreError(f"no array {name} for run {run_id} in {self.path}")
        return zarr.open_array(str(path), mode="r", config=ZARR_CONFIG)

    def read_rows(self, run_id: str, name: str, rows: np.ndarray) -> np.ndarray:
        """Gather rows of one run's array (rows need not be sorted or unique).

        Raises StoreDamaged when a chunk file holding any of the rows is missing or unreadable.
        """
        arr = self.open_array(run_id, name)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        if rows.min() < 0 or rows.max() >= arr.shape[0]:
            raise StoreError(f"rows {int(rows.min())}..{int(rows.max())} are outside run {run_id}'s "
                             f"{name} (0..{arr.shape[0] - 1})")
        touched = np.unique(rows // arr.chunks[0]).tolist()
        for problem in chunk_problems(arr, self.array_path(run_id, name), touched):
            raise self.damaged(run_id, name, problem.file, problem.problem)
        try:
            order = np.argsort(rows, kind="stable")
            lo, hi = int(rows[order[0]]), int(rows[order[-1]]) + 1
            if hi - lo <= 4 * rows.size:              # dense enough: one slice read is cheaper
                block = arr[lo:hi]
                return np.asarray(block[rows - lo])
            return np.asarray(arr.get_orthogonal_selection((rows,)))
        except Exception:                             # a chunk that is there but does not decode
            for coords, key in chunk_keys(arr, touched):
                why = decode_problem(arr, coords)
                if why:
                    raise self.damaged(run_id, name, self.array_path(run_id, name) / key, why) from None
            raise

    def damaged(self, run_id: str, name: str, file: Path, problem: str) -> StoreDamaged:
        """The one-line error for a damaged chunk file of a run's array."""
        what = f"layer {name.split('/')[1]} ({name})" if name.startswith("resid/") else f"array {name}"
        return StoreDamaged(f"store damaged: run {run_id} {what}: {file} is {problem}; run "
                            f"`python cli.py store check --repair --store {self.path}`, then the same extract again")


def check_read_only(query: str) -> None:
    """Refuse (UsageError) anything but one statement that only reads the catalog."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise UsageError(f"SQL error: {_one_line(err)}") from None
    if len(statements) != 1:
        raise UsageError(f"give exactly one read-only SQL statement ({READ_ONLY_HELP}), got {len(statements)}")
    statement = statements[0]
    kind = statement.type
    text = statement.query.strip().rstrip(";").strip()
    if kind == duckdb.StatementType.EXPLAIN:            # EXPLAIN [ANALYZE] runs its statement: check that one
        inner = re.sub(r"^explain(\s+analy[sz]e)?\s+", "", text, flags=re.IGNORECASE)
        if inner == text:
            raise UsageError(f"cannot read the EXPLAIN statement; only read-only SQL is allowed ({READ_ONLY_HELP})")
        check_read_only(inner)
        return
    if kind == duckdb.StatementType.PRAGMA:
        name = re.match(r"pragma\s+(\w+)", text, flags=re.IGNORECASE)
        if name and name.group(1).lower() in READ_ONLY_PRAGMAS:
            return
        raise UsageError(f"the store's SQL is read-only: only PRAGMA {', '.join(READ_ONLY_PRAGMAS)} are allowed")
    if kind != duckdb.StatementType.SELECT:
        raise UsageError(f"the store's SQL is read-only: {kind.name} statements are refused; "
                         f"use {READ_ONLY_HELP}")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _url_root(url: str, why: str | None = None) -> Any:
    """A UPath for an fsspec URL; a one-line error when universal_pathlib is not installed."""
    try:
        from upath import UPath
    except ImportError:
        raise UsageError(f"{why or f'arrays at {url}'}: pip install 'refusalscope[cloud]' "
                         f"(universal_pathlib and s3fs or gcsfs)") from None
    # no listings cache: zarr writes through its own filesystem object, a cached listing goes stale
    return UPath(url, use_listings_cache=False)


def _ensure_group(root: Any) -> None:
    """The Zarr v3 group at the root of the arrays, created when missing."""
    if (root / "zarr.json").exists():
        return
    try:
        zarr.open_group(str(root), mode="a", zarr_format=3)
    except zarr.errors.ContainsGroupError:              # another process created it meanwhile
        pass
