"""Issue 13: the sql command is sandboxed, damaged arrays are caught, writers do not race, resume is per batch."""

import sys
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli import app
from queries.run import named_queries, run_query
from store import Store, UsageError

sys.path.insert(0, str(Path(__file__).parent))
from test_store import write_run  # noqa: E402


# ---- 1. `cli.py sql` reads this store's catalog and nothing else ------------------------------

@pytest.fixture
def sql_store(tmp_path):
    path = tmp_path / "s"
    write_run(Store.create(path), "r1")
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t AS SELECT 42 AS x")
    con.close()
    return path, other


def cli_sql(path, query):
    res = CliRunner().invoke(app, ["sql", query, "--store", str(path), "--format", "csv"])
    return res.exit_code, res.output.strip().splitlines()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("query", [
    "COPY (SELECT * FROM runs) TO '{tmp}/x.csv'",
    "COPY (SELECT 1 AS a) TO '{store}/arrays.zarr/zarr.json' (FORMAT json)",
    "ATTACH '{other}' AS v (READ_WRITE)",
    "SELECT 1; ATTACH '{other}' AS v (READ_WRITE); DELETE FROM v.t",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{store}/staging/*/*.parquet')",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "EXPORT DATABASE '{tmp}/exported'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/x.csv'",
    "PRAGMA enable_profiling",
    "CALL pragma_table_info('runs')",
    "DELETE FROM runs",
    "USE memory",
    "DETACH catalog",
    "SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')",
])
def test_sql_escapes_are_refused(sql_store, tmp_path, query):
    path, other = sql_store
    before_store, before_other = tree(path), other.read_bytes()
    code, lines = cli_sql(path, query.format(tmp=tmp_path, store=path, other=other))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "root:" not in lines[0]                              # nothing of /etc/passwd comes back
    assert tree(path) == before_store and other.read_bytes() == before_other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.duckdb", "s"]
    assert Store.open(path).sql("SELECT count(*) AS n FROM runs")["n"][0] == 1


def test_statement_kinds_outside_the_allow_list_say_read_only(sql_store):
    path, _ = sql_store
    for query in ("DROP TABLE prompts", "UPDATE runs SET status = 'x'", "CREATE TABLE z (a INT)", "SELECT 1; SELECT 2"):
        code, lines = cli_sql(path, query)
        assert code == 2 and len(lines) == 1 and "read-only" in lines[0], (query, lines)


@pytest.mark.parametrize("query, first_line", [
    ("SELECT count(*) AS n FROM sae_acts", "n"),
    ("WITH x AS (SELECT run_id FROM runs) SELECT * FROM x", "run_id"),
    ("FROM runs SELECT status", "status"),
    ("DESCRIBE runs", "column_name,column_type,null,key,default,extra"),
    ("SUMMARIZE SELECT row FROM tokens", None),
    ("SHOW TABLES", "name"),
    ("EXPLAIN SELECT 1", "explain_key,explain_value"),
    ("PRAGMA table_info('runs')", "cid,name,type,notnull,dflt_value,pk"),
    ("SELECT 1 AS a;", "a"),
])
def test_reading_statements_still_work(sql_store, query, first_line):
    path, _ = sql_store
    code, lines = cli_sql(path, query)
    assert code == 0, lines
    if first_line is not None:
        assert lines[0] == first_line


def test_named_queries_go_through_the_same_checks(sql_store):
    path, _ = sql_store
    for name in named_queries():
        run_query(path, None, name)                             # each is one reading statement
    with pytest.raises(UsageError, match="read-only"):
        run_query(path, "COPY runs TO 'x.csv'", None)
