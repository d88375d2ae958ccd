"""Layer lists as users write them: `all`, `none`, `2-16`, `3,7,12`, and fractions of the depth.

A range end may be a fraction of the model's depth (`5/12`, `0.4`), rounded to a layer, so one
profile serves a model of any depth: `5/12-5/8` is layers 10..15 of a 24-layer model.
"""

from __future__ import annotations

from fractions import Fraction

from store.errors import UsageError


def parse_layers(text: str, n_layers: int, clamp: bool = False) -> tuple[int, ...]:
    """'all', 'none', '2-16' (inclusive), '3,7,12', a mix ('2-4,9'), or fractional ends ('5/12-5/8').

    clamp=True (profiles): ends are clamped into the model's layers and a range never starts below
    layer 2 (or the last layer of a shallower model), where the paper's stages start reading.
    """
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return tuple(range(n_layers))
    layers: list[int] = []
    floor = min(2, n_layers - 1)
    for part in text.split(","):
        lo_text, _, hi_text = part.partition("-")
        lo, hi = _layer(lo_text, n_layers, text), _layer(hi_text or lo_text, n_layers, text)
        if clamp:
            lo = min(max(lo, floor), n_layers - 1)
            hi = max(lo, min(hi, n_layers - 1))
        layers += list(range(lo, hi + 1))
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UsageError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))


def _layer(end: str, n_layers: int, text: str) -> int:
    """One range end: a layer number, or a fraction of the depth rounded to the nearest layer."""
    end = end.strip()
    try:
        if end.isdigit():
            return int(end)
        return round(Fraction(end) * n_layers)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--layers must look like all, none, 2-16, 3,7,12 or 5/12-5/8; got {text!r}") from None
