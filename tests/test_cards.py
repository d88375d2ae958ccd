"""Feature cards on planted activations, and `python cli.py feature LAYER:ID`."""

import polars as pl
import pytest
from typer.testing import CliRunner

from analyze import cards
from analyze.cards import CardSettings
from cli import app
from store import UsageError
from tests.planted_acts import PROMPTS, planted_store, write_run


def test_card_of_a_planted_feature(tmp_path):
    store = planted_store(tmp_path / "s")
    write_run(store, "again0000000000c", [PROMPTS[0]], {(2, 2): {("A", 2): 1.2}})   # A extracted twice
    c = cards.card(store, 2, 2, CardSettings(window=1))
    assert (c.n_active, c.n_rows, c.n_prompts) == (3, 24, 2) and c.density == pytest.approx(3 / 24)
    assert c.max_value == pytest.approx(2.5)
    assert [(x.dataset, x.pos, x.value) for x in c.contexts] == [("coconot", 3, 2.5), ("coconot", 2, 1.5)]
    top = c.contexts[0]
    assert (top.left, top.token, top.right) == (" to", "\n", "")               # byte-level tokens decoded
    assert c.contexts[1].left == " how" and c.contexts[1].token == " to" and c.contexts[1].right == "\n"
    totals = c.datasets.group_by("dataset").agg(pl.col("n_active_prompts").sum(), pl.col("n_prompts").sum())
    assert dict((d, (a, n)) for d, a, n in totals.iter_rows()) == {"coconot": (2, 4), "advbench": (0, 1)}
    assert "$1 = 2, $2 = 2" in c.sql["contexts"]


def test_feature_only_in_an_ablated_run_or_nowhere_is_an_error(tmp_path):
    store = planted_store(tmp_path / "s")
    with pytest.raises(UsageError, match="never fires"):
        cards.card(store, 3, 5)                                               # only under an ablation
    assert [c.name for c in cards.cards(store, [(3, 5), (2, 1), (9, 9)])] == ["2:1"]


def test_token_text_decodes_byte_level_and_sentencepiece():
    assert cards.token_text(["Ġhello", "Ċ", "Ġw", "orld"]) == " hello\n world"
    assert cards.token_text(["▁hello", "<0x0A>", "▁world"]) == " hello\n world"
    assert cards.token_text(["<|im_start|>", "user"]) == "<|im_start|>user"


@pytest.mark.parametrize("text, expected", [("12:345", (12, 345)), (" 0:7 ", (0, 7))])
def test_parse_feature(text, expected):
    assert cards.parse_feature(text) == expected


@pytest.mark.parametrize("text", ["12", "12:", "a:b", "12:-3", "1:2:3"])
def test_parse_feature_rejects(text):
    with pytest.raises(UsageError, match="LAYER:ID"):
        cards.parse_feature(text)


def test_cli_feature(tmp_path):
    planted_store(tmp_path / "s")
    runner = CliRunner()
    ok = runner.invoke(app, ["feature", "3:4", "--store", str(tmp_path / "s")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("feature 3:4  (no explanation imported)\nfires on 3 of 20 stored rows")
    assert "[[ how]]" in ok.output and "coconot 3/4" in ok.output
    bad = runner.invoke(app, ["feature", "3-4", "--store", str(tmp_path / "s")])
    assert bad.exit_code == 2
    assert bad.output == "error: a feature is LAYER:ID with two non-negative integers, e.g. 12:345; got '3-4'\n"
    unseen = runner.invoke(app, ["feature", "7:1", "--store", str(tmp_path / "s")])
    assert unseen.exit_code == 2 and unseen.output.startswith("error: feature 7:1 never fires")
    assert unseen.output.count("\n") == 1
