"""Reading a config field's annotation: its type, its range, the dataclass below it.

The vocabulary a field's annotation may use besides ``annotated_types`` (``Ge``, ``Gt``,
``Le``, ``Lt``, ``Interval``, ``MinLen``, ``MaxLen``): :class:`Check`, a predicate with the
words a message shows, and :class:`Choose`, a field whose dataclass is picked from its
value. conf/typed.py builds and checks configs with these; conf/words.py says them in
messages.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from annotated_types import GroupedMetadata

__all__ = ["Check", "Choose", "choose_of", "field_hint", "fields_of", "free_form",
           "is_dataclass_type", "ordered_in", "split", "sub_dataclass", "union_arms"]


@dataclass(frozen=True)
class Check:
    """A range that bounds cannot say: ``func(value)`` must hold; ``words`` say what it wants
    ("0 < lo <= hi <= 1") in the error message."""

    func: Callable[[Any], bool]
    words: str
    hint: Callable[[Any], str] | None = None  # more words for a refused value ("; did you mean x?")


@dataclass(frozen=True)
class Choose:
    """A field whose dataclass is picked from its mapping: ``pick(mapping) -> dataclass``
    (``method``: ``method.name`` -> that method's config class). ``pick`` raises
    ConfigValueError for a mapping it cannot place."""

    pick: Callable[[Mapping[str, Any]], type]


def ordered_in(lo: float, hi: float | None = None, *, low_open: bool = True) -> Callable[[Any], bool]:
    """``(a, b)`` with ``lo < a <= b`` (``lo <= a`` unless ``low_open``) and ``b <= hi``."""

    def ok(v: Any) -> bool:
        a, b = v
        return (a > lo if low_open else a >= lo) and a <= b and (hi is None or b <= hi)

    return ok


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def field_hint(cls: type, name: str) -> Any:
    """The annotation of field ``name`` of dataclass ``cls`` (with its Annotated metadata)."""
    return _hints(cls)[name]


def fields_of(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def split(hint: Any) -> tuple[Any, list[Any]]:
    """(bare type, constraints) of ``Annotated[T, *meta]``; constraints flattened."""
    meta: list[Any] = []
    while typing.get_origin(hint) is Annotated:
        hint, *extra = typing.get_args(hint)
        for m in extra:
            meta.extend(m if isinstance(m, GroupedMetadata) else [m])
    return hint, meta


def union_arms(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def choose_of(meta: Sequence[Any]) -> Choose | None:
    return next((m for m in meta if isinstance(m, Choose)), None)


def free_form(hint: Any) -> bool:
    """Whether anything goes below a key of this type (``dict[str, Any]``, ``Any``)."""
    bare, _ = split(hint)
    return any(split(a)[0] is Any or typing.get_origin(split(a)[0]) is dict
               or split(a)[0] is dict for a in union_arms(bare))


def sub_dataclass(hint: Any, value: Any = None) -> type | None:
    """The dataclass a key of this type holds (Choose: picked from ``value``), or None."""
    bare, meta = split(hint)
    if (ch := choose_of(meta)) is not None:
        return ch.pick(value if isinstance(value, Mapping) else {})
    for a in union_arms(bare):
        a, _ = split(a)
        if is_dataclass_type(a):
            return a
    return None
