"""Gradient attribution on the planted model: the planted latents first, predictions that match real ablations."""

from dataclasses import asdict

import numpy as np
import polars as pl
import pytest

from analyze import attribution
from analyze.attribution import AttributionSettings
from store import UsageError
from tests.planted import PLANTED_FEATURES, PLANTED_LAYER

PLANTED = {(PLANTED_LAYER, f) for f in PLANTED_FEATURES}


@pytest.fixture(scope="module")
def attributed(planted_stage1):
    store, model = planted_stage1
    return attribution.run(store, model, AttributionSettings(n_single=4, n_blocks=2))


def test_planted_latents_rank_first_on_every_prompt(planted_stage1, attributed):
    scores = attributed.scores
    assert scores.height and set(scores["prompt_id"]) == set(attributed.checks["prompt_id"])
    for (pid,), part in scores.group_by(["prompt_id"]):
        top = part.sort("score").head(3)
        assert set(zip(top["layer"], top["feature"])) == PLANTED, pid
        assert (top["score"] < 0).all()


def test_settings_round_trip_and_validation():
    s = AttributionSettings(metric="logit_diff", steps=4)
    assert AttributionSettings.from_dict(asdict(s)) == s and s.method == "ig"
    with pytest.raises(UsageError, match="metric must be one of"):
        AttributionSettings(metric="kl")
    with pytest.raises(UsageError, match="steps must be >= 1"):
        AttributionSettings(steps=0)
