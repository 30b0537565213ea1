"""The config, composed and checked before anything is touched: unknown keys, types, ranges.

Hydra composes conf/ (every default lives there). A typo must fail at once, naming the key,
not after the data was generated or a model trained. So every command composes through
`compose_checked`, which

1. checks each command-line override against the *tree of defaults*: the config composed
   with the same group choices (`method=simclr`, `data=cifar10`, ...) but no value
   overrides. A key that is not in that tree is unknown, also when written `+key=value`
   (Hydra's own hint for a typo, which would run with the key silently ignored); the message
   offers the nearest known keys ("did you mean"). Keys below a node whose default is empty
   (`{}` or null, e.g. `data.storage_options`) are free-form and pass.
2. checks every value of the composed config: against the type of its default (a bool stays
   a bool, an int an int, a float any number), then against `RULES` (allowed values,
   ranges, null, `auto`), and that no mandatory `???` value is left.

Nothing here lists the keys themselves: the tree of defaults does, so a key that another
branch adds to conf/ is known without editing this module. `RULES` only narrows values
(and a rule for a key that is not in the tree is ignored). Errors are `ConfigError` (exit 2).

Map: `__init__` (compose, keys, values), `rules.py` (`Rule`, `RULES`). May import
orchestration.errors, pipelines.views (the recipe's checks) and models (the methods' typed
configs).
Imported by: orchestration.cli, tests.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.schema.rules import RULES, Rule, rule_for, type_rule

__all__ = ["RULES", "Rule", "check_config", "check_overrides", "compose_checked", "compose_config"]

_BRACE = re.compile(r"\{[^{}$]*\.\.[^{}$]*\}")
_FREE = object()  # marker: below this node anything goes


def quote_brace_patterns(overrides: Sequence[str]) -> list[str]:
    """`data.train=s3://b/train-{000000..000127}.tar` -> `data.train='s3://b/...'`.

    Hydra's override grammar reserves `{`, so a WebDataset brace pattern would need quoting
    inside shell quoting; values holding a `{a..b}` range are quoted here instead.
    """
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and _BRACE.search(value) and not value.startswith(("'", '"')):
            o = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
        out.append(o)
    return out


# The recipe each data config implies (conf/recipe/): 32 px CIFAR-like sets train the CIFAR
# recipe, a user's own shards (224 px photographs) the ImageNet one.
DATA_RECIPES = {"cifar10": "cifar", "synthetic": "cifar", "shards": "imagenet"}


def with_default_recipe(overrides: Sequence[str]) -> list[str]:
    """`overrides` + `recipe=<the data's recipe>` unless they name a recipe themselves.

    Hydra cannot pick a group's default from another group's choice by a mapping (an
    `override` inside the interpolated data_recipe subtree is refused), so it is done here."""
    out = list(overrides)
    keys = {o.partition("=")[0].lstrip("+~") for o in out}
    if "recipe" in keys:
        return out
    data = "synthetic"
    for o in out:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+") == "data":
            data = value
    recipe = DATA_RECIPES.get(data)
    return [*out, f"recipe={recipe}"] if recipe else out


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config: conf/config.yaml + its groups + `overrides` (Hydra syntax).

    Unchecked (tests and tools that want Hydra's plain behaviour); commands use
    `compose_checked`.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="sslstream.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=with_default_recipe(overrides))
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.resolve(cfg)
    return cfg


def compose_checked(overrides: Sequence[str] = (), *, allow_missing: bool = False) -> DictConfig:
    """`compose_config` after `check_overrides`, then `check_config` on the result."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    quoted = with_default_recipe(quote_brace_patterns(overrides))
    groups, values = _split_overrides(quoted)
    _check_group_choices(groups)
    try:
        reference = compose_config(groups)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config error: {e}") from e
    check_overrides(values, reference)
    quoted = _free_form_forced(quoted, values, reference)
    try:
        cfg = compose_config(quoted)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config error: {_without_values(_strip_plus_hint(str(e)))}") from e
    check_config(cfg, reference, allow_missing=allow_missing)
    return cfg


# --- 1. keys ------------------------------------------------------------------------------


def _conf_dir() -> Any:
    return resources.files("sslstream.conf")


def _is_group(key: str) -> bool:
    node = _conf_dir()
    for part in key.split("/") if "/" in key else key.split("."):
        node = node / part
    return node.is_dir()


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[Any]]:
    """(group choices as typed, parsed value overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
    except HydraException as e:
        raise _parse_error(parser, overrides, e) from e
    groups, values = [], []
    for o in parsed:
        (groups if _is_group(o.key_or_group) else values).append(o)
    return [o.input_line for o in groups], values


def _parse_error(parser: Any, overrides: Sequence[str], e: Exception) -> ConfigError:
    """Which override does not parse, by its key; Hydra's text quotes the value (which may
    be a secret), so quoted input is left out."""
    from hydra.errors import HydraException

    bad = ""
    for line in overrides:
        try:
            parser.parse_overrides([line])
        except HydraException:
            bad = line.partition("=")[0]
            break
    why = re.sub(r"'[^'\n]*'", "'...'", str(e).split("\n", 1)[0])
    where = f"the override of {bad}" if bad else "the overrides"
    return ConfigError(f"cannot parse {where}: {why} (value not repeated here; Hydra's "
                       "override syntax: https://hydra.cc/docs/advanced/override_grammar/basic/)",
                       bad.lstrip("+~"))


def _check_group_choices(groups: Sequence[str]) -> None:
    """`method=simcrl`: name the group's options and the nearest one."""
    for line in groups:
        key, _, value = line.lstrip("+~").partition("=")
        key = key.split("@")[0]
        if not value or value.startswith(("${", "null")):
            continue
        folder = _conf_dir()
        for part in key.replace(".", "/").split("/"):
            folder = folder / part
        options = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        if value not in options:
            raise ConfigError(f"{key}={value} is not a config option; {key} is one of: "
                              f"{', '.join(options)}{_did_you_mean(value, options)}", key)


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every node and leaf below `node` (raw, not resolved)."""
    if isinstance(node, DictConfig):
        for k in node:
            key = f"{prefix}.{k}" if prefix else str(k)
            child = node._get_node(k)
            if isinstance(child, DictConfig | ListConfig):
                yield key, child
                yield from _walk(child, key)
            else:
                yield key, child._value() if child is not None else None


def _lookup(reference: DictConfig, key: str) -> Any:
    """The default at `key`, `_FREE` below a free-form node, or KeyError."""
    node: Any = reference
    for part in key.split("."):
        if isinstance(node, DictConfig):
            if len(node) == 0:
                return _FREE
            if part not in list(node.keys()):  # `in node` is False for a `???` value
                raise KeyError(key)
            child = node._get_node(part)
            node = child if isinstance(child, DictConfig | ListConfig) else child._value()
        elif node is None or isinstance(node, ListConfig) and part.isdigit():
            return _FREE
        else:
            raise KeyError(key)
    return node


def check_overrides(values: Sequence[Any], reference: DictConfig) -> None:
    """Every value override names a key of the tree of defaults (or one below a free node)."""
    for o in values:
        if o.is_delete():
            continue
        key = o.key_or_group
        try:
            _lookup(reference, key)
        except KeyError:
            raise ConfigError(_unknown_key_message(key, reference, o.input_line), key) from None


def _unknown_key_message(key: str, reference: DictConfig, line: str) -> str:
    parent, _, leaf = key.rpartition(".")
    siblings: list[str] = []
    try:
        node = _lookup(reference, parent) if parent else reference
        if isinstance(node, DictConfig):
            siblings = [str(k) for k in node]
    except KeyError:
        pass
    keys = [k for k, _ in _walk(reference)]
    near = [f"{parent}.{s}" if parent else s
            for s in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    near += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.75) if k not in near]
    msg = f"unknown config key {key} (in `{line}`)"
    if near:
        msg += f"; did you mean {' or '.join(near[:3])}?"
    elif siblings:
        shown = ", ".join(siblings[:40]) + (", ..." if len(siblings) > 40 else "")
        msg += f" Keys of {parent or 'the config'}: {shown}."
    msg += " (`sslstream train --cfg` prints the whole config)"
    return msg


def _strip_plus_hint(text: str) -> str:
    """Hydra suggests `+key=value` for an unknown key; that would run with the key ignored.
    The hint repeats the override's value (to the end of its line), which may be a secret."""
    return re.sub(r"\s*To append to your config use \+[^\n]*", "", text)


def _without_values(text: str) -> str:
    """Hydra's `Error merging override key=value`: the key without the value (a secret?)."""
    return re.sub(r"(override \+{0,2}[\w.\-/@]+)=[^\n]*", r"\1=...", text)


def _free_form_forced(lines: list[str], values: Sequence[Any], reference: DictConfig) -> list[str]:
    """`data.storage_options={anon: true}`: a free-form node (`{}` in the defaults, e.g.
    storage options) takes any keys, so a plain override of it, or of a key below it, is
    applied as `++` (Hydra refuses new keys in its struct mode otherwise)."""
    forced = set()
    for o in values:
        if o.is_delete() or o.is_add() or o.is_force_add():
            continue
        node = _lookup(reference, o.key_or_group)
        if node is _FREE or (isinstance(node, DictConfig) and len(node) == 0
                             and isinstance(o.value(), dict)):
            forced.add(o.input_line)
    return [f"++{line}" if line in forced else line for line in lines]


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(word, list(options), n=2, cutoff=0.5)
    return f"; did you mean {' or '.join(near)}?" if near else ""


# --- 2. values ----------------------------------------------------------------------------


def check_config(cfg: DictConfig, reference: DictConfig | None = None, *,
                 allow_missing: bool = False) -> None:
    """Types against the defaults, `RULES`, and no `???` left (unless `allow_missing`)."""
    for key, node in _walk(cfg):
        if isinstance(node, DictConfig | ListConfig):
            continue
        if node == "???":
            if allow_missing:
                continue
            raise ConfigError(f"{key} must be set (it has no default for this config: "
                              f"add {key}=<value> to the command)", key)
        value = node
        rule = rule_for(key)
        default: Any = None
        if reference is not None:
            try:
                default = _lookup(reference, key)
            except KeyError:
                default = _FREE
        if isinstance(default, DictConfig) and len(default) == 0 and value is not None:
            raise ConfigError(f"{key} must be a mapping, e.g. {key}={{anon: true}} (a single "
                              "value was given; not repeated here: it may be a secret)", key)
        if rule is None:
            if default is _FREE or default is None or default == "???":
                continue
            rule = type_rule(default)
            if rule is None:
                continue
            if value is None:
                continue  # null for a typed default: the consumer decides (no rule says)
        if not rule.accepts(value):
            raise ConfigError(f"{key}={_show(value)} is not allowed: expected {rule.describe()}"
                              f"{_did_you_mean(str(value), rule.choices) if rule.choices else ''}",
                              key)
    if not allow_missing:
        _cross_checks(cfg)
        _check_method(cfg)
        _check_augment(cfg)


def _check_augment(cfg: DictConfig) -> None:
    """`augment.*` through the recipe's own validation (ranges that need two keys, e.g.
    crop_scale lo <= hi, equal view sizes), before any data is touched."""
    if "augment" not in cfg:
        return
    from sslstream.pipelines.views.recipes import TwoViewRecipe

    try:
        TwoViewRecipe.from_config(cfg.augment)
    except ValueError as e:
        raise ConfigError(str(e), "augment") from e


def _check_method(cfg: DictConfig) -> None:
    """`method.*` against the method's typed config (models/methods: `config_class`), so a bad
    method key also fails before any data is touched."""
    from sslstream.models.methods import method_class
    from sslstream.models.methods.base import MethodConfigError

    if "method" not in cfg:
        return
    try:
        config_class = getattr(method_class(cfg.method), "config_class", None)
        if config_class is not None and hasattr(config_class, "from_mapping"):
            config_class.from_mapping(cfg.method)
    except MethodConfigError as e:
        raise ConfigError(str(e), "method") from e


def _cross_checks(cfg: DictConfig) -> None:
    """Rules between keys, checked before any data is touched."""
    ev, data = cfg.get("eval") or {}, cfg.get("data") or {}
    if ev.get("at_end", True) or int(ev.get("every_epochs", 0) or 0):
        for key in ("bank", "test"):
            if key in data and not data.get(key):
                raise ConfigError(
                    f"evaluation needs a labelled split: data.{key} is not set (set "
                    f"data.{key}=<shards>, or eval.at_end=false eval.every_epochs=0 to train "
                    "without evaluation: the encoder is registered unevaluated, never promoted; "
                    "docs/data.md, docs/retrain.md)", f"data.{key}")


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, str) and v == "" else str(v)
