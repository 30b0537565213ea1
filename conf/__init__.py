"""conf: the presets Hydra composes (yaml) and the typed-config vocabulary (typed.py).

    config.yaml        the defaults list: data preset, recipe, tracking preset
    data/              synthetic, cifar10, shards: the data's keys (and the backbone and
                       schedule it brings)
    recipe/            one file per (method, regime): <method>_<regime>.yaml holds the method's
                       hyper-parameters, augmentation and optimiser, with their sources
    backbone/          resnet_mini, resnet18_cifar, resnet50
    tracking/          local, server
    typed.py           how a key's type, range and default are declared on a dataclass field,
                       and the one validator (`build`, `check`) every config section uses

The keys themselves, their types, ranges and defaults are dataclasses beside the code that
reads them (orchestration/schema/config.py lists them all).

May import: nothing of sslstream (typed.py: annotated_types only).
Imported by: models, pipelines, orchestration (typed.py); Hydra reads the yaml
(orchestration/schema/compose.py).
"""
