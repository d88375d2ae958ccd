"""Issue 13: the sql command is sandboxed, damaged arrays are caught, writers do not race, resume is per batch."""

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
from extract.datasets import Prompt, prompt_id
from extract.models import load_model
from extract.run import ExtractSettings, extract, make_items
from queries.run import named_queries, run_query
from queries.tensors import residuals
from store import RunWriter, Store, UsageError, begin_run
from store.check import check_store, summary_lines
from store.errors import StoreDamaged

sys.path.insert(0, str(Path(__file__).parent))
from store_worker import D_MODEL, chunk_payload, plan  # noqa: E402
from test_extract import TEXTS  # noqa: E402
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


# ---- 2. a missing or truncated chunk is named, never read as zeros -------------------------------

def damaged_store(tmp_path):
    """A committed run of 3 Zarr chunks (rows filled with their chunk number) and one clean run."""
    store = Store.create(tmp_path / "s")
    write_run(store, "r1", n_chunks=3, rows=256)
    write_run(store, "clean", n_chunks=2, rows=7)
    resid = store.array_path("r1", "resid/3")
    (resid / "c" / "1" / "0").unlink()
    chunk2 = resid / "c" / "2" / "0"
    chunk2.write_bytes(chunk2.read_bytes()[:100])
    return store, resid


def test_missing_or_truncated_chunk_raises_one_line_naming_the_file(tmp_path):
    store, resid = damaged_store(tmp_path)
    ok = residuals(store, pl.DataFrame({"run_id": ["r1", "r1"], "row": [0, 255]}), layer=3)
    assert torch.equal(ok, torch.zeros(2, D_MODEL))                       # chunk 0 is intact (and zeros)
    for row, file, problem in [(300, resid / "c/1/0", "missing"), (700, resid / "c/2/0", "truncated (100 of 8192 bytes)")]:
        with pytest.raises(StoreDamaged) as err:
            residuals(store, pl.DataFrame({"run_id": ["r1"], "row": [row]}), layer=3)
        message = str(err.value)
        assert "\n" not in message and isinstance(err.value, UsageError)
        assert message.startswith(f"store damaged: run r1 layer 3 (resid/3): {file} is {problem}; ")
    res = CliRunner().invoke(app, ["sql", "SELECT 1", "--store", str(tmp_path / "s")])
    assert res.exit_code == 0                                             # the catalog itself is fine


def test_check_store_finds_damage_and_reports_only(tmp_path):
    store, resid = damaged_store(tmp_path)
    clean = store.array_path("clean", "resid/3") / "c" / "0" / "0"
    flipped = bytearray(clean.read_bytes())
    flipped[5] ^= 0xFF
    clean.write_bytes(bytes(flipped))                                     # same size, other bytes
    result = check_store(store, repair=False)
    assert (result.n_runs, result.n_arrays, result.n_chunks) == (2, 2, 4)
    assert [(d.run_id, d.layer, d.array, d.problem, d.file) for d in result.damaged] == [
        ("clean", 3, "resid/3", "corrupt (checksum differs from the one recorded at commit)", str(clean)),
        ("r1", 3, "resid/3", "missing", str(resid / "c/1/0")),
        ("r1", 3, "resid/3", "truncated (100 of 8192 bytes)", str(resid / "c/2/0")),
    ]
    assert result.repaired == ()
    lines = summary_lines(result)
    assert lines[0] == f"damaged: run clean resid/3: {clean} is corrupt (checksum differs from the one recorded at commit)"
    assert lines[-1] == ("2 committed runs, 2 arrays, 4 chunk files checked; 2 damaged runs (clean, r1): "
                         "run `python cli.py store check --repair`, then the same extractions again")
    assert Store.open(store.path).sql("SELECT count(*) AS n FROM runs WHERE status = 'complete'")["n"][0] == 2
    assert (resid / "c/2/0").exists()                                     # report only: nothing removed


def test_check_store_on_a_sound_store(tmp_path):
    store = Store.create(tmp_path / "s")
    write_run(store, "r1", n_chunks=2, rows=300)
    result = check_store(store, repair=False)
    assert result.damaged == () and summary_lines(result) == ["store ok: 1 committed runs, 1 arrays, 3 chunk files checked"]


def test_a_run_without_recorded_chunks_is_held_to_its_shape(tmp_path):
    store, _ = damaged_store(tmp_path)
    with store.transaction() as con:                                      # as if committed before migration 10
        con.execute("DELETE FROM array_chunks")
    problems = [(d.run_id, d.problem) for d in check_store(store).damaged]
    assert problems == [("r1", "missing"), ("r1", "truncated (100 of 8192 bytes)")]


def test_repair_then_the_same_extraction_recomputes(tmp_path, tiny_model_dirs):
    model = load_model(str(tiny_model_dirs("qwen2")))
    store = Store.create(tmp_path / "s")
    items = make_items(model, [Prompt(prompt_id("t", t), "t", i, "train", i % 2, None, t) for i, t in enumerate(TEXTS)])
    settings = ExtractSettings(layers=(0, 1), batch_size=2, generate=2)
    first = extract(store, model, items, settings=settings)
    rows = store.sql("SELECT run_id, row FROM tokens ORDER BY row")
    before = {layer: residuals(store, rows, layer) for layer in (0, 1)}
    counts = store.sql("SELECT (SELECT count(*) FROM tokens) AS t, (SELECT count(*) FROM items) AS i, "
                       "(SELECT count(*) FROM layers) AS l, (SELECT count(*) FROM array_chunks) AS c")
    (store.array_path(first.run_id, "resid/1") / "c/0/0").unlink()
    truncated = store.array_path(first.run_id, "resid/0") / "c/0/0"
    truncated.write_bytes(truncated.read_bytes()[:64])
    with pytest.raises(StoreDamaged, match="is missing"):
        residuals(store, rows, 1)

    result = check_store(store, repair=True)
    assert {(d.layer, d.problem.split()[0]) for d in result.damaged} == {(1, "missing"), (0, "truncated")}
    assert result.repaired == (first.run_id,)
    assert "marked for recompute" in summary_lines(result)[-1]
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["damaged"]

    again = extract(store, model, items, settings=settings)
    assert again.run_id == first.run_id and not again.cached
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["complete"]
    assert store.sql("SELECT (SELECT count(*) FROM tokens) AS t, (SELECT count(*) FROM items) AS i, "
                     "(SELECT count(*) FROM layers) AS l, (SELECT count(*) FROM array_chunks) AS c").equals(counts)
    for layer in (0, 1):
        torch.testing.assert_close(residuals(store, rows, layer), before[layer])
    assert check_store(store).damaged == ()
    assert extract(store, model, items, settings=settings).cached


# ---- 3. two identical writers at once ---------------------------------------------------------

WORKER = Path(__file__).parent / "store_worker.py"


@pytest.mark.parametrize("round_", range(5))
def test_two_identical_writers_race(tmp_path, round_):
    path = tmp_path / "s"                       # not created yet: both writers create and migrate it too
    args = [sys.executable, str(WORKER), str(path), "same", "4", "50", "0.05"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert all("Traceback" not in err for _, err in outs), outs
    last = sorted(out.split()[-1] for out, _ in outs)
    assert last == ["cached", "committed"], outs                # the second one waited, then reused the run
    store = Store.open(path)
    stats = store.sql("SELECT count(*) AS n, count(DISTINCT row) AS d FROM sae_acts")
    assert stats["n"][0] == stats["d"][0] == 200
    assert store.sql("SELECT count(*) AS n FROM runs")["n"][0] == 1
    assert store.sql("SELECT count(*) AS n, count(DISTINCT chunk_key) AS d FROM array_chunks").row(0) == (1, 1)
    np.testing.assert_array_equal(store.read_rows("same", "resid/3", np.arange(200))[:, 0], np.repeat(np.arange(4), 50))


def test_a_writer_that_will_not_wait_names_the_other_pid(tmp_path):
    path = tmp_path / "s"
    Store.create(path)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(path), "busy", "3", "10", "30"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "chunk 0"
        with pytest.raises(UsageError, match=f"^run busy is being written by pid {proc.pid}; wait for it"):
            begin_run(Store.open(path, read_only=False), plan("busy", 3, 10), wait=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    writer = begin_run(Store.open(path, read_only=False), plan("busy", 3, 10), wait=False)   # kill -9 freed it
    assert writer is not None and writer.done_chunks() == {0}
    writer.abort()


def test_commit_is_idempotent(tmp_path):
    store = Store.create(tmp_path / "s")
    write_run(store, "r1")
    writer = RunWriter(store, plan("r1", 3, 5))                # a stray writer that did not take the lock
    writer.array("resid/3", (15, D_MODEL))
    writer.submit(0, *chunk_payload("r1", 0, 5))
    assert writer.commit() is False
    assert store.sql("SELECT count(*) AS n FROM sae_acts")["n"][0] == 15


# ---- 4. resume keeps every finished batch -----------------------------------------------------

def test_killed_extraction_recomputes_at_most_the_batch_in_flight(tmp_path, tiny_model_dirs):
    model_dir = str(tiny_model_dirs("qwen2"))
    path = tmp_path / "s"
    worker = [sys.executable, str(Path(__file__).parent / "extract_worker.py"), model_dir, str(path), "24", "4"]
    proc = subprocess.Popen([*worker, "1.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    k = 3                                                    # 24 prompts, 6 batches: kill after the 3rd
    for _ in range(k):
        assert proc.stdout.readline().strip() == "batch"
    markers = path / "staging"
    deadline = time.monotonic() + 0.8                        # the worker sleeps 1 s before the next forward
    while len(list(markers.glob("*/chunk-*.done"))) < k and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(markers.glob("*/chunk-*.done")))
    assert done_before == k                                  # batch 3 ends inside a Zarr chunk: marked anyway

    rerun = subprocess.run([*worker, "0"], capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    forwards = int(rerun.stdout.split()[-1])
    assert forwards == 6 - k                                 # no finished batch is recomputed

    store = Store.open(path)
    assert store.sql("SELECT status FROM runs")["status"].to_list() == ["complete"]
    stats = store.sql("SELECT count(*) AS n, count(DISTINCT row) AS d FROM tokens")
    n_rows = store.sql("SELECT n_rows FROM runs")["n_rows"][0]
    assert stats["n"][0] == stats["d"][0] == n_rows
    fresh = Store.create(tmp_path / "fresh")                 # the same run, uninterrupted
    model = load_model(model_dir)
    from extract_worker import worker_prompts
    result = extract(fresh, model, make_items(model, worker_prompts(24)), settings=ExtractSettings(layers=(0, 1), batch_size=4))
    assert result.run_id == store.sql("SELECT run_id FROM runs")["run_id"][0]
    for layer in (0, 1):
        np.testing.assert_allclose(store.read_rows(result.run_id, f"resid/{layer}", np.arange(n_rows)),
                                   fresh.read_rows(result.run_id, f"resid/{layer}", np.arange(n_rows)), atol=1e-6)
    assert check_store(store).damaged == ()


# ---- 5. a feature card for an impossible feature says why --------------------------------------

def test_feature_card_out_of_range(tmp_path):
    from datetime import datetime

    from analyze import cards
    from tests.planted_acts import planted_store
    store = planted_store(tmp_path / "s")
    with store.transaction() as con:
        con.execute("INSERT INTO saes VALUES ('m/x/layer_3', 'planted', 3, 'sae3', 'topk', 8, 16, NULL, NULL, ?)",
                    [datetime(2026, 1, 1)])
    with pytest.raises(UsageError, match=r"^feature 3:99999: feature id out of range 0\.\.15 "
                                         r"\(the store's layer-3 SAEs have d_sae 16\)$"):
        cards.card(store, 3, 99999)
    with pytest.raises(UsageError, match=r": layer 99 has no SAE activations there \(layers with SAE activations: 2, 3\)$"):
        cards.card(store, 99, 1)
    with pytest.raises(UsageError, match=r"^feature 3:15 never fires in the unablated runs of "):
        cards.card(store, 3, 15)                               # in range, silent
