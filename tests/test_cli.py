"""The command line's shared behaviour: a missing store is one line before any model loads, settings
of the wrong type are one line before anything is created, and --quick is the quick profile's file."""

import json
from dataclasses import fields

import pytest
from typer.testing import CliRunner

from analyze.prune import PruneSettings
from cli import app
from tests.conftest import assert_one_error

PRUNE_FIELDS = sorted(f.name for f in fields(PruneSettings))
# every command that reads a store; --model names a model that does not exist, so a command that
# loaded one before opening the store would fail with another message
NO_MODEL = ["--model", "no/such-model"]
READERS = [
    ["analyze", "direction", *NO_MODEL], ["analyze", "candidates", *NO_MODEL], ["analyze", "prune", *NO_MODEL],
    ["analyze", "stage3", *NO_MODEL], ["analyze", "redundancy", *NO_MODEL], ["analyze", "controls", *NO_MODEL],
    ["analyze", "costs", *NO_MODEL], ["analyze", "taxonomy"], ["feature", "3:4"], ["report"], ["sql", "SELECT 1"],
    ["store", "check"], ["judge", "rerun"],
]


@pytest.mark.parametrize("args", READERS, ids=lambda a: " ".join(a[:2]))
def test_missing_store_is_one_line_and_creates_nothing(tmp_path, args):
    missing = tmp_path / "does" / "not" / "exist"
    result = CliRunner().invoke(app, [*args, "--store", str(missing)])
    assert_one_error(result, f"error: no store at {missing} (no catalog.duckdb); create one with "
                             f"`python cli.py extract --store {missing}`")
    assert not (tmp_path / "does").exists()


@pytest.mark.parametrize("raw, line", [
    ({"prune": {"taus": "lots"}}, "error: setting 'prune.taus' must be a list of numbers, got str 'lots'"),
    ({"candidates": {"n_prompts": "twelve"}}, "error: setting 'candidates.n_prompts' must be an integer, got str 'twelve'"),
    ({"prune": {"tau": [0.1]}}, "error: unknown setting 'prune.tau'; known: " + ", ".join(PRUNE_FIELDS)),
])
def test_bad_settings_fail_before_the_model_or_store(tmp_path, raw, line):
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps({"saes": ["2=x"], **raw}))
    result = CliRunner().invoke(app, ["run", "--settings", str(profile), *NO_MODEL, "--store", str(tmp_path / "s")])
    assert_one_error(result, line)
    assert not (tmp_path / "s").exists()


def test_bad_option_value_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["analyze", "prune", "--taus", "0.1,x", *NO_MODEL, "--store", str(tmp_path)])
    assert_one_error(result, "error: --taus must be a comma-separated list of numbers, got 'x'")
