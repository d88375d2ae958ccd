"""A store whose arrays live on an S3-compatible server (moto, in this process on 127.0.0.1): create, write a
run, commit, read back, kill -9 and resume, check; the catalog stays a local DuckDB file."""

import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store import Store, UsageError

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("upath")

sys.path.insert(0, str(Path(__file__).parent))
from test_store import write_run  # noqa: E402

WORKER = Path(__file__).parent / "store_worker.py"
BUCKET = "refusalscope-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on a free 127.0.0.1 port (a thread of this process: stopped with it), with one bucket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)                  # the store_worker subprocess inherits them
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        yield s3fs.S3FileSystem()
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def url(tmp_path) -> str:
    return f"s3://{BUCKET}/{tmp_path.name}/arrays.zarr"


def test_round_trip_with_arrays_on_s3(s3, tmp_path):
    store = Store.create(tmp_path / "s", arrays=url(tmp_path))
    write_run(store, "r1")
    again = Store.open(tmp_path / "s")
    assert again.arrays_url == url(tmp_path)
    assert again.run_info("r1")["status"] == "complete"
    got = again.read_rows("r1", "resid/3", np.array([14, 0, 7]))
    np.testing.assert_array_equal(got[:, 0], [2, 0, 1])
    assert not (tmp_path / "s" / "arrays.zarr").exists()                # nothing local but the catalog
    chunks = s3.find(f"{BUCKET}/{tmp_path.name}/arrays.zarr/runs/r1/resid/3/c")
    recorded = again.sql("SELECT count(*) AS n FROM array_chunks WHERE run_id = 'r1'")["n"][0]
    assert len(chunks) == recorded == 1                                  # 15 rows: one 256-row chunk


def test_kill_9_then_resume_on_s3(s3, tmp_path):
    path = tmp_path / "s"
    Store.create(path, arrays=url(tmp_path))
    proc = subprocess.Popen([sys.executable, str(WORKER), str(path), "killed", "6", "50", "0.4"],
                            stdout=subprocess.PIPE, text=True)
    seen = [proc.stdout.readline().strip() for _ in range(2)]
    assert seen == ["chunk 0", "chunk 1"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store.open(path)
    assert store.run_info("killed")["status"] == "running"
    out = subprocess.run([sys.executable, str(WORKER), str(path), "killed", "6", "50", "0"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert "chunk 0" not in out and "chunk 1" not in out and "committed" in out
    counts = store.sql("SELECT count(*) AS n, count(DISTINCT row) AS d FROM sae_acts WHERE run_id = 'killed'")
    assert counts["n"][0] == counts["d"][0] == 300
    resid = store.read_rows("killed", "resid/3", np.arange(300))
    np.testing.assert_array_equal(resid[:, 0], np.repeat(np.arange(6), 50))


def test_check_finds_a_chunk_deleted_from_the_bucket(s3, tmp_path):
    from store.check import check_store

    store = Store.create(tmp_path / "s", arrays=url(tmp_path))
    write_run(store, "r1", n_chunks=6, rows=50)                          # 300 rows: two chunks
    assert not check_store(Store.open(tmp_path / "s")).damaged
    s3.rm(f"{BUCKET}/{tmp_path.name}/arrays.zarr/runs/r1/resid/3/c/1/0")
    assert check_store(Store.open(tmp_path / "s")).damaged_runs == ("r1",)
    meta = f"{BUCKET}/{tmp_path.name}/arrays.zarr/runs/r1/resid/3/zarr.json"
    s3.pipe(meta, b"{not json")                                        # bad metadata: the array goes
    assert check_store(Store.open(tmp_path / "s", read_only=False), repair=True).repaired == ("r1",)
    assert not s3.exists(meta) and not s3.exists(meta.rsplit("/", 1)[0])


def test_extraction_on_s3_equals_the_local_store(s3, planted, planted_model, tmp_path):
    from extract.datasets import load_prompts
    from extract.run import ExtractSettings, extract, make_items
    from extract.saes import SaeRef, load_sae

    items = make_items(planted_model, load_prompts(str(planted.harmful))[:12])
    saes = [SaeRef(layer, str(d), load_sae(str(d), layer)) for layer, d in planted.sae_dirs.items()]
    settings = ExtractSettings(layers=(1, 2), batch_size=4)
    local, remote = Store.create(tmp_path / "local"), Store.create(tmp_path / "s", arrays=url(tmp_path))
    run_id = extract(local, planted_model, items, saes, settings).run_id
    assert extract(remote, planted_model, items, saes, settings).run_id == run_id
    for layer in settings.layers:
        rows = np.arange(local.run_info(run_id)["n_rows"])
        assert np.array_equal(local.read_rows(run_id, f"resid/{layer}", rows),
                              remote.read_rows(run_id, f"resid/{layer}", rows))
    query = "SELECT * FROM sae_acts WHERE run_id = ? ORDER BY ALL"
    assert local.sql(query, [run_id]).equals(remote.sql(query, [run_id]))


def test_url_usage_errors(s3, tmp_path):
    with pytest.raises(UsageError, match="--store is the local directory of the catalog"):
        Store.create(f"s3://{BUCKET}/x")
    Store.create(tmp_path / "s", arrays=url(tmp_path))
    with pytest.raises(UsageError, match="keeps its arrays at s3://"):
        Store.create(tmp_path / "s", arrays=f"s3://{BUCKET}/elsewhere")
    with pytest.raises(UsageError, match="must be a URL"):
        Store.create(tmp_path / "t", arrays="not-a-url")


def test_an_unwritable_arrays_url_fails_in_one_line_and_binds_nothing(s3, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from tests.conftest import assert_one_error

    path = tmp_path / "s"
    res = CliRunner().invoke(app, ["store", "init", "--store", str(path), "--arrays", "s3://no-such-bucket-rs/a"])
    assert_one_error(res, "error: cannot create the arrays at s3://no-such-bucket-rs/a: FileNotFoundError: "
                          "The specified bucket does not exist")
    assert Store.open(path).arrays_url is None                      # the catalog is not bound to the bad URL
    store = Store.create(path, arrays=url(tmp_path))                 # so the corrected command works
    assert store.arrays_url == url(tmp_path) and (store.arrays_root / "zarr.json").exists()
