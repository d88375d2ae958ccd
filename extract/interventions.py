"""Intervention specs as data: what to change in the residual stream, stored and hashed with every run.

Layer L is the residual after decoder block L (HF hidden_states[L+1]). The parts:
- zero_ablate {layer: feature ids}: h' = h - sum_{i in S} z_i(h) W_dec[i]  (SAE error term kept), at
  every position, or every position but 0 with zero_ablate_first false (position 0 is the massive-
  activation sink that the project's SAEs never saw in training)
- clamp {layer: {feature: value}} at clamp_positions: h' = h + sum_i (v_i - z_i(h)) W_dec[i]
- direction_ablate r: h' = h - (h . r^) r^ everywhere (Arditi et al.)
- direction_add {vector, layer, scale}: h' = h + scale r^ after block `layer`

Canonical form: feature ids and positions ascending (from_dict sorts them; direct construction must
pass them sorted), values as floats, parts left at their default omitted from the JSON, so the
empty spec is "{}" and adding an optional part later does not change existing hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from store.errors import UsageError

_INT_KEY = re.compile(r"-?\d+")


@dataclass(frozen=True)
class DirectionAdd:
    vector: tuple[float, ...]             # normalized before use: scale is in residual-norm units
    layer: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_vector(self.vector, "direction_add.vector")
        _check_layer(self.layer, "direction_add.layer")
        _check_value(self.scale, "direction_add.scale")

    def to_dict(self) -> dict[str, Any]:
        return {"layer": int(self.layer), "scale": float(self.scale), "vector": [float(x) for x in self.vector]}


@dataclass(frozen=True)
class Intervention:
    zero_ablate: dict[int, tuple[int, ...]] = field(default_factory=dict)     # layer -> feature ids
    clamp: dict[int, dict[int, float]] = field(default_factory=dict)          # layer -> {feature: value}
    clamp_positions: tuple[int, ...] = ()     # prompt positions (negative: from the end); () = all
    zero_ablate_first: bool = True            # zero_ablate acts at position 0 too (omitted from the JSON when true)
    direction_ablate: tuple[float, ...] | None = None                        # every layer and position
    direction_add: DirectionAdd | None = None

    def __post_init__(self) -> None:
        _check_mapping(self.zero_ablate, "zero_ablate")
        for layer, features in self.zero_ablate.items():
            _check_layer(layer, "zero_ablate layer")
            _check_ids(features, f"zero_ablate[{layer}]", "feature ids")
            if any(f < 0 for f in features):
                raise UsageError(f"zero_ablate[{layer}]: feature ids must be >= 0, got {min(features)}")
        _check_mapping(self.clamp, "clamp")
        for layer, values in self.clamp.items():
            _check_layer(layer, "clamp layer")
            _check_mapping(values, f"clamp[{layer}]")
            for feature, value in values.items():
                _check_int(feature, f"clamp[{layer}] feature id")
                if feature < 0:
                    raise UsageError(f"clamp[{layer}]: feature ids must be >= 0, got {feature}")
                _check_value(value, f"clamp[{layer}][{feature}]")
            both = sorted(set(values) & set(self.zero_ablate.get(layer, ())))
            if both:
                raise UsageError(f"feature {both[0]} at layer {layer} is both zero-ablated and clamped; pick one")
        _check_ids(self.clamp_positions, "clamp_positions", "positions")
        if not isinstance(self.zero_ablate_first, bool):
            raise UsageError(f"zero_ablate_first must be true or false, got {self.zero_ablate_first!r}")
        if self.clamp_positions and not any(self.clamp.values()):
            raise UsageError("clamp_positions given without any clamped feature")
        if self.direction_ablate is not None:
            _check_vector(self.direction_ablate, "direction_ablate")
        if self.direction_add is not None and not isinstance(self.direction_add, DirectionAdd):
            raise UsageError(f"direction_add must be a DirectionAdd, got {type(self.direction_add).__name__}")

    def __hash__(self) -> int:                            # the dict fields make the generated one fail
        return hash(self.to_json())

    @property
    def is_empty(self) -> bool:
        """True when the spec changes nothing (no feature, no direction)."""
        return (not any(self.zero_ablate.values()) and not any(self.clamp.values())
                and self.direction_ablate is None and self.direction_add is None)

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers whose SAE the spec needs (non-empty zero_ablate or clamp), ascending."""
        return tuple(sorted({l for l, f in self.zero_ablate.items() if f} | {l for l, v in self.clamp.items() if v}))

    @classmethod
    def from_dict(cls, raw: Any) -> "Intervention":
        if not isinstance(raw, Mapping):
            raise UsageError(f"an intervention spec must be a JSON object, got {type(raw).__name__}")
        _reject_unknown(raw, cls, "intervention")
        zero = {layer: tuple(sorted(_as_ints(ids, f"zero_ablate[{layer}]")))
                for layer, ids in _as_layer_map(raw.get("zero_ablate"), "zero_ablate").items()}
        clamp = {layer: {f: _as_float(v, f"clamp[{layer}][{f}]")
                         for f, v in _as_int_keyed(values, f"clamp[{layer}]").items()}
                 for layer, values in _as_layer_map(raw.get("clamp"), "clamp").items()}
        direction = raw.get("direction_ablate")
        add = raw.get("direction_add")
        return cls(zero_ablate=zero, clamp=clamp,
                   clamp_positions=tuple(sorted(_as_ints(raw.get("clamp_positions") or (), "clamp_positions"))),
                   zero_ablate_first=raw.get("zero_ablate_first", True),
                   direction_ablate=None if direction is None else _as_vector(direction, "direction_ablate"),
                   direction_add=None if add is None else _direction_add(add))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: layer and feature keys as strings, in ascending order; default parts left out."""
        out: dict[str, Any] = {}
        if self.zero_ablate:
            out["zero_ablate"] = {str(l): [int(f) for f in fs] for l, fs in sorted(self.zero_ablate.items())}
        if self.clamp:
            out["clamp"] = {str(l): {str(f): float(v) for f, v in sorted(vs.items())}
                            for l, vs in sorted(self.clamp.items())}
        if self.clamp_positions:
            out["clamp_positions"] = [int(p) for p in self.clamp_positions]
        if not self.zero_ablate_first:                   # added later: the default is left out, so old hashes stay
            out["zero_ablate_first"] = False
        if self.direction_ablate is not None:
            out["direction_ablate"] = [float(x) for x in self.direction_ablate]
        if self.direction_add is not None:
            out["direction_add"] = self.direction_add.to_dict()
        return out

    @classmethod
    def from_json(cls, text: str) -> "Intervention":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"intervention spec is not valid JSON: {err.msg} "
                             f"(line {err.lineno}, column {err.colno})") from None
        return cls.from_dict(raw)

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def spec_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def validate_against(self, n_layers: int, d_model: int, d_sae_by_layer: Mapping[int, int]) -> None:
        """Raise UsageError unless the spec fits a model with these layers, width and SAEs."""
        for part, by_layer in (("zero_ablate", self.zero_ablate), ("clamp", self.clamp)):
            for layer, features in sorted(by_layer.items()):
                _check_in_model(layer, n_layers, part)
                if not features:
                    continue
                if layer not in d_sae_by_layer:
                    raise UsageError(f"{part} needs an SAE at layer {layer}, and none is loaded there")
                d_sae, top = d_sae_by_layer[layer], max(features)
                if top >= d_sae:
                    raise UsageError(f"feature {top} out of range for the layer-{layer} SAE (d_sae={d_sae})")
        if self.direction_ablate is not None:
            _check_width(self.direction_ablate, d_model, "direction_ablate")
        if self.direction_add is not None:
            _check_in_model(self.direction_add.layer, n_layers, "direction_add")
            _check_width(self.direction_add.vector, d_model, "direction_add.vector")


def load_intervention(path: str | Path) -> Intervention:
    """The intervention spec in a JSON file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot read intervention file {path}: {err.strerror or err}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    return Intervention.from_dict(raw)


# --- checks on constructed values (no side effects) ---

def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_int(x: Any, what: str) -> None:
    if not _is_int(x):
        raise UsageError(f"{what} must be an integer, got {x!r}")


def _check_layer(layer: Any, what: str) -> None:
    _check_int(layer, what)
    if layer < 0:
        raise UsageError(f"{what} must be >= 0, got {layer}")


def _check_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a dict, got {type(value).__name__}")


def _check_ids(ids: Any, where: str, what: str) -> None:
    if not isinstance(ids, tuple):
        raise UsageError(f"{where} must be a tuple of {what}, got {type(ids).__name__}")
    for x in ids:
        _check_int(x, f"{where}: each of the {what}")
    seen: set[int] = set()
    for x in ids:
        if x in seen:
            raise UsageError(f"{where}: duplicate {what[:-1]} {x}")
        seen.add(x)
    if list(ids) != sorted(ids):
        raise UsageError(f"{where}: {what} must be in ascending order, got {_short(ids)}; use tuple(sorted(...))")


def _check_value(x: Any, where: str) -> None:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise UsageError(f"{where} must be a number, got {x!r}")
    if not math.isfinite(x):
        raise UsageError(f"{where} must be finite, got {x}")


def _check_vector(vector: Any, where: str) -> None:
    if not isinstance(vector, tuple) or not vector:
        raise UsageError(f"{where} must be a non-empty tuple of numbers, got {type(vector).__name__}")
    for k, x in enumerate(vector):
        _check_value(x, f"{where}[{k}]")
    if not any(vector):
        raise UsageError(f"{where} is all zeros; a direction needs a non-zero vector")


def _check_in_model(layer: int, n_layers: int, part: str) -> None:
    if layer >= n_layers:
        raise UsageError(f"{part} layer {layer} out of range: the model has layers 0..{n_layers - 1}")


def _check_width(vector: tuple[float, ...], d_model: int, where: str) -> None:
    if len(vector) != d_model:
        raise UsageError(f"{where} has {len(vector)} entries but the model's d_model is {d_model}")


def _short(values: tuple[Any, ...]) -> str:
    return repr(values) if len(values) <= 8 else f"({', '.join(map(repr, values[:8]))}, ...)"


# --- parsing JSON-shaped input (lists, string keys) into the constructor's types ---

def _reject_unknown(raw: Mapping[str, Any], cls: type, what: str) -> None:
    unknown = set(raw) - {f.name for f in fields(cls)}
    if unknown:
        raise UsageError(f"unknown {what} keys: {sorted(map(str, unknown))}")


def _as_key(key: Any, where: str) -> int:
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and _INT_KEY.fullmatch(key):
        return int(key)
    raise UsageError(f"{where}: keys must be integers, got {key!r}")


def _as_int_keyed(raw: Any, where: str) -> dict[int, Any]:
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where} must be an object, got {type(raw).__name__}")
    out: dict[int, Any] = {}
    for key, value in raw.items():
        k = _as_key(key, where)
        if k in out:
            raise UsageError(f"{where}: key {k} given twice")
        out[k] = value
    return out


def _as_layer_map(raw: Any, where: str) -> dict[int, Any]:
    return {} if raw is None else _as_int_keyed(raw, where)


def _as_ints(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, (list, tuple)):
        raise UsageError(f"{where} must be a list of integers, got {type(raw).__name__}")
    for x in raw:
        _check_int(x, f"{where}: each entry")
    return [int(x) for x in raw]


def _as_float(raw: Any, where: str) -> float:
    _check_value(raw, where)
    return float(raw)


def _as_vector(raw: Any, where: str) -> tuple[float, ...]:
    if not isinstance(raw, (list, tuple)):
        raise UsageError(f"{where} must be a list of numbers, got {type(raw).__name__}")
    return tuple(_as_float(x, f"{where}[{k}]") for k, x in enumerate(raw))


def _direction_add(raw: Any) -> DirectionAdd:
    """A DirectionAdd from its JSON form {vector, layer, scale}."""
    if not isinstance(raw, Mapping):
        raise UsageError(f"direction_add must be an object {{vector, layer, scale}}, got {type(raw).__name__}")
    _reject_unknown(raw, DirectionAdd, "direction_add")
    if "vector" not in raw or "layer" not in raw:
        raise UsageError("direction_add needs a vector and a layer")
    return DirectionAdd(vector=_as_vector(raw["vector"], "direction_add.vector"), layer=raw["layer"],
                        scale=_as_float(raw.get("scale", 1.0), "direction_add.scale"))
