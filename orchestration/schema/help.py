"""``sslstream train --help`` (and eval / retrain): the choices, the common keys, ``--cfg``.

The options and defaults are read from the schema, the registries and conf/, so the help
lists what the code accepts.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from sslstream.models.methods import METHODS
from sslstream.models.optim import OPTIMIZERS
from sslstream.orchestration.schema.compose import compose
from sslstream.orchestration.schema.recipes import (
    DATA_REGIMES,
    DEFAULT_DATA,
    DEFAULT_METHOD,
    group_options,
    regimes,
)

__all__ = ["help_text"]

HEADS = {
    "train": ("sslstream train [-m] [--cfg] [key=value ...]",
              "Train an encoder on shards, evaluate it (kNN, linear probe) and register it in MLflow."),
    "eval": ("sslstream eval (--checkpoint PATH | --model URI) [--cfg] [key=value ...]",
             "Evaluate a checkpoint or a registered encoder (kNN, linear probe) on data.bank / data.test."),
    "retrain": ("sslstream retrain [--cfg] [key=value ...]",
                "Scheduled retraining: train on new shards, register, promote if better (docs/retrain.md)."),
    "embed": ("sslstream embed --model URI --out URL [--overwrite] [--neighbours K --queries Q] "
              "[--cfg] [key=value ...]",
              "Embeddings of embed.source (default data.train) as Parquet files (docs/embed.md)."),
    "export": ("sslstream export --model URI --format onnx|torchscript --out PATH [key=value ...]",
               "The encoder as one ONNX or TorchScript file, preprocessing inside (docs/tracking.md)."),
}

# the keys a newcomer changes first, with what they do (their defaults come from the schema)
COMMON = [
    ("trainer.epochs", "passes over data.train"),
    ("trainer.max_steps", "stop after this many steps (null: epochs x steps per epoch)"),
    ("trainer.batch_size", "per rank (global batch = batch_size x ranks)"),
    ("trainer.output_dir", "checkpoints: <output_dir>/<run_name>/step-*.pt"),
    ("trainer.device", "auto | cpu | cuda"),
    ("run_name", "the run's name; the same name resumes its newest checkpoint"),
    ("optim.lr", "at optim.base_batch, scaled with the global batch"),
    ("data.train", "shards: a folder, manifest URL, brace pattern or list (s3://, gs://, local)"),
    ("data.test", "labelled shards for the evaluation (data.bank: the kNN bank, default train)"),
    ("eval.every_epochs", "also evaluate during training (0: only at the end)"),
    ("tracking.uri", "MLflow store (null: $MLFLOW_TRACKING_URI, else ./mlflow.db)"),
    ("tracking.enabled", "false: no MLflow run, nothing registered"),
]


def _show(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def help_text(command: str = "train") -> str:
    usage, what = HEADS.get(command, HEADS["train"])
    by_data = ", ".join(f"{d} -> {r}" for d, r in DATA_REGIMES.items())
    lines = [
        f"usage: {usage}", "", what, "",
        "Choices (each picks preset files; any single key=value below still overrides):",
        f"  data=<preset>      {' | '.join(group_options('data'))} (default {DEFAULT_DATA})",
        f"  method=<name>      {' | '.join(METHODS)} (default {DEFAULT_METHOD})",
        f"  recipe=<regime>    {' | '.join(regimes())} (default: the data's; {by_data}):",
        "                     conf/recipe/<method>_<regime>.yaml holds the method's hyper-",
        "                     parameters, augmentation and optimiser, with their sources",
        f"  optim=<name>       {' | '.join(OPTIMIZERS)}: another optimiser than the recipe's (its defaults)",
        f"  backbone=<preset>  {' | '.join(group_options('backbone'))} (default: the data's)",
        f"  tracking=<preset>  {' | '.join(group_options('tracking'))} (default local)",
        "",
        "Common keys, with the embedded default's values:",
    ]
    embedded = compose([], allow_missing=True)
    pairs = [(f"{key}={_show(OmegaConf.select(embedded, key))}", words) for key, words in COMMON]
    width = max(len(p) for p, _ in pairs)
    lines += [f"  {p:<{width}}  {words}" for p, words in pairs]
    lines += [
        "",
        "Every key, its value and range: `sslstream train --cfg [key=value ...]` prints the",
        "resolved config; the keys are fields of orchestration/schema/config.py's sections.",
    ]
    if command == "train":
        lines += ["Sweep: `sslstream train -m method=byol,simclr optim.lr=0.5,1.0` runs each "
                  "combination", "as its own MLflow run under one parent run."]
    lines += ["Docs: docs/training.md (keys, recipes), docs/methods.md, docs/data.md."]
    return "\n".join(lines)
