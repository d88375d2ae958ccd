"""The one settings base: frozen dataclasses read from JSON, checked against their annotations.

Every settings class derives from `Settings` and states each default once, as a field. `from_dict`
builds one from its JSON form: nested settings classes are read recursively, lists become tuples,
ints become floats where a float is expected, and an unknown key or a value of the wrong type is a
one-line `UsageError` naming the key and the expected type, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from functools import cache
from typing import Any, ClassVar, Union

from store.errors import UsageError


@dataclass(frozen=True)
class Settings:
    """Base of every settings class: `from_dict` (the JSON form) and `hashed` (what ids are made of)."""

    # fields added after ids were first made: hashed only when not at their default, so old ids stay
    _HASHED_WHEN_SET: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: Any, path: str = "") -> Any:
        """The settings from their JSON form (`dataclasses.asdict` writes it); `path` names them in errors."""
        where = path or _label(cls)
        if not isinstance(raw, dict):
            raise UsageError(f"{where} settings must be a JSON object, got {_kind(raw)}")
        hints = _hints(cls)
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(f"unknown setting {_join(path, unknown[0])!r}; known: {', '.join(sorted(known))}")
        return cls(**{k: _convert(v, hints[k], _join(path, k)) for k, v in raw.items()})

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        """The settings from command-line options: None means "the settings default"; a comma-separated
        text fills a list field (`--taus 0.1,0.5`); option names are field names."""
        hints, raw = _hints(cls), {}
        for name, value in options.items():
            if value is None:
                continue
            if isinstance(value, str) and typing.get_origin(_optional(hints[name])) is tuple:
                item = (typing.get_args(_optional(hints[name])) or (str,))[0]
                value = [v for x in value.split(",") if x.strip() for v in _option_items(x.strip(), item, name)]
            raw[name] = value
        return cls.from_dict(raw)

    def hashed(self) -> dict[str, Any]:
        """The settings as hashed into ids: `asdict`, less later-added fields left at their default."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._HASHED_WHEN_SET and f.default is not dataclasses.MISSING and value == f.default:
                continue
            out[f.name] = value.hashed() if isinstance(value, Settings) else _plain(value)
        return out


def _optional(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 1 else hint


def _option_items(text: str, kind: Any, name: str) -> list[Any]:
    """One comma-separated part: a value, or for integers a range `start:stop:step` (stop included)."""
    try:
        if kind is int and text.count(":") == 2:
            start, stop, step = (int(x) for x in text.split(":"))
            return list(range(start, stop + 1, step))
        return [kind(text) if kind in (int, float) else text]
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise UsageError(f"{flag} must be a comma-separated list of {_PLURAL.get(kind, 'values')}, got {text!r}") from None


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _label(cls: type) -> str:
    return cls.__name__.removesuffix("Settings").lower() or "settings"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _convert(value: Any, hint: Any, path: str) -> Any:
    """`value` as `hint` wants it (list -> tuple, int -> float), or a UsageError naming `path`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(value, option, path)
            except UsageError:
                continue
        raise UsageError(f"setting {path!r} must be {' or '.join(_name(a) for a in args)}, got {_kind(value)}")
    if isinstance(hint, type) and issubclass(hint, Settings):
        return value if isinstance(value, hint) else hint.from_dict(value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"setting {path!r} must be {_name(hint)}, got {_kind(value)}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UsageError(f"setting {path!r} must be a JSON object, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise UsageError(f"setting {path!r} must be {_name(hint)}, got {_kind(value)}")


def _name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        item = (typing.get_args(hint) or (Any,))[0]
        return f"a list of {_PLURAL.get(item, 'values')}"
    if isinstance(hint, type) and issubclass(hint, Settings):
        return "a JSON object"
    return _SINGULAR.get(hint, getattr(hint, "__name__", str(hint)))


_SINGULAR = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
