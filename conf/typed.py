"""Typed configs: building and checking the dataclasses that hold every config key.

Every key of sslstream's config is a field of a frozen dataclass (the sections in
orchestration/schema/, the methods' configs in models/methods/, the optimisers' in
models/optim.py, the backbone's in models/backbone_config.py, the augmentation's in
pipelines/views/recipes.py). The field's annotation is its type and its range; its default
is the default::

    epochs: Annotated[int, Ge(1)] = 15
    grad_clip: Annotated[float, Gt(0)] | None = None
    loader_threads: Annotated[int, Ge(1)] | Literal["auto"] = "auto"
    crop_scale: Annotated[tuple[float, float], Check(ordered_in(0, 1), "0 < lo <= hi <= 1")]

Ranges are ``annotated_types`` metadata (``Ge``, ``Gt``, ``Le``, ``Lt``, ``Interval``,
``MinLen``, ``MaxLen``) or a :class:`Check`; :class:`Choose` marks a field whose dataclass
is picked from its value (``method``: the class registered under ``method.name``); both in
conf/annotations.py, re-exported here with the annotated_types names, so a config module
imports its vocabulary from this one place.

:func:`build` makes a dataclass from a mapping (a composed config section), naming the
dotted key of every mistake: unknown (with the nearest known key), missing, wrong type,
out of range (the words: conf/words.py). :class:`Typed` dataclasses run :func:`check` in
``__post_init__``, so one built in Python obeys the same rules. Types understood: ``bool``,
``int`` (not a bool), ``float`` (an int too, stored as float), ``str``, ``Literal[...]``
(strings compare case-insensitively and are stored as written in the Literal), ``X | Y`` and
``X | None``, ``list[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[str, Any]`` (free-form
below), nested dataclasses and ``Any``.

conf/ imports nothing of sslstream's rooms, so models/, pipelines/ and orchestration/ all
use it (tests/test_layout.py: the lowest room).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

from annotated_types import (
    BaseMetadata,
    Ge,
    Gt,
    Interval,
    Le,
    Lt,
    MaxLen,
    MinLen,
)
from sslstream.conf.annotations import (
    Check,
    Choose,
    choose_of,
    field_hint,
    fields_of,
    free_form,
    is_dataclass_type,
    ordered_in,
    split,
    sub_dataclass,
    union_arms,
)
from sslstream.conf.words import describe, did_you_mean, nearest, show, unknown_key_message

__all__ = [
    "MISSING",
    "Check",
    "Choose",
    "ConfigValueError",
    "Ge",
    "Gt",
    "Interval",
    "Le",
    "Lt",
    "MaxLen",
    "MinLen",
    "Typed",
    "build",
    "check",
    "defaults",
    "describe",
    "did_you_mean",
    "field_hint",
    "free_form",
    "nearest",
    "ordered_in",
    "sub_dataclass",
    "to_container",
    "walk_fields",
]

MISSING = "???"  # OmegaConf's mandatory value: a key a preset or the command line must set


class ConfigValueError(ValueError):
    """A config key with a wrong name, type or value; ``key`` is its dotted name.

    A ``ValueError`` so callers guarding a config read keep working; the CLI maps it to exit 2
    (orchestration/errors.py: ``ConfigError`` is the orchestration room's subclass).
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class Typed:
    """Mixin for config dataclasses: ``__post_init__`` checks every field (types, ranges)
    and stores the normalised values (an int in a float field becomes a float, a list in a
    tuple field a tuple). ``config_key`` names the section in messages ("method")."""

    config_key: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        check(self, self.config_key)


# --- values ---------------------------------------------------------------------------------


class _Reject(Exception):
    """A value that does not fit one arm of a union (the caller tries the next)."""


def _within(value: Any, meta: Sequence[Any]) -> bool:
    for m in meta:
        if isinstance(m, (Ge, Gt, Le, Lt)) and isinstance(value, (int, float)):
            if isinstance(m, Ge) and not value >= m.ge:
                return False
            if isinstance(m, Gt) and not value > m.gt:
                return False
            if isinstance(m, Le) and not value <= m.le:
                return False
            if isinstance(m, Lt) and not value < m.lt:
                return False
        elif isinstance(m, (MinLen, MaxLen)) and hasattr(value, "__len__"):
            if len(value) < getattr(m, "min_length", 0) or len(value) > getattr(m, "max_length", math.inf):
                return False
        elif isinstance(m, Check):
            try:
                if not m.func(value):
                    return False
            except (TypeError, ValueError):
                return False
        elif isinstance(m, BaseMetadata) and not isinstance(m, (Ge, Gt, Le, Lt, MinLen, MaxLen)):
            raise TypeError(f"unsupported constraint {m!r}")
    return True


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` as a ``hint``, or _Reject. Nested dataclasses are built (with ``key``)."""
    bare, meta = split(hint)
    if (ch := choose_of(meta)) is not None:
        if isinstance(value, Mapping):
            return build(ch.pick(value), value, key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return value
        raise _Reject
    arms = union_arms(bare)
    if len(arms) > 1:
        for arm in arms:
            try:
                out = _convert(value, arm, key)
            except _Reject:
                continue
            if value is None or _within(out, meta):
                return out
            raise _Reject
        raise _Reject
    out = _convert_one(value, bare, key)
    if out is not None and not _within(out, meta):
        raise _Reject
    return out


def _convert_one(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated or len(union_arms(hint)) > 1:
        return _convert(value, hint, key)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Reject
    if origin is Literal:
        for a in args:
            if isinstance(a, str) and isinstance(value, (str, int)) and not isinstance(value, bool) \
                    and str(value).lower() == a.lower():
                return a
            if isinstance(a, bool) and value is a:
                return a
            if isinstance(a, int) and not isinstance(a, bool) and type(value) is int and value == a:
                return a
        raise _Reject
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Reject
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Reject
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Reject
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Reject
    if origin in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise _Reject
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Reject
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(items, args, strict=True)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise _Reject
    if is_dataclass_type(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build(hint, value, key)
        raise _Reject
    raise TypeError(f"{key}: unsupported config type {hint!r}")


def _bad_value(key: str, value: Any, hint: Any) -> ConfigValueError:
    bare, _ = split(hint)
    choices = [a for arm in union_arms(bare) for a in typing.get_args(split(arm)[0])
               if typing.get_origin(split(arm)[0]) is Literal and isinstance(a, str)]
    hint_ = did_you_mean(str(value), choices) if choices and isinstance(value, str) else ""
    checks = [m for arm in [hint, *union_arms(bare)] for m in split(arm)[1] if isinstance(m, Check)]
    for c in checks:
        if c.hint is not None and not hint_:
            with contextlib.suppress(TypeError, ValueError):
                hint_ = c.hint(value)
    return ConfigValueError(f"{key}={show(value)} is not allowed: expected {describe(hint)}"
                            f"{hint_}", key)


def check_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against ``hint`` and normalised, or ConfigValueError naming ``key``."""
    if isinstance(value, str) and value == MISSING:
        raise ConfigValueError(f"{key} must be set (it has no default here: add {key}=<value> "
                               "to the command)", key)
    try:
        return _convert(value, hint, key)
    except _Reject:
        raise _bad_value(key, value, hint) from None


def check(obj: Any, key: str = "") -> None:
    """Check (and normalise in place) every field of the dataclass instance ``obj``."""
    cls = type(obj)
    for f in fields_of(cls):
        sub = f"{key}.{f.name}" if key else f.name
        value = check_value(getattr(obj, f.name), field_hint(cls, f.name), sub)
        object.__setattr__(obj, f.name, value)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def build(cls: type, data: Mapping[str, Any] | None, key: str = "", *,
          allow_missing: bool = False) -> Any:
    """The dataclass ``cls`` from ``data``: unknown and missing keys, types and ranges are
    ConfigValueErrors naming ``key.<field>``; absent fields take their defaults.

    A ``ClassVar`` ``name`` of ``cls`` (a method's or optimiser's name) may appear in
    ``data`` with that value. ``allow_missing``: a ``???`` value is kept (``--cfg`` prints an
    incomplete config) and no instance is made: the checked mapping is returned instead.
    """
    raw = dict(data or {})
    names = [f.name for f in fields_of(cls)]
    tag = getattr(cls, "name", None) if "name" not in names else None
    if tag is not None and "name" in raw and raw.pop("name") != tag:
        raise ConfigValueError(f"{_join(key, 'name')} must be {tag!r} here", _join(key, "name"))
    for k in raw:
        if k not in names:
            raise ConfigValueError(unknown_key_message(_join(key, str(k)), names, key), _join(key, str(k)))
    values: dict[str, Any] = {}
    for f in fields_of(cls):
        sub = _join(key, f.name)
        if f.name in raw:
            value = raw[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = MISSING
        if allow_missing and isinstance(value, str) and value == MISSING:
            values[f.name] = value
            continue
        if allow_missing and isinstance(value, Mapping) and sub_dataclass(field_hint(cls, f.name), value):
            values[f.name] = build(sub_dataclass(field_hint(cls, f.name), value), value, sub,
                                   allow_missing=True)
            continue
        values[f.name] = check_value(value, field_hint(cls, f.name), sub)
    if allow_missing:
        # nested dataclasses (also inside lists: data.train's sources) as plain containers
        return _with_tag(cls, {k: _plain(v) for k, v in values.items()})
    return cls(**values)


# --- trees ----------------------------------------------------------------------------------


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_container(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _with_tag(cls: type, out: dict[str, Any]) -> dict[str, Any]:
    names = [f.name for f in fields_of(cls)]
    tag = getattr(cls, "name", None) if "name" not in names else None
    return {"name": tag, **out} if isinstance(tag, str) and tag else out


def to_container(obj: Any) -> dict[str, Any]:
    """The dataclass ``obj`` as plain dicts and lists (tuples become lists), led by its
    ``name`` ClassVar when it has one: what a composed config holds."""
    return _with_tag(type(obj), {f.name: _plain(getattr(obj, f.name)) for f in fields_of(type(obj))})


def defaults(cls: type) -> dict[str, Any]:
    """Every field's default as plain containers (``???`` for a field without one); nested
    dataclasses expanded, Choose fields left out (their class depends on their value)."""
    out: dict[str, Any] = {}
    for f in fields_of(cls):
        hint = field_hint(cls, f.name)
        if choose_of(split(hint)[1]) is not None:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = to_container(value) if dataclasses.is_dataclass(value) else _plain(value)
        elif (sub := sub_dataclass(hint)) is not None:
            out[f.name] = defaults(sub)
        else:
            out[f.name] = MISSING
    return _with_tag(cls, out)


def walk_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, annotation) of every field below dataclass ``cls`` (Choose fields: the
    field itself only)."""
    for f in fields_of(cls):
        hint = field_hint(cls, f.name)
        key = _join(prefix, f.name)
        yield key, hint
        if choose_of(split(hint)[1]) is None and (sub := sub_dataclass(hint)) is not None:
            yield from walk_fields(sub, key)
