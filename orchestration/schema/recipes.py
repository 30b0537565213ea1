"""Which recipe file a command composes: conf/recipe/<method>_<regime>.yaml.

A recipe file holds one method's values for one regime (``cifar``: 32 px CIFAR-like images,
``imagenet``: 224 px photographs): the method's hyper-parameters, its augmentation and its
optimiser, each with the paper or reference it comes from. The command line picks it with
``method=<name>`` and ``recipe=<regime>`` (or ``recipe=<method>_<regime>``); the regime
defaults to the data's (``DATA_REGIMES``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sslstream.conf.typed import did_you_mean
from sslstream.models.methods import METHODS
from sslstream.orchestration.errors import ConfigError

__all__ = ["DATA_REGIMES", "DEFAULT_METHOD", "augment_recipe", "conf_dir", "group_options",
           "load_recipe", "pick_recipe", "recipe_names", "regimes", "split_recipe"]

# The regime each data preset implies: 32 px sets train the CIFAR recipe, a user's own shards
# (224 px photographs) the ImageNet one. A data preset not listed here: cifar.
DATA_REGIMES = {"cifar10": "cifar", "synthetic": "cifar", "shards": "imagenet"}
DEFAULT_METHOD = "byol"  # conf/config.yaml's default recipe is byol_cifar
DEFAULT_DATA = "synthetic"


def conf_dir() -> Any:
    return resources.files("sslstream.conf")


def group_options(group: str) -> list[str]:
    """The presets of a conf/ folder (``data``: cifar10, shards, synthetic)."""
    folder = conf_dir() / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_names() -> list[str]:
    return group_options("recipe")


def regimes() -> list[str]:
    """The regimes some recipe file has (cifar, imagenet)."""
    out = set()
    for name in recipe_names():
        for method in METHODS:
            if name.startswith(method + "_"):
                out.add(name[len(method) + 1:])
    return sorted(out)


def split_recipe(name: str) -> tuple[str, str] | None:
    """``barlow_twins_cifar`` -> (barlow_twins, cifar); None when no method prefixes it."""
    for method in sorted(METHODS, key=len, reverse=True):
        if name.startswith(method + "_"):
            return method, name[len(method) + 1:]
    return None


def pick_recipe(method: str | None, recipe: str | None, data: str | None) -> str:
    """The recipe file for the command's ``method=``, ``recipe=`` and ``data=`` choices."""
    if method is not None and method not in METHODS:
        raise ConfigError(f"method={method} is not a method; method is one of: "
                          f"{', '.join(METHODS)}{did_you_mean(method, list(METHODS))}", "method")
    names, known_regimes = recipe_names(), regimes()
    if recipe is not None and recipe not in known_regimes:
        parts = split_recipe(recipe)
        if parts is None or recipe not in names:
            raise ConfigError(
                f"recipe={recipe} is neither a regime ({', '.join(known_regimes)}) nor a recipe "
                f"file ({', '.join(names)}){did_you_mean(recipe, known_regimes + names)}",
                "recipe")
        if method is not None and method != parts[0]:
            raise ConfigError(f"recipe={recipe} is {parts[0]}'s recipe but method={method}: "
                              f"name one (method={method} recipe={parts[1]})", "recipe")
        return recipe
    regime = recipe or DATA_REGIMES.get(data or DEFAULT_DATA, "cifar")
    name = f"{method or DEFAULT_METHOD}_{regime}"
    if name not in names:
        have = [n for n in names if split_recipe(n) and split_recipe(n)[0] == (method or DEFAULT_METHOD)]
        raise ConfigError(f"there is no recipe {name} (conf/recipe/{name}.yaml); "
                          f"{method or DEFAULT_METHOD} has {', '.join(have) or 'none'}", "recipe")
    return name


def load_recipe(name: str) -> DictConfig:
    """conf/recipe/<name>.yaml as written (its ``defaults`` list included)."""
    path = conf_dir() / "recipe" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"there is no recipe {name}; one of: {', '.join(recipe_names())}",
                          "recipe")
    return OmegaConf.create(path.read_text())


def augment_recipe(name: str) -> Any:
    """The checked augmentation (``TwoViewRecipe``) of recipe file ``name`` (``byol_cifar``):
    for tools and tests that drive the loader without a whole config."""
    from sslstream.pipelines.views.recipes import TwoViewRecipe

    return TwoViewRecipe.from_config(load_recipe(name).augment)
