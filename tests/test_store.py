"""The store: round trips, atomic commits, kill -9 and resume, concurrent reads, versions, the sql command."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from queries.tensors import residuals, sae_codes
from store import Store, StoreError, UsageError, begin_run
from store.schema import FORMAT_VERSION, MIGRATIONS

sys.path.insert(0, str(Path(__file__).parent))
from store_worker import D_MODEL, chunk_payload, plan  # noqa: E402

WORKER = Path(__file__).parent / "store_worker.py"


def write_run(store: Store, run_id: str, n_chunks: int = 3, rows: int = 5) -> None:
    writer = begin_run(store, plan(run_id, n_chunks, rows))
    writer.array("resid/3", (n_chunks * rows, D_MODEL))
    for k in range(n_chunks):
        writer.submit(k, *chunk_payload(run_id, k, rows))
    layers = pl.DataFrame({"run_id": [run_id], "layer": [3], "d_model": [D_MODEL],
                           "resid_array": ["resid/3"], "sae_id": ["s"]})
    writer.commit({"layers": layers})


def test_round_trip_rows_and_arrays(tmp_path):
    store = Store.create(tmp_path / "s")
    write_run(store, "r1")
    again = Store.open(tmp_path / "s")
    assert again.sql("SELECT status FROM runs WHERE run_id = 'r1'")["status"].to_list() == ["complete"]
    acts = again.sql("SELECT row, feature FROM sae_acts ORDER BY row")
    assert acts["row"].to_list() == list(range(15))
    assert acts["feature"].to_list() == [k for k in range(3) for _ in range(5)]
    got = again.read_rows("r1", "resid/3", np.array([14, 0, 7]))
    np.testing.assert_array_equal(got[:, 0], [2, 0, 1])
    assert not (tmp_path / "s" / "staging" / "r1").exists()


def test_sql_plus_tensor_helpers(tmp_path):
    store = Store.create(tmp_path / "s")
    write_run(store, "r1")
    rows = store.sql("SELECT run_id, row FROM tokens UNION ALL SELECT 'r1', 11 ORDER BY 2 DESC")
    h = residuals(store, pl.DataFrame({"run_id": ["r1", "r1"], "row": [11, 2]}), layer=3)
    assert h.shape == (2, D_MODEL) and torch.equal(h[:, 0], torch.tensor([2.0, 0.0]))
    codes = sae_codes(store, pl.DataFrame({"run_id": ["r1", "r1"], "row": [6, 0]}), layer=3, d_sae=4)
    expected = torch.zeros(2, 4)
    expected[0, 1] = 1.0                  # row 6 is in chunk 1, whose single feature is 1
    expected[1, 0] = 1.0
    assert torch.equal(codes, expected)
    assert rows.height == 1               # tokens is empty in this synthetic run; the literal row remains
    with pytest.raises(UsageError, match="no residuals for run r1 layer 5"):
        residuals(store, pl.DataFrame({"run_id": ["r1"], "row": [0]}), layer=5)


def test_complete_run_is_not_begun_again(tmp_path):
    store = Store.create(tmp_path / "s")
    write_run(store, "r1")
    assert begin_run(store, plan("r1", 3, 5)) is None
    assert store.sql("SELECT count(*) AS n FROM sae_acts")["n"][0] == 15


def test_uncommitted_run_is_invisible(tmp_path):
    store = Store.create(tmp_path / "s")
    writer = begin_run(store, plan("r2", 2, 4))
    writer.array("resid/3", (8, D_MODEL))
    writer.submit(0, *chunk_payload("r2", 0, 4))
    writer.flush()
    assert store.sql("SELECT count(*) AS n FROM sae_acts")["n"][0] == 0
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["running"]
    writer.abort()


def test_failed_commit_leaves_nothing(tmp_path):
    store = Store.create(tmp_path / "s")
    writer = begin_run(store, plan("r3", 1, 4))
    writer.array("resid/3", (4, D_MODEL))
    arrays, tables = chunk_payload("r3", 0, 4)
    writer.submit(0, arrays, tables)
    bad = pl.DataFrame({"run_id": ["r3"], "layer": [3]})          # d_model is NOT NULL: the insert fails
    with pytest.raises(duckdb.Error):
        writer.commit({"layers": bad})
    assert store.sql("SELECT count(*) AS n FROM sae_acts")["n"][0] == 0
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["running"]


def test_kill_9_then_resume(tmp_path):
    path = tmp_path / "s"
    write_run(Store.create(path), "earlier")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(path), "killed", "6", "50", "0.4"],
                            stdout=subprocess.PIPE, text=True)
    seen = [proc.stdout.readline().strip() for _ in range(2)]
    assert seen == ["chunk 0", "chunk 1"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    store = Store.open(path)
    runs = dict(store.sql("SELECT run_id, status FROM runs").iter_rows())
    assert runs == {"earlier": "complete", "killed": "running"}
    assert store.sql("SELECT count(*) AS n FROM sae_acts WHERE run_id = 'killed'")["n"][0] == 0
    assert store.sql("SELECT count(*) AS n FROM sae_acts WHERE run_id = 'earlier'")["n"][0] == 15

    out = subprocess.run([sys.executable, str(WORKER), str(path), "killed", "6", "50", "0"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert "chunk 0" not in out and "chunk 1" not in out and "committed" in out
    counts = store.sql("SELECT count(*) AS n, count(DISTINCT row) AS d FROM sae_acts WHERE run_id = 'killed'")
    assert counts["n"][0] == counts["d"][0] == 300
    resid = store.read_rows("killed", "resid/3", np.arange(300))
    np.testing.assert_array_equal(resid[:, 0], np.repeat(np.arange(6), 50))


def test_sql_while_a_run_is_written(tmp_path):
    path = tmp_path / "s"
    write_run(Store.create(path), "earlier")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(path), "busy", "20", "200", "0.05"],
                            stdout=subprocess.PIPE, text=True)
    runner = CliRunner()
    results = []
    while proc.poll() is None:
        res = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM sae_acts", "--store", str(path), "--format", "csv"])
        results.append((res.exit_code, res.output))
        time.sleep(0.01)
    assert proc.returncode == 0
    assert len(results) > 3
    assert all(code == 0 for code, _ in results), results
    counts = {int(out.split()[1]) for _, out in results}
    assert counts <= {15, 15 + 20 * 200}                           # never a partial run
    final = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM sae_acts", "--store", str(path), "--format", "csv"])
    assert final.output.split()[1] == str(15 + 4000)


def test_version_mismatch_is_refused(tmp_path):
    path = tmp_path / "s"
    Store.create(path)
    con = duckdb.connect(str(path / "catalog.duckdb"))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    con.close()
    with pytest.raises(StoreError, match=f"format version 99; this refusalscope reads version {FORMAT_VERSION}"):
        Store.open(path)
    res = CliRunner().invoke(app, ["sql", "SELECT 1", "--store", str(path)])
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: store") and "format version 99" in res.output


def test_newer_schema_is_refused_and_migrations_apply(tmp_path):
    path = tmp_path / "s"
    store = Store.create(path)
    assert store.sql("SELECT value FROM meta WHERE key = 'schema_version'")["value"][0] == str(len(MIGRATIONS))
    con = duckdb.connect(str(path / "catalog.duckdb"))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(len(MIGRATIONS) + 1)])
    con.close()
    with pytest.raises(StoreError, match="newer than this refusalscope"):
        Store.open(path)


def test_a_store_from_the_attribution_branch_gets_the_stats_migration_it_skipped(tmp_path):
    # that branch numbered the attribution migration 0013; main has 0013_stats before it (0014_attribution)
    path = tmp_path / "s"
    path.mkdir()
    con = duckdb.connect(str(path / "catalog.duckdb"))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    for sql in MIGRATIONS[:11] + [MIGRATIONS[12]]:                 # 0013_stats (the 12th) skipped
        con.execute(sql)
    con.execute("INSERT INTO meta VALUES ('format_version', ?), ('schema_version', '12')", [str(FORMAT_VERSION)])
    con.close()
    store = Store.open(path, read_only=False)
    assert store.sql("SELECT value FROM meta WHERE key = 'schema_version'")["value"][0] == str(len(MIGRATIONS))
    assert store.sql("SELECT count(*) AS n FROM paired_tests")["n"][0] == 0
    assert "ci_low" in store.sql("SELECT * FROM control_asr LIMIT 0").columns
    assert store.sql("SELECT count(*) AS n FROM attribution_scores")["n"][0] == 0


def test_cli_sql_formats(tmp_path):
    path = tmp_path / "s"
    write_run(Store.create(path), "r1")
    runner = CliRunner()
    q = "SELECT feature, count(*) AS n FROM sae_acts GROUP BY feature ORDER BY feature"
    csv = runner.invoke(app, ["sql", q, "--store", str(path), "--format", "csv"])
    assert csv.exit_code == 0 and csv.output == "feature,n\n0,5\n1,5\n2,5\n\n"
    js = runner.invoke(app, ["sql", q, "--store", str(path), "--format", "json"])
    assert json.loads(js.output) == [{"feature": f, "n": 5} for f in range(3)]
    table = runner.invoke(app, ["sql", q, "--store", str(path)])
    assert table.exit_code == 0 and "(3 rows)" in table.output
    out = tmp_path / "r.parquet"
    pq = runner.invoke(app, ["sql", q, "--store", str(path), "--format", "parquet", "--out", str(out)])
    assert pq.exit_code == 0 and pl.read_parquet(out)["n"].to_list() == [5, 5, 5]


def test_cli_sql_errors(tmp_path):
    path = tmp_path / "s"
    Store.create(path)
    runner = CliRunner()
    bad = runner.invoke(app, ["sql", "SELEC nonsense", "--store", str(path)])
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SQL error: Parser Error")
    missing = runner.invoke(app, ["sql", "SELECT 1", "--store", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: no store at {tmp_path / 'nope'} (no catalog.duckdb); " \
                                      f"create one with `python cli.py extract --store {tmp_path / 'nope'}`"
    unknown = runner.invoke(app, ["sql", "--named", "nope", "--store", str(path)])
    assert unknown.exit_code == 2 and "no named query 'nope'" in unknown.output


def test_sql_is_read_only(tmp_path):
    path = tmp_path / "s"
    Store.create(path)
    res = CliRunner().invoke(app, ["sql", "DROP TABLE prompts", "--store", str(path)])
    assert res.exit_code == 2 and "read-only" in res.output
    assert Store.open(path).sql("SELECT count(*) AS n FROM prompts")["n"][0] == 0


def test_named_queries_run_on_an_empty_store(tmp_path):
    from queries.run import named_queries
    path = tmp_path / "s"
    Store.create(path)
    runner = CliRunner()
    for name in named_queries():
        res = runner.invoke(app, ["sql", "--named", name, "--store", str(path)])
        assert res.exit_code == 0, (name, res.output)
