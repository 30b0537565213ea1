"""The config: every key typed once, composed from the presets, checked before anything runs.

A typo must fail at once, naming the key, not after the data was generated or a model
trained. Every command composes through `compose_checked`:

    config.py     the whole config as one dataclass (`Config`); its sections are dataclasses
                  here (trainer.py: trainer + eval, data.py, tracking.py, retrain.py) and in
                  models/ (backbone, each method, each optimiser) and pipelines/views
                  (augment): every key's type, range and default, in one place each
    recipes.py    which conf/recipe/<method>_<regime>.yaml a command uses (method=, recipe=,
                  the data's default regime)
    overrides.py  Hydra's override grammar: choices vs values, sweeps (`-m`), applying values
                  with unknown keys named ("did you mean")
    compose.py    Hydra composes the chosen presets; the schema fills every default; the
                  values apply; conf/typed.py checks types and ranges; then the rules
                  between keys. Errors are `ConfigError` (exit 2)
    help.py       `sslstream train --help`: the choices and the common keys, from the schema

Adding a key: a field in its section's dataclass (nothing else lists keys).

May import: orchestration.errors, models (the methods', optimisers' and backbone's configs),
pipelines.views (the augmentation's), sslstream.conf.
Imported by: orchestration.cli, orchestration.train (sweeps), orchestration.tracking (the
tracking settings), orchestration.retrain, tests, benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.schema.compose import advisories, compose
from sslstream.orchestration.schema.overrides import (
    expand_sweep,
    quote_brace_patterns,
    swept_keys,
)
from sslstream.orchestration.schema.recipes import augment_recipe, load_recipe

__all__ = ["ConfigError", "advisories", "augment_recipe", "compose_checked", "compose_config",
           "expand_sweep", "load_recipe", "quote_brace_patterns", "swept_keys"]


def compose_checked(overrides: Sequence[str] = (), *, allow_missing: bool = False) -> DictConfig:
    """The checked config of a command (see compose.py); ConfigError names any mistake."""
    return compose(overrides, allow_missing=allow_missing)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The checked config for tools and tests: a mandatory value may stay unset (``???``,
    e.g. ``data.train`` of ``data=shards``) and the rules between keys are not applied."""
    return compose(overrides, allow_missing=True)
