"""Running ad-hoc and named SQL over a store, and formatting the result for the terminal."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from store import Store, UsageError

QUERY_DIR = Path(__file__).resolve().parent
FORMATS = ("table", "csv", "json", "parquet")


def named_queries() -> dict[str, Path]:
    """Name -> file of every named query shipped in queries/."""
    return {p.stem: p for p in sorted(QUERY_DIR.glob("*.sql"))}


def named_query(name: str) -> str:
    """The SQL text of one named query."""
    known = named_queries()
    if name not in known:
        raise UsageError(f"no named query {name!r}; known: {', '.join(known)}")
    return known[name].read_text()


def run_query(store_path: str | Path, query: str | None, named: str | None) -> pl.DataFrame:
    """Run one query read-only on a store's catalog: one reading statement, no file or network access.

    Named queries go through the same checks (see `Store.read_only_sql`).
    """
    if (query is None) == (named is None):
        raise UsageError("give either a QUERY or --named NAME")
    sql = named_query(named) if named else query
    return Store.open(store_path, read_only=True).read_only_sql(sql)


def format_result(df: pl.DataFrame, fmt: str, out: Path | None) -> str:
    """The text to print (empty when written to `out`)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        if out is None:
            raise UsageError("--format parquet needs --out FILE")
        df.write_parquet(out)
        return ""
    if fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = df.write_json()
    else:
        with pl.Config(tbl_rows=100, tbl_cols=20, fmt_str_lengths=60, tbl_hide_dataframe_shape=True):
            text = f"{df}\n({df.height} rows)"
    if out is not None:
        out.write_text(text)
        return ""
    return text
