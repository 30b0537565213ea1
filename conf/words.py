"""A config key's type and a value in the words of an error message.

``describe(Annotated[int, Ge(1)] | Literal["auto"])`` is "an integer >= 1 or auto";
``show("1")`` is "'1'" (a string that reads like a number is quoted); the nearest known
name for a typo ("did you mean"). conf/typed.py's errors are made of these.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from sslstream.conf.annotations import Check, choose_of, is_dataclass_type, split, union_arms

__all__ = ["describe", "did_you_mean", "nearest", "show", "unknown_key_message"]


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _meta_words(meta: Sequence[Any]) -> list[str]:
    words = []
    for m in meta:
        if isinstance(m, Ge):
            words.append(f">= {_num(m.ge)}")
        elif isinstance(m, Gt):
            words.append(f"> {_num(m.gt)}")
        elif isinstance(m, Le):
            words.append(f"<= {_num(m.le)}")
        elif isinstance(m, Lt):
            words.append(f"< {_num(m.lt)}")
        elif isinstance(m, MinLen):
            words.append("non-empty" if m.min_length == 1 else f"at least {m.min_length} long")
        elif isinstance(m, MaxLen):
            words.append(f"at most {m.max_length} long")
        elif isinstance(m, Check):
            words.append(m.words)
    return words


def describe(hint: Any) -> str:
    """What a key of this type accepts, in words: ``an integer >= 1 or auto``."""
    bare, meta = split(hint)
    arms = union_arms(bare)
    if len(arms) == 1:
        return _describe_one(hint)
    parts = [_describe_one(a) for a in arms if a is not type(None)]
    if type(None) in arms:
        parts.append("null")
    text = " or ".join(parts)
    words = _meta_words(meta)
    return f"{text} ({' and '.join(words)})" if words else text


def _describe_one(hint: Any) -> str:
    bare, meta = split(hint)
    words = _meta_words(meta)
    origin, args = typing.get_origin(bare), typing.get_args(bare)
    if len(union_arms(bare)) > 1:
        base = f"({describe(bare)})"
    elif origin is Literal:
        base = " | ".join(a if isinstance(a, str) else show(a) for a in args)
    elif bare is bool:
        base = "true | false"
    elif bare is int:
        base = "an integer"
    elif bare is float:
        base = "a number"
    elif bare is str:
        base = "a string"
    elif bare is type(None):
        base = "null"
    elif origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            inner = {_describe_one(a) for a in args}
            base = (f"{len(args)} {_plural(inner.pop())}" if len(inner) == 1
                    else f"a list ({', '.join(_describe_one(a) for a in args)})")
        else:
            base = f"a list of {_plural(_describe_one(args[0])) if args else 'values'}"
    elif origin is dict or bare is dict:
        base = "a mapping"
    elif is_dataclass_type(bare):
        base = f"a mapping of {bare.__name__} keys"
    elif choose_of(meta) is not None:
        base = "a mapping"
    else:
        base = getattr(bare, "__name__", str(bare))
    if not words:
        return base
    if base in ("an integer", "a number"):
        return f"{base} {' and '.join(words)}"
    if base == "a string" and all(isinstance(m, Check) for m in meta if _meta_words([m])):
        return " and ".join(words)  # a Check on a string says it all ("resnet_mini or ...")
    if words == ["non-empty"] and base.startswith(("a string", "a list")):
        return "a non-empty " + base[2:]
    return f"{base} ({' and '.join(words)})"


def _plural(words: str) -> str:
    if words.startswith("a non-empty "):
        return "non-empty " + _plural("a " + words[len("a non-empty "):])
    return {"a string": "strings", "an integer": "integers", "a number": "numbers",
            "true | false": "booleans"}.get(words, words)


def show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str) and (v.strip() != v or not v or _looks_typed(v)):
        return repr(v)  # a string that reads like a number, a bool or null: quoted
    if isinstance(v, tuple):
        return "[" + ", ".join(show(x) for x in v) + "]"
    return str(v)


def _looks_typed(text: str) -> bool:
    if text.lower() in ("true", "false", "null", "none"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def nearest(word: str, candidates: Sequence[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)


def did_you_mean(word: str, candidates: Sequence[str], dotted: str = "") -> str:
    """``"; did you mean x?"`` for the nearest candidate (prefixed ``dotted.``), or ``""``."""
    near = nearest(word, candidates)
    return f"; did you mean {dotted + '.' if dotted else ''}{near[0]}?" if near else ""


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def unknown_key_message(key: str, known: Sequence[str], parent: str = "") -> str:
    leaf = key.rpartition(".")[2]
    msg = f"unknown config key {key}"
    near = nearest(leaf, known, n=3)
    if near:
        msg += f"; did you mean {' or '.join(_join(parent, n) for n in near)}?"
    else:
        shown = ", ".join(list(known)[:40]) + (", ..." if len(known) > 40 else "")
        msg += f". Keys of {parent or 'the config'}: {shown}."
    return msg
