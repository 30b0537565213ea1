"""Composing the config a command runs with, checked before any data is touched.

    overrides --parse--> choices (method, recipe, optim, data, backbone, tracking) + values
      -> Hydra composes conf/config.yaml with the chosen files: the data preset (and the
         backbone it brings), the recipe conf/recipe/<method>_<regime>.yaml, the tracking
         preset; ``optim=<other>`` replaces the recipe's optimiser by that one's defaults
      -> the schema's defaults fill every key the files leave out (orchestration/schema/config.py)
      -> the value overrides apply (unknown keys named, with the nearest known ones)
      -> interpolations resolve; every section is built as its dataclass: types and ranges
         (conf/typed.py), then the rules between keys (``_cross_checks``)

The result is a DictConfig holding every key with its typed value (an int given for a float
key is a float), in the schema's order: what ``--cfg`` prints, MLflow logs and the jobs read
(``cfg.trainer.epochs``: no job restates a default). Every mistake is a ``ConfigError``
naming the key (exit 2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from sslstream.conf.typed import ConfigValueError, build, defaults, did_you_mean, to_container
from sslstream.models.optim import OPTIMIZERS, optim_class
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.schema.config import Config, method_config_class
from sslstream.orchestration.schema.overrides import (
    FOLDERS,
    apply_values,
    parse,
    split_choices,
)
from sslstream.orchestration.schema.recipes import group_options, pick_recipe
from sslstream.orchestration.schema.tracking import URI_WORDS, tracking_uri_ok

__all__ = ["advisories", "compose"]

_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")


def compose(overrides: Sequence[str] = (), *, allow_missing: bool = False) -> DictConfig:
    """The checked config for ``overrides`` (Hydra syntax; no sweeps: ``expand_sweep``).

    ``allow_missing``: a mandatory value left unset (``???``, e.g. ``data.train`` of
    ``data=shards``) is kept instead of refused and the rules between keys are skipped
    (``--cfg`` prints such a config).
    """
    choices, values = split_choices(parse(overrides))
    _check_folders(choices)
    recipe = pick_recipe(choices.get("method"), choices.get("recipe"), choices.get("data"))
    tree = _hydra([f"recipe={recipe}", *(f"{g}={choices[g]}" for g in FOLDERS if g in choices)])
    optim = choices.get("optim")
    if optim is not None:
        if optim not in OPTIMIZERS:
            raise ConfigError(f"optim={optim} is not an optimiser; optim is one of: "
                              f"{', '.join(OPTIMIZERS)}{did_you_mean(optim, list(OPTIMIZERS))}",
                              "optim")
        if tree.optim.get("name") != optim:  # another optimiser: none of the recipe's values
            tree.optim = {"name": optim}
    tree = _with_defaults(tree)
    env = _env_sources(tree)
    apply_values(tree, values, Config)
    env.update({k: v for k, v in _env_sources(tree).items() if k not in env})
    plain = _resolve(tree, allow_missing)
    try:
        config = build(Config, plain, allow_missing=allow_missing)
    except ConfigValueError as e:
        raise ConfigError(_with_env_hint(str(e), e.key, env), e.key) from None
    out = OmegaConf.create(config if allow_missing else to_container(config))
    if not allow_missing:
        _cross_checks(out)
    OmegaConf.set_struct(out, True)
    return out


def _check_folders(choices: dict[str, str]) -> None:
    """``data=cifar11``: name the folder's presets and the nearest one."""
    for group in FOLDERS:
        value = choices.get(group)
        if value is None:
            continue
        options = group_options(group)
        if value not in options:
            raise ConfigError(f"{group}={value} is not a config option; {group} is one of: "
                              f"{', '.join(options)}{did_you_mean(value, options)}", group)


def _hydra(choices: list[str]) -> DictConfig:
    """conf/config.yaml composed with ``choices`` (group=option only), unresolved."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="sslstream.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=choices)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config error: {e}") from e
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))


def _with_defaults(tree: DictConfig) -> DictConfig:
    """``tree`` over the schema's defaults: the sections' own, and those of the method and
    optimiser the tree names (their classes come from the registries)."""
    base = defaults(Config)
    try:
        base["method"] = defaults(method_config_class(tree.get("method") or {}))
        base["optim"] = defaults(optim_class(tree.get("optim") or {}))
    except ConfigValueError as e:
        raise ConfigError(str(e), e.key) from None
    merged = OmegaConf.merge(OmegaConf.create(base), tree)
    assert isinstance(merged, DictConfig)
    return merged


def _env_sources(tree: DictConfig, prefix: str = "") -> dict[str, str]:
    """{key: VAR} for values read from the environment (``${oc.env:VAR,...}``)."""
    out: dict[str, str] = {}
    for k in tree:
        key = f"{prefix}.{k}" if prefix else str(k)
        node = tree._get_node(k)
        if isinstance(node, DictConfig):
            out.update(_env_sources(node, key))
        elif (not isinstance(node, ListConfig) and isinstance(raw := node._value(), str)
              and (m := _ENV.search(raw))):
            out[key] = m.group(1)
    return out


def _with_env_hint(message: str, key: str, env: dict[str, str]) -> str:
    var = env.get(key)
    if var is None or var not in os.environ:
        return message
    value = os.environ[var]
    what = "set but empty" if not value.strip() else f"{value!r}"
    return f"{message} (it comes from the environment: {var} is {what}; unset it or fix it)"


def _resolve(tree: DictConfig, allow_missing: bool) -> dict[str, Any]:
    """Plain containers with every interpolation resolved (errors name the key)."""
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        if allow_missing:
            return _resolve_allowing_missing(tree)
        plain = OmegaConf.to_container(tree, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = str(e.full_key)
        raise ConfigError(f"{key} must be set (it has no default here: add {key}=<value> to "
                          "the command)", key) from None
    except OmegaConfBaseException as e:
        key = str(e.full_key or "")
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else f"config error: {msg}", key) from None
    assert isinstance(plain, dict)
    return plain


def _resolve_allowing_missing(tree: DictConfig) -> dict[str, Any]:
    """As ``_resolve``, keeping ``???`` (and values that interpolate one) unresolved."""
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    def walk(node: Any) -> Any:
        if isinstance(node, DictConfig):
            out = {}
            for k in node:
                child = node._get_node(k)
                try:
                    out[k] = walk(child) if isinstance(child, DictConfig | ListConfig) \
                        else node[k]
                except InterpolationToMissingValueError:
                    out[k] = child._value()  # shown as written: ${.train}
                except MissingMandatoryValue:
                    out[k] = "???"
            return out
        if isinstance(node, ListConfig):
            return [walk(node._get_node(i)) if isinstance(node._get_node(i), DictConfig | ListConfig)
                    else node[i] for i in range(len(node))]
        return node

    return walk(tree)


# --- rules between keys ---------------------------------------------------------------------


def _cross_checks(cfg: DictConfig) -> None:
    """Rules that need two keys (or the environment), checked before any data is touched."""
    ev, data = cfg.eval, cfg.data
    if ev.at_end or ev.every_epochs:
        for key in ("bank", "test"):
            if not data[key]:
                raise ConfigError(
                    f"evaluation needs a labelled split: data.{key} is not set (set "
                    f"data.{key}=<shards>, or eval.at_end=false eval.every_epochs=0 to train "
                    "without evaluation: the encoder is registered unevaluated, never promoted; "
                    "docs/data.md, docs/retrain.md)", f"data.{key}")
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri is not None and not tracking_uri_ok(env_uri):
        raise ConfigError(f"MLFLOW_TRACKING_URI={env_uri!r} is not a tracking store: expected "
                          f"{URI_WORDS} (it wins over tracking.uri; unset it or fix it)",
                          "tracking.uri")
    _check_views(cfg)
    tr = cfg.trainer
    if tr.batch_size % tr.accumulate_steps:
        raise ConfigError(
            f"trainer.accumulate_steps={tr.accumulate_steps} does not divide trainer.batch_size="
            f"{tr.batch_size}: each optimizer step is accumulate_steps equal micro-batches of "
            "the per-rank batch; pick a divisor (docs/training.md)", "trainer.accumulate_steps")
    lock = cfg.retrain.lock
    if lock.heartbeat_s is not None and lock.heartbeat_s >= lock.ttl_s:
        raise ConfigError(f"retrain.lock.heartbeat_s={lock.heartbeat_s} must be below "
                          f"retrain.lock.ttl_s={lock.ttl_s} (the lease would expire between "
                          "two renewals)", "retrain.lock.heartbeat_s")


def _check_views(cfg: DictConfig) -> None:
    """The recipe's views fit the method and the backbone: local crops only for a method that
    takes them (and some for one that needs them), and a ViT's patch size dividing every
    crop size (global and local)."""
    from sslstream.models.methods import method_class

    aug = cfg.augment
    local = aug.local.count
    try:
        method_class(cfg.method).check_views(local)
    except ConfigValueError as e:
        raise ConfigError(str(e), e.key) from None
    patch = cfg.backbone.patch_size
    if patch is None:
        return
    crops = [("augment.view1.size", aug.view1.size)]
    if local:
        crops.append(("augment.local.size", aug.local.size))
    for key, size in crops:
        if size % patch:
            raise ConfigError(
                f"{key}={size} is not a multiple of backbone.patch_size={patch}: a ViT cuts "
                f"each crop into whole patches; set {key} to a multiple of {patch} (or another "
                "backbone.patch_size)", key)


def advisories(cfg: DictConfig) -> list[str]:
    """Settings that run but are probably not what the user meant (printed as warnings)."""
    out = []
    size, side = cfg.augment.view1.size, cfg.data.image_size
    if size > side:
        out.append(
            f"recipe={cfg.recipe} makes {size} px views of data.image_size={side} px images "
            f"({size / side:.0f}x upsampled) for a {cfg.backbone.name}: "
            f"{'recipe=cifar suits small images' if cfg.recipe != 'cifar' else 'set augment.view1.size/view2.size'}"
            f"; if the images are larger, set data.image_size")
    return out


