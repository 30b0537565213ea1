"""Command-line overrides: Hydra's grammar, sweeps, and applying values to the config tree.

Hydra parses every ``key=value`` (its override grammar: lists, dicts, quoting, ``+key``,
``~key``, sweeps ``key=a,b``). The overrides split in two: *choices*, which pick files
(``method=``, ``recipe=``, ``optim=`` and the conf/ folders ``data=``, ``backbone=``,
``tracking=``), and *values*, which this module applies to the composed tree after it was
filled with the schema's defaults, so every key is known and checked:

* a key that is not in the schema is unknown, also when written ``+key=value``; the message
  names it and the nearest known keys ("did you mean");
* ``~key`` cannot remove a schema key (every key has a value; set it instead);
* below a free-form key (``data.storage_options``) anything may be set or removed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from sslstream.conf.typed import field_hint, free_form, nearest, sub_dataclass
from sslstream.models.methods.base import MethodConfig
from sslstream.models.optim import OptimConfig
from sslstream.orchestration.errors import ConfigError

__all__ = ["CHOICES", "FOLDERS", "Override", "apply_values", "expand_sweep", "parse",
           "quote_brace_patterns", "split_choices", "swept_keys"]

FOLDERS = ("data", "backbone", "tracking")  # conf/ folders of presets, chosen with Hydra
CHOICES = ("method", "recipe", "optim", *FOLDERS)
_BRACE = re.compile(r"\{[^{}$]*\.\.[^{}$]*\}")

Override = Any  # hydra.core.override_parser.types.Override


def quote_brace_patterns(overrides: Sequence[str]) -> list[str]:
    """``data.train=s3://b/train-{000000..000127}.tar`` -> ``data.train='s3://b/...'``.

    Hydra's override grammar reserves ``{``, so a WebDataset brace pattern would need quoting
    inside shell quoting; values holding a ``{a..b}`` range are quoted here instead. In a
    list or mapping value (``data.train=[{url: s3://a/x-{0..9}.tar, weight: 3}, ...]``)
    each unquoted pattern is quoted where it stands.
    """
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and _BRACE.search(value) and not value.startswith(("'", '"')):
            if value.startswith(("[", "{")):
                o = f"{key}={_quote_words(value)}"
            else:
                o = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
        out.append(o)
    return out


_QUOTED = re.compile(r"""('[^']*'|"[^"]*")""")
_PATTERN_WORD = re.compile(r"""[^\s,\[\]'"{}]*\{[^{}$\s]*\.\.[^{}$\s]*\}[^\s,\[\]'"{}]*""")


def _quote_words(value: str) -> str:
    """The brace-pattern words of a structured value, quoted (quoted parts kept as they are)."""
    parts = _QUOTED.split(value)
    for i in range(0, len(parts), 2):  # the parts outside quotes
        parts[i] = _PATTERN_WORD.sub(lambda m: f"'{m.group(0)}'", parts[i])
    return "".join(parts)


def parse(overrides: Sequence[str], *, sweeps: bool = False) -> list[Override]:
    """Hydra's parse of ``overrides``; a sweep (``key=a,b``) only when ``sweeps``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(quote_brace_patterns(overrides))
    except HydraException as e:
        raise ConfigError(f"cannot parse the overrides: {e}") from e
    for o in parsed:
        if o.is_sweep_override() and not sweeps:
            raise ConfigError(f"`{o.input_line}` sweeps several values: run a sweep with "
                              f"`sslstream train -m {' '.join(overrides)}`", o.key_or_group)
    return parsed


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of a sweep, in Hydra's order (the first key varies slowest):
    ``["method=byol,simclr", "optim.lr=0.5,1.0"]`` -> four override lists."""
    options: list[list[str]] = []
    for o in parse(overrides, sweeps=True):
        if not o.is_sweep_override():
            options.append([o.input_line])
            continue
        if o.is_delete():
            raise ConfigError(f"`{o.input_line}`: a removal cannot sweep", o.key_or_group)
        head = o.input_line.partition("=")[0]
        options.append([f"{head}={v}" for v in o.sweep_string_iterator()])
    return [quote_brace_patterns(list(c)) for c in itertools.product(*options)]


def swept_keys(overrides: Sequence[str]) -> set[str]:
    """The keys (and choices) a sweep varies: ``method`` and ``optim.lr`` of
    ``["method=byol,simclr", "optim.lr=0.5,1.0", "backbone.widths=[8,16]"]``."""
    return {o.key_or_group for o in parse(overrides, sweeps=True) if o.is_sweep_override()}


def split_choices(parsed: Sequence[Override]) -> tuple[dict[str, str], list[Override]]:
    """({choice: option} for method/recipe/optim/data/backbone/tracking, value overrides).

    ``method.name=x`` and ``optim.name=x`` are the choices ``method=x`` and ``optim=x``."""
    choices: dict[str, str] = {}
    values = []
    for o in parsed:
        key = o.key_or_group
        if key in ("method.name", "optim.name"):
            key = key.partition(".")[0]
        if key in CHOICES and not o.is_delete() and o.package is None:
            value = o.value()
            if not isinstance(value, str) or not value:
                raise ConfigError(f"`{o.input_line}`: {key} takes the name of a {key} "
                                  f"(`sslstream train --help` lists them)", key)
            choices[key] = value
        else:
            values.append(o)
    return choices, values


# --- keys -----------------------------------------------------------------------------------

_FREE = object()


def _schema_at(root: type, tree: DictConfig, key: str) -> Any:
    """The annotation of ``key`` in the schema (``_FREE`` below a free-form key), or
    KeyError((parent, known keys of the parent))."""
    hint: Any = root
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        parent = ".".join(parts[:i])
        if hint is not root and free_form(hint):
            return _FREE
        cls = root if hint is root else sub_dataclass(hint, node if isinstance(node, DictConfig) else None)
        if cls is None:
            if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
                node, hint = node[int(part)], Any
                continue
            raise KeyError((parent, []))
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if part == "name" and issubclass(cls, MethodConfig | OptimConfig) and "name" not in names:
            names = ["name", *names]  # a method's / optimiser's name: set by its choice
        if part not in names:
            raise KeyError((parent, names))
        hint = str if part not in cls.__dataclass_fields__ else field_hint(cls, part)
        node = node.get(part) if isinstance(node, DictConfig) else None
    return hint


def _all_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, DictConfig):
        for k in node:
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _all_keys(node._get_node(k), key)


def _unknown(key: str, line: str, parent: str, siblings: list[str], tree: DictConfig) -> ConfigError:
    leaf = key.rpartition(".")[2]
    near = [f"{parent}.{s}" if parent else s for s in nearest(leaf, siblings, n=3)]
    others = [k for k in _all_keys(tree) if not key.startswith(k + ".")]  # not its own parents
    near += [k for k in others if k.rpartition(".")[2] == leaf and k not in near]  # another section's
    near += [k for k in nearest(key, others, n=3, cutoff=0.75) if k not in near]
    msg = f"unknown config key {key} (in `{line}`)"
    if near:
        msg += f"; did you mean {' or '.join(near[:3])}?"
    elif siblings:
        shown = ", ".join(siblings[:40]) + (", ..." if len(siblings) > 40 else "")
        msg += f". Keys of {parent or 'the config'}: {shown}."
    elif parent:
        msg += f": {parent} has no keys below it"
    return ConfigError(msg + " (`sslstream train --cfg` prints every key)", key)


def apply_values(tree: DictConfig, values: Sequence[Override], root: type) -> None:
    """Apply value overrides to ``tree`` (complete: the schema's defaults filled in), in
    order, as Hydra would (``key=v`` sets, merging a mapping into a mapping; ``+``/``++``
    set too; ``~key`` removes), checking each key against the schema ``root``."""
    for o in values:
        key = o.key_or_group
        if o.package is not None:
            raise ConfigError(f"`{o.input_line}`: a package (@) applies to a choice "
                              f"({', '.join(CHOICES)}), not to a key", key)
        try:
            hint = _schema_at(root, tree, key)
        except KeyError as e:
            parent, siblings = e.args[0]
            raise _unknown(key, o.input_line, parent, siblings, tree) from None
        if o.is_delete():
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(tree, parent_key) if parent_key else tree
            if hint is _FREE and isinstance(parent, DictConfig) and leaf in parent:
                del parent[leaf]
                continue
            if hint is _FREE:
                continue
            default = OmegaConf.select(tree, key, throw_on_missing=False)
            raise ConfigError(f"`{o.input_line}`: {key} cannot be removed: every key of the "
                              f"config has a value (here {_shown(default)}); set "
                              f"{key}=<value> instead", key)
        OmegaConf.update(tree, key, o.value(), merge=True, force_add=True)


def _shown(v: Any) -> str:
    if isinstance(v, DictConfig | ListConfig):
        return "a " + ("mapping" if isinstance(v, DictConfig) else "list")
    return "null" if v is None else str(v)
