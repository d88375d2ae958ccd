import dataclasses
import hashlib
import json

import pytest

from extract.interventions import DirectionAdd, Intervention, load_intervention
from store.errors import UsageError

FULL = Intervention(
    zero_ablate={12: (3, 7, 70), 2: (0,)},
    clamp={12: {5: 2.0, 1: 10.0}, 0: {4: -1.5}},
    clamp_positions=(-1, 0, 3),
    direction_ablate=(0.5, -0.25, 1.0, 0.0),
    direction_add=DirectionAdd(vector=(1.0, 2.0, 3.0, 4.0), layer=5, scale=-2.5),
)
SPECS = [Intervention(), FULL, Intervention(zero_ablate={3: ()}), dataclasses.replace(FULL, zero_ablate_first=False),
         Intervention(direction_add=DirectionAdd(vector=(0.0, 1.0), layer=0))]


@pytest.mark.parametrize("spec", SPECS)
def test_round_trips(spec):
    assert Intervention.from_dict(spec.to_dict()) == spec
    assert Intervention.from_dict(dataclasses.asdict(spec)) == spec
    assert Intervention.from_json(spec.to_json()) == spec
    assert Intervention.from_json(spec.to_json()).to_json() == spec.to_json()
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()           # JSON-safe as it is


def test_json_is_canonical():
    text = FULL.to_json()
    assert " " not in text and "\n" not in text
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    assert FULL.to_dict()["zero_ablate"] == {"2": [0], "12": [3, 7, 70]}
    assert FULL.to_dict()["clamp"]["12"] == {"1": 10.0, "5": 2.0}
    shuffled = {"direction_add": {"scale": -2.5, "layer": 5, "vector": [1, 2, 3, 4]},
                "clamp_positions": [3, 0, -1], "direction_ablate": [0.5, -0.25, 1, 0],
                "clamp": {"0": {"4": -1.5}, "12": {"5": 2, "1": 10}},
                "zero_ablate": {"12": [70, 3, 7], "2": [0]}}
    assert Intervention.from_dict(shuffled) == FULL
    assert Intervention.from_dict(shuffled).spec_hash() == FULL.spec_hash()
    assert hash(Intervention.from_dict(shuffled)) == hash(FULL)


def test_empty_spec_has_a_fixed_hash():
    assert Intervention().to_json() == "{}"
    assert Intervention().spec_hash() == hashlib.sha256(b"{}").hexdigest()[:16] == "44136fa355b3678a"
    assert Intervention().is_empty and Intervention(zero_ablate={3: ()}, clamp={1: {}}).is_empty
    assert not FULL.is_empty
    assert FULL.layers == (0, 2, 12)


def test_zero_ablate_first_keeps_old_hashes_when_unset():
    spec = Intervention(zero_ablate={12: (3, 7)})
    assert spec.to_json() == '{"zero_ablate":{"12":[3,7]}}'                  # the JSON every earlier run hashed
    assert Intervention.from_dict({"zero_ablate": {"12": [3, 7]}, "zero_ablate_first": True}) == spec
    off = dataclasses.replace(spec, zero_ablate_first=False)
    assert off.to_dict() == {"zero_ablate": {"12": [3, 7]}, "zero_ablate_first": False}
    assert off.spec_hash() != spec.spec_hash()


def test_hash_changes_with_every_field():
    variants = [
        FULL,
        dataclasses.replace(FULL, zero_ablate={12: (3, 7, 71), 2: (0,)}),
        dataclasses.replace(FULL, zero_ablate={13: (3, 7, 70), 2: (0,)}),
        dataclasses.replace(FULL, clamp={12: {5: 2.5, 1: 10.0}, 0: {4: -1.5}}),
        dataclasses.replace(FULL, clamp={12: {6: 2.0, 1: 10.0}, 0: {4: -1.5}}),
        dataclasses.replace(FULL, clamp_positions=(-1, 0)),
        dataclasses.replace(FULL, zero_ablate_first=False),
        dataclasses.replace(FULL, direction_ablate=(0.5, -0.25, 1.0, 1e-9)),
        dataclasses.replace(FULL, direction_ablate=None),
        dataclasses.replace(FULL, direction_add=DirectionAdd(vector=(1.0, 2.0, 3.0, 4.0), layer=6, scale=-2.5)),
        dataclasses.replace(FULL, direction_add=DirectionAdd(vector=(1.0, 2.0, 3.0, 4.0), layer=5, scale=2.5)),
        dataclasses.replace(FULL, direction_add=DirectionAdd(vector=(1.0, 2.0, 3.0, 5.0), layer=5, scale=-2.5)),
        Intervention(zero_ablate={3: ()}),
        Intervention(),
    ]
    hashes = [v.spec_hash() for v in variants]
    assert len(set(hashes)) == len(hashes)
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)


@pytest.mark.parametrize("raw, message", [
    ({"zero_ablate": {"1": [-3]}}, "zero_ablate[1]: feature ids must be >= 0, got -3"),
    ({"zero_ablate": {"1": [4, 2, 4]}}, "zero_ablate[1]: duplicate feature id 4"),
    ({"zero_ablate": {"-1": [4]}}, "zero_ablate layer must be >= 0, got -1"),
    ({"zero_ablate": {"x": [4]}}, "zero_ablate: keys must be integers, got 'x'"),
    ({"zero_ablate": {"1": 4}}, "zero_ablate[1] must be a list of integers, got int"),
    ({"zero_ablate": {"1": [1.5]}}, "zero_ablate[1]: each entry must be an integer, got 1.5"),
    ({"zero_ablate": {"1": [True]}}, "zero_ablate[1]: each entry must be an integer, got True"),
    ({"zero_ablate": [1, 2]}, "zero_ablate must be an object, got list"),
    ({"zero_ablate": {"1": [2], "01": [3]}}, "zero_ablate: key 1 given twice"),
    ({"clamp": {"1": {"2": float("nan")}}}, "clamp[1][2] must be finite, got nan"),
    ({"clamp": {"1": {"2": "big"}}}, "clamp[1][2] must be a number, got 'big'"),
    ({"clamp": {"1": {"-2": 1.0}}}, "clamp[1]: feature ids must be >= 0, got -2"),
    ({"clamp": {"1": {"2": 1.0}}, "zero_ablate": {"1": [2]}}, "feature 2 at layer 1 is both zero-ablated and clamped"),
    ({"clamp_positions": [0]}, "clamp_positions given without any clamped feature"),
    ({"clamp": {"1": {"2": 1.0}}, "clamp_positions": [0, 0]}, "clamp_positions: duplicate position 0"),
    ({"direction_ablate": [0.0, 0.0]}, "direction_ablate is all zeros"),
    ({"direction_ablate": [1.0, float("inf")]}, "direction_ablate[1] must be finite, got inf"),
    ({"direction_ablate": []}, "direction_ablate must be a non-empty tuple of numbers"),
    ({"direction_ablate": "0.1,0.2"}, "direction_ablate must be a list of numbers, got str"),
    ({"direction_add": {"vector": [1.0], "layer": 2, "scale": 1.0, "where": "all"}}, "unknown direction_add keys: ['where']"),
    ({"direction_add": {"vector": [1.0]}}, "direction_add needs a vector and a layer"),
    ({"direction_add": {"vector": [1.0], "layer": 2, "scale": float("nan")}}, "direction_add.scale must be finite"),
    ({"direction_add": {"vector": [1.0], "layer": "2"}}, "direction_add.layer must be an integer, got '2'"),
    ({"zero_ablation": {}}, "unknown intervention keys: ['zero_ablation']"),
    ({"zero_ablate": {"1": [2]}, "zero_ablate_first": "no"}, "zero_ablate_first must be true or false, got 'no'"),
    ([1, 2], "an intervention spec must be a JSON object, got list"),
])
def test_bad_specs_raise_one_line(raw, message):
    with pytest.raises(UsageError) as err:
        Intervention.from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda: Intervention(zero_ablate={1: (5, 2)}), "feature ids must be in ascending order, got (5, 2)"),
    (lambda: Intervention(zero_ablate={1: [2, 5]}), "zero_ablate[1] must be a tuple of feature ids, got list"),
    (lambda: Intervention(clamp={1: {2: 1.0}}, clamp_positions=(0, -1)), "positions must be in ascending order"),
    (lambda: Intervention(direction_ablate=(1.0, float("nan"))), "direction_ablate[1] must be finite"),
    (lambda: Intervention(direction_add={"vector": [1.0], "layer": 0}), "direction_add must be a DirectionAdd"),
    (lambda: DirectionAdd(vector=(1.0,), layer=-1), "direction_add.layer must be >= 0, got -1"),
])
def test_bad_constructions_raise_one_line(make, message):
    with pytest.raises(UsageError) as err:
        make()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, message", [
    (Intervention(zero_ablate={12: (70000,)}), "feature 70000 out of range for the layer-12 SAE (d_sae=16384)"),
    (Intervention(clamp={12: {16384: 1.0}}), "feature 16384 out of range for the layer-12 SAE (d_sae=16384)"),
    (Intervention(zero_ablate={24: (1,)}), "zero_ablate layer 24 out of range: the model has layers 0..23"),
    (Intervention(zero_ablate={3: (1,)}), "zero_ablate needs an SAE at layer 3, and none is loaded there"),
    (Intervention(clamp={3: {1: 2.0}}), "clamp needs an SAE at layer 3, and none is loaded there"),
    (Intervention(direction_ablate=(1.0, 2.0)), "direction_ablate has 2 entries but the model's d_model is 896"),
    (Intervention(direction_add=DirectionAdd(vector=(1.0,) * 896, layer=30)),
     "direction_add layer 30 out of range: the model has layers 0..23"),
    (Intervention(direction_add=DirectionAdd(vector=(1.0,) * 3, layer=3)),
     "direction_add.vector has 3 entries but the model's d_model is 896"),
])
def test_validate_against_model(spec, message):
    with pytest.raises(UsageError) as err:
        spec.validate_against(n_layers=24, d_model=896, d_sae_by_layer={12: 16384})
    assert str(err.value) == message


def test_validate_against_accepts_a_fitting_spec():
    Intervention(zero_ablate={12: (0, 16383), 3: ()}, clamp={12: {5: 2.0}},
                 direction_ablate=(1.0,) * 896).validate_against(24, 896, {12: 16384})


def test_load_intervention(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(FULL.to_dict(), indent=2))
    assert load_intervention(path) == FULL
    path.write_text('{"zero_ablate": {"1": [2,]}}')
    with pytest.raises(UsageError) as err:
        load_intervention(path)
    assert str(err.value).startswith(f"{path} is not valid JSON: ") and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="cannot read intervention file"):
        load_intervention(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="intervention spec is not valid JSON"):
        Intervention.from_json("{")
