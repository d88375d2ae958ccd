"""Extraction and stage evaluations on a local Ray cluster of 2 workers equal the in-process path; a killed
worker's batches are computed again elsewhere, once."""

import os
import signal
from dataclasses import asdict

import numpy as np
import pytest

from extract import workers
from extract.workers import WorkerSettings
from store import Store, UsageError

ray = pytest.importorskip("ray")

RUN_TABLES = ("items", "tokens", "sae_acts")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module, shut down (every Ray process gone) after it."""
    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(workers.PROJECT_ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool2(cluster, planted_model):
    pool = workers.RayPool.start(WorkerSettings(n=2), planted_model)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def planted_items(planted, planted_model):
    from extract.datasets import load_prompts
    from extract.run import make_items

    prompts = load_prompts(str(planted.harmful))[:24] + load_prompts(str(planted.benign))[:24]
    return make_items(planted_model, prompts)


@pytest.fixture(scope="module")
def planted_saes(planted):
    from extract.saes import SaeRef, load_sae

    return [SaeRef(layer, str(d), load_sae(str(d), layer)) for layer, d in planted.sae_dirs.items()]


SETTINGS = dict(layers=(1, 2, 3), batch_size=4, generate=3, save_logits=True)


@pytest.fixture(scope="module")
def in_process(planted_model, planted_items, planted_saes, tmp_path_factory):
    """The run computed in this process: (store, run id)."""
    from extract.run import ExtractSettings, extract

    store = Store.create(tmp_path_factory.mktemp("local") / "s")
    result = extract(store, planted_model, planted_items, planted_saes, ExtractSettings(**SETTINGS))
    return store, result.run_id


def assert_same_run(a: Store, b: Store, run_id: str) -> None:
    """Same rows in every run table and bit-identical arrays."""
    for table in RUN_TABLES:
        query = f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL"
        left, right = a.sql(query, [run_id]), b.sql(query, [run_id])
        assert len(left) > 0 and left.equals(right), table
    names = [f"resid/{layer}" for layer in SETTINGS["layers"]] + ["completion_ids", "logits_last"]
    for name in names:
        x, y = a.open_array(run_id, name)[:], b.open_array(run_id, name)[:]
        assert x.dtype == y.dtype and np.array_equal(x, y), name     # bit-identical (fp32 on CPU)


def test_two_workers_extract_the_same_run_as_one_process(pool2, in_process, planted_model, planted_items,
                                                         planted_saes, tmp_path):
    from extract.run import ExtractSettings, extract

    local, run_id = in_process
    store = Store.create(tmp_path / "s")
    with workers.using(pool2):
        result = extract(store, planted_model, planted_items, planted_saes, ExtractSettings(**SETTINGS))
    assert result.run_id == run_id and not result.cached
    assert store.run_info(run_id)["status"] == "complete"
    assert_same_run(local, store, run_id)
    assert pool2.status().startswith("2/2 workers alive")


def test_a_run_started_in_process_finishes_on_workers(pool2, in_process, planted_model, planted_items,
                                                      planted_saes, tmp_path):
    """Resume across pools: the batches staged before are kept, the rest come from the workers."""
    from extract.run import ExtractSettings, extract

    local, run_id = in_process
    store = Store.create(tmp_path / "s")

    def stop_after_three(_n, _tokens, seen=[0]):                     # noqa: B006 (one call's counter)
        seen[0] += 1
        if seen[0] == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        extract(store, planted_model, planted_items, planted_saes, ExtractSettings(**SETTINGS), stop_after_three)
    assert store.run_info(run_id)["status"] == "running"
    with workers.using(pool2):
        extract(store, planted_model, planted_items, planted_saes, ExtractSettings(**SETTINGS))
    assert_same_run(local, store, run_id)


def test_a_killed_worker_loses_nothing_and_duplicates_nothing(pool2, in_process, planted_model, planted_items,
                                                              planted_saes, tmp_path):
    from extract.run import ExtractSettings, extract

    local, run_id = in_process
    victim = ray.get(pool2.actors[0].pid.remote())
    killed = []

    def kill_after_first_batch(_n, _tokens):
        if not killed:                                                  # SIGKILL mid-run, its batches in flight
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
    store = Store.create(tmp_path / "s")
    with workers.using(pool2):
        extract(store, planted_model, planted_items, planted_saes, ExtractSettings(**SETTINGS), kill_after_first_batch)
    assert killed and pool2.n_retried >= 1
    assert pool2.status() == "2/2 workers alive, 1 replaced"            # a fresh actor took the dead one's place
    assert victim not in ray.get([a.pid.remote() for a in pool2.actors])
    assert store.run_info(run_id)["status"] == "complete"
    dupes = store.sql("SELECT count(*) - count(DISTINCT item) AS n FROM items WHERE run_id = ?", [run_id])["n"][0]
    assert dupes == 0
    assert_same_run(local, store, run_id)


def test_stage_1_and_stage_2_decide_the_same_on_two_workers(pool2, planted, planted_stage1, tmp_path):
    """The stages run unchanged; only their evaluations go to the pool: same ids, same verdicts, same sets."""
    from analyze import candidates, direction, prune
    from analyze.prune import PruneSettings
    from tests.planted import candidate_settings, direction_settings

    local, model = planted_stage1
    prune_settings = PruneSettings(judge="p_i", taus=(0.2, 0.5), seeds=(0, 1))
    on_local = prune.run(local, model, prune_settings)
    store = Store.create(tmp_path / "s")
    with workers.using(pool2):
        found = direction.run(store, model, direction_settings(planted))
        cand = candidates.run(store, model, candidate_settings(planted))
        on_ray = prune.run(store, model, prune_settings)
    assert found.direction_id == local.sql("SELECT analysis_id FROM analyses WHERE kind = 'direction'")[0, 0]
    assert cand.candidates_id == on_local.candidates_id
    for table, key, value in (("candidate_sets", "candidates_id", cand.candidates_id),
                              ("pruning_steps", "prune_id", on_ray.prune_id),
                              ("feature_sets", "set_id", on_ray.prune_id)):
        cols = [c for c in store.sql(f"SELECT * FROM {table} LIMIT 0").columns if c != "created_at"]
        sql = f"SELECT {', '.join(cols)} FROM {table} WHERE {key} = ? ORDER BY ALL"
        left, right = local.sql(sql, [value]), store.sql(sql, [value])
        assert len(left) > 0 and left.equals(right), table
    assert on_ray.prune_id == on_local.prune_id and on_ray.summary["n_jailbroken"] == on_local.summary["n_jailbroken"]


def test_worker_settings_round_trip_and_validation():
    s = WorkerSettings(n=4, ray_address="auto")
    assert WorkerSettings.from_dict(asdict(s)) == s
    with pytest.raises(UsageError, match="--workers must be >= 0"):
        WorkerSettings(n=-1)
    with pytest.raises(UsageError, match="--ray-address needs --workers"):
        WorkerSettings(ray_address="auto")


def test_the_local_pool_is_the_default_and_imports_no_ray():
    import subprocess
    import sys

    code = ("import sys; from extract import workers, run; "
            "assert workers.active() is workers.LOCAL; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=workers.PROJECT_ROOT)


def test_a_pool_larger_than_the_free_slots_fails_at_once(pool2, planted_model, monkeypatch):
    monkeypatch.setattr(workers, "SLOT_WAIT_S", 0.5)                   # slots freed late are waited for 15 s
    with pytest.raises(UsageError, match="--workers 1 needs 1 free CPU slots; the Ray cluster has 0"):
        workers.RayPool.start(WorkerSettings(n=1), planted_model)      # pool2 holds both CPUs


def test_cli_pool_options_are_checked_before_anything_loads(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from tests.conftest import assert_one_error

    runner = CliRunner()
    assert_one_error(runner.invoke(app, ["extract", "--ray-address", "auto", "--store", str(tmp_path / "s")]),
                     "error: --ray-address needs --workers N (N >= 1 Ray actors)")
    assert_one_error(runner.invoke(app, ["analyze", "prune", "--workers", "-2", "--store", str(tmp_path / "s")]),
                     "error: --workers must be >= 0, got -2")
    assert not (tmp_path / "s").exists()


def test_a_profile_sets_the_pool_and_the_options_override_it(tmp_path):
    import json

    from analyze import pipeline
    from cli_support import worker_settings

    raw = json.loads(pipeline.profile_path("quick").read_text())
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**raw, "workers": {"n": 3, "ray_address": "auto"}}))
    settings = pipeline.PipelineSettings.from_dict(pipeline.read_profile(path, 24))
    assert settings.workers == WorkerSettings(n=3, ray_address="auto")
    assert worker_settings(None, None, settings.workers) == settings.workers
    assert worker_settings(1, None, settings.workers) == WorkerSettings(n=1, ray_address="auto")
    assert worker_settings(None, None) == WorkerSettings()                 # the default: in process
    assert worker_settings(0, None, settings.workers) == WorkerSettings()  # --workers 0: back in process
    n_only = WorkerSettings(n=4)                                           # a profile's pool, a cluster given
    assert worker_settings(None, "auto", n_only) == WorkerSettings(n=4, ray_address="auto")
    assert pipeline.check_profile(path).workers == settings.workers        # what `run` checks before loading
    with pytest.raises(UsageError, match="unknown setting 'workers.count'"):
        pipeline.check_profile(_with(tmp_path, raw, {"count": 2}))


def _with(tmp_path, raw, workers_section):
    import json

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**raw, "workers": workers_section}))
    return path
