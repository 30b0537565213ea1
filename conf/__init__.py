"""conf: the presets Hydra composes (yaml) and the typed-config vocabulary (typed.py).

    config.yaml        the defaults list: data preset, recipe, tracking preset
    data/              synthetic, cifar10, shards: the data's keys (and the backbone and
                       schedule it brings)
    recipe/            one file per (method, regime): <method>_<regime>.yaml holds the method's
                       hyper-parameters, augmentation and optimiser, with their sources
    backbone/          resnet_mini, resnet18_cifar, resnet50
    tracking/          local, server
    typed.py           the one validator every config section uses (`build`, `check`,
                       `Typed`), and the vocabulary a field's annotation uses, re-exported
    annotations.py     reading a field's annotation: type, range (Check), Choose
    words.py           a type and a value in the words of an error message

The keys themselves, their types, ranges and defaults are dataclasses beside the code that
reads them (orchestration/schema/config.py lists them all).

May import: nothing of sslstream's rooms (annotated_types; its own modules).
Imported by: models, pipelines, orchestration (typed.py); Hydra reads the yaml
(orchestration/schema/compose.py).
"""
