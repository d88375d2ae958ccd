"""The main job (`cli.py run`) on the planted tiny model: every stage runs once, a kill resumes at the
stage it hit, a rerun skips every stage, and the SAE-training path feeds the stages its own SAEs."""

import importlib.util
import json
from dataclasses import asdict, replace

import pytest
from typer.testing import CliRunner

from analyze import pipeline, stage3
from analyze.candidates import CandidateSettings
from analyze.controls import ControlsSettings
from analyze.costs import CostsSettings
from analyze.stage3.fm import FmSettings
from analyze.pipeline import STAGES, PipelineSettings
from analyze.prune import PruneSettings
from analyze.redundancy import RedundancySettings
from analyze.report import ReportSettings
from analyze.stage3 import Stage3Settings
from cli import app
from extract import sae_train
from extract.layers import parse_layers
from store import Store, UsageError
from tests.planted import direction_settings

HAS_CONTROLS = importlib.util.find_spec("analyze.controls") is not None
EXPECTED_TO_RUN = [s for s in STAGES if HAS_CONTROLS or s != "controls"]


@pytest.fixture(scope="module")
def model(planted_model):
    return planted_model


def tiny_settings(planted, out, **overrides) -> PipelineSettings:
    """Every stage at its smallest on the planted prompts and SAEs, judged on P("I")."""
    return PipelineSettings(**{
        "profile": "test", "saes": planted.sae_specs,
        "direction": direction_settings(planted, n_random=1),
        "candidates": CandidateSettings(dataset=str(planted.harmful), split="train", n_prompts=4, ks=(8, 16, 32),
                                        judge="p_i"),
        "prune": PruneSettings(taus=(0.2, 0.5), seeds=(0,), max_prompts=2, judge="p_i"),
        "stage3": Stage3Settings(harmful=str(planted.harmful), benign=str(planted.benign), limit=40,
                             fm=FmSettings(epochs=3, device="cpu"), diagnostic_embeddings=(5,), ks=(4, 8),
                             probe_ks=(4,), judge="p_i", max_prompts=2),
        "redundancy": RedundancySettings(judge="p_i", clamp_values=(4.0,), clamp_generate=4, max_prompts=2,
                                         batch_size=8),
        "controls": ControlsSettings(ks=(1, 2)),
        "costs": CostsSettings(n_alpaca=3, n_text=2, window=16, n_xstest=3, generate=3, batch_size=4, max_prompts=2,
                               judge="p_i"),
        "n_coconot": 6, "report": ReportSettings(out=str(out), max_cards=2), **overrides})




def statuses(result) -> dict[str, str]:
    return {o.stage: o.status for o in result.stages}


def n_runs(store: Store) -> int:
    return int(store.sql("SELECT count(*) AS n FROM runs")["n"][0])


@pytest.fixture(scope="module")
def job(tmp_path_factory, planted, model):
    """The tiny job killed during stage 3, then run again: (store, settings, lines of each run, second result)."""
    root = tmp_path_factory.mktemp("job")
    store, settings = Store.create(root / "s"), tiny_settings(planted, root / "report")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    first: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage3, "run", killed)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(store, model, settings, on_stage=first.append)
    recorded = sorted(store.sql("SELECT stage FROM pipeline_stages")["stage"])
    second: list[str] = []
    result = pipeline.run(store, model, settings, on_stage=second.append)
    return store, settings, first, recorded, second, result


def test_a_killed_job_resumes_at_the_stage_it_was_in(job, planted):
    store, _, first, recorded, second, result = job
    assert [line.split(":")[0] for line in first] == ["[1/10] saes", "[2/10] direction", "[3/10] candidates",
                                                      "[4/10] prune"]
    assert recorded == sorted(["saes", "direction", "candidates", "prune"])
    assert statuses(result) == {**{s: "resumed" for s in ("saes", "direction", "candidates", "prune")},
                                **{s: "ran" for s in STAGES[4:] if s in EXPECTED_TO_RUN},
                                **({} if HAS_CONTROLS else {"controls": "skipped"})}
    assert len(second) == len(STAGES) and second[0].startswith("[1/10] saes: resumed, done before in")
    assert all(line.endswith(" s)") for line in second[4:] if "skipped" not in line)
    if not HAS_CONTROLS:
        assert "[7/10] controls: skipped (not available)" in second
    by_stage = {o.stage: o for o in result.stages}
    assert by_stage["direction"].outputs == {"layer": planted.layer}
    assert by_stage["prune"].outputs["n_sets"] == 2 and by_stage["stage3"].outputs["n_stage3_sets"] >= 1
    assert result.report == store.path.parent / "report" / "report.html" and result.report.is_file()
    assert "Stage 2: pruned sets" in result.markdown.read_text()
    rows = store.sql("SELECT stage, profile, seconds FROM pipeline_stages")
    assert sorted(rows["stage"]) == sorted(EXPECTED_TO_RUN) and set(rows["profile"]) == {"test"}
    assert all(s >= 0 for s in rows["seconds"])


def test_a_rerun_from_the_command_line_skips_every_stage(job, planted, tmp_path):
    store, settings, *_, result = job
    runs, records = n_runs(store), store.sql("SELECT * FROM pipeline_stages ORDER BY stage")
    settings_file = tmp_path / "test.json"
    settings_file.write_text(json.dumps(asdict(settings)))
    res = CliRunner().invoke(app, ["run", "--model", str(planted.model_dir), "--store", str(store.path),
                                   "--settings", str(settings_file)])
    assert res.exit_code == 0, res.output
    out = res.stdout.splitlines()
    assert [line.split(":")[0] for line in out[:-2]] == [f"[{i}/10] {s}" for i, s in enumerate(STAGES, 1)]
    assert [": resumed, done before in " in line for line in out[:-2]] == [s in EXPECTED_TO_RUN for s in STAGES]
    assert out[-2:] == [f"report: {result.report}", f"markdown: {result.markdown}"]
    assert n_runs(store) == runs
    assert store.sql("SELECT * FROM pipeline_stages ORDER BY stage").equals(records)


def test_a_lost_result_and_from_rerun_their_stages(job, model):
    store, settings, *_, result = job
    result.report.unlink()
    again = pipeline.run(store, model, settings)
    assert [o.stage for o in again.stages if o.status == "ran"] == ["report"] and again.report.is_file()
    lines: list[str] = []
    pipeline.run(store, model, settings, on_stage=lines.append, start="costs")
    for name, line in zip(STAGES, lines, strict=True):
        before = STAGES.index(name) < STAGES.index("costs")
        assert (": resumed, " in line or "skipped (" in line) if before else line.endswith(" s)"), line


def test_trained_saes_feed_every_stage(tmp_path, planted, model):
    sae = sae_train.TrainSettings(layers=(2, 3), width=32, k=4, tokens=3000, epochs=2, batch_size=256,
                                  eval_windows=2, ce_windows=1, window=32, dead_window=512, lr=3e-3)
    settings = tiny_settings(planted, tmp_path / "report", sae=sae, saes=())
    store = Store.create(tmp_path / "s")
    first = pipeline.run(store, model, settings)
    by_stage = {o.stage: o for o in first.stages}
    trained = store.sql("SELECT layer, source FROM saes ORDER BY layer")
    assert trained["layer"].to_list() == [2, 3]
    specs = [f"{layer}={store.path / source}" for layer, source in trained.iter_rows()]
    assert by_stage["saes"].status == "ran" and by_stage["saes"].outputs == {"saes": specs}
    assert by_stage["saes"].summary.startswith("2 SAEs trained, 0 reused at layers 2..3")
    used = store.sql("SELECT settings FROM analyses WHERE analysis_id = ?", [by_stage["candidates"].result_id])
    assert json.loads(used["settings"][0])["saes"] == specs
    jailbroken = by_stage["candidates"].outputs["n_jailbroken"]
    assert (by_stage["prune"].status == "skipped") == (jailbroken == 0)
    if jailbroken == 0:
        assert by_stage["prune"].summary == "stage 1 jailbroke no prompt: nothing to prune"
        assert by_stage["redundancy"].status == "skipped" and "no sweep" in by_stage["stage3"].summary
    assert first.report.is_file()
    again = pipeline.run(store, model, settings)
    assert {o.stage: o.status for o in again.stages if o.status != "skipped"} == \
        {s: "resumed" for s, o in by_stage.items() if o.status == "ran"}


def test_profiles_and_settings_round_trip(tmp_path, planted, model):
    assert parse_layers("5/12-5/8", 24, clamp=True) == tuple(range(10, 16))
    assert parse_layers("5/12-5/8", 4, clamp=True) == (2,) and parse_layers("2-2/3", 24, clamp=True) == tuple(range(2, 17))
    quick = pipeline.load_settings("quick", model, out=tmp_path / "r")
    raw = json.loads((pipeline.PROFILE_DIR / "quick.json").read_text())
    assert quick.sae.layers == (2,) and quick.sae.tokens == raw["sae"]["tokens"] and quick.prune.seeds == tuple(raw["prune"]["seeds"]) == (0, 1)
    assert quick.direction.layers == (2,) and quick.report.out == str(tmp_path / "r")
    assert pipeline.load_settings(pipeline.profile_path("quick"), model, out=tmp_path / "r") == quick
    default = pipeline.load_settings("default", model)
    assert default.sae == sae_train.TrainSettings(layers=(2, 3))
    assert default.prune == PruneSettings() and default.stage3 == Stage3Settings() and default.n_coconot is None
    for s in (quick, default, tiny_settings(planted, tmp_path)):
        assert PipelineSettings.from_dict(json.loads(json.dumps(asdict(s)))) == s
    with pytest.raises(UsageError, match="unknown setting 'prune_taus'"):
        PipelineSettings.from_dict({"prune_taus": [0.1]})
    with pytest.raises(UsageError, match="setting 'prune.taus' must be a list of numbers"):
        PipelineSettings.from_dict({"saes": ["1=x"], "prune": {"taus": "lots"}})
    with pytest.raises(UsageError, match="no SAEs"):
        PipelineSettings(sae=None, saes=())
    with pytest.raises(UsageError, match="cannot read settings"):
        pipeline.load_settings("fast", model)
    assert replace(quick, profile="x").profile == "x"


@pytest.mark.parametrize("extra, message", [
    (["--from", "stage9"], "error: --from must be one of saes, direction, candidates"),
    (["--from", "stage3", "--only", "costs"], "error: give --from or --only, not both"),
    (["--only", "prune"], "error: --only: stage saes has not run with these settings"),
    (["--quick", "--settings", "x.json"], "error: give --quick or --settings, not both"),
])
def test_cli_bad_input(tmp_path, planted, extra, message):
    settings_file = tmp_path / "t.json"
    settings_file.write_text(json.dumps(asdict(tiny_settings(planted, tmp_path / "r"))))
    args = ["run", "--model", str(planted.model_dir), "--store", str(tmp_path / "s")]
    args += extra if "--settings" in extra else ["--settings", str(settings_file), *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), res.output
