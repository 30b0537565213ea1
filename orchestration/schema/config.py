"""The whole config: one dataclass whose fields are the sections, each typed below.

    run_name, seed, recipe            top-level keys
    trainer, eval                     orchestration/schema/trainer.py
    data                              orchestration/schema/data.py
    backbone                          models/backbone_config.py
    method                            models/methods/<name>.py (the class ``method.name`` registers)
    optim                             models/optim.py (the class ``optim.name`` registers)
    augment                           pipelines/views/recipes.py
    tracking                          orchestration/schema/tracking.py
    retrain                           orchestration/schema/retrain.py
    embed                             orchestration/schema/embed.py

Adding a key is adding a field to its section's dataclass (type, range, default, a comment
that says what it does); nothing else lists keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from sslstream.conf.typed import Choose, Ge, MinLen, Typed
from sslstream.models.backbone_config import BackboneConfig
from sslstream.models.methods import MethodConfig, method_class
from sslstream.models.optim import OptimConfig, optim_class
from sslstream.orchestration.schema.data import DataConfig
from sslstream.orchestration.schema.embed import EmbedConfig
from sslstream.orchestration.schema.retrain import RetrainConfig
from sslstream.orchestration.schema.tracking import TrackingSettings
from sslstream.orchestration.schema.trainer import EvalConfig, TrainerConfig
from sslstream.pipelines.views.recipes import TwoViewRecipe

__all__ = ["Config", "method_config_class"]


def method_config_class(cfg: Mapping[str, Any]) -> type[MethodConfig]:
    """The config dataclass of the method ``cfg["name"]`` names (the registry's)."""
    return method_class(cfg).config_class


@dataclass(frozen=True, kw_only=True)
class Config(Typed):
    """``sslstream train --cfg`` prints one of these (docs/training.md)."""

    config_key: ClassVar[str] = ""
    # checkpoints live in <trainer.output_dir>/<run_name>; a second run with the same
    # run_name resumes from its newest checkpoint
    run_name: Annotated[str, MinLen(1)] = "${method.name}-${data.name}"
    seed: Annotated[int, Ge(0)] = 0
    recipe: Annotated[str, MinLen(1)] = "cifar"  # the regime of conf/recipe/<method>_<recipe>.yaml
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig
    backbone: BackboneConfig
    method: Annotated[MethodConfig, Choose(method_config_class)]
    optim: Annotated[OptimConfig, Choose(optim_class)]
    augment: TwoViewRecipe
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
