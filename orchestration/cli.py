"""The `sslstream` command: train, eval, retrain, shards.

    sslstream train [--cfg] [key=value ...]      the main job (Hydra overrides)
    sslstream eval  (--checkpoint PATH | --model URI) [key=value ...]
    sslstream retrain [key=value ...]            the scheduled retraining job
    sslstream shards {make,verify} ...           write / check WebDataset shards

The config is composed with Hydra's compose API over the installed `conf` package, so the
command works from any directory and never changes the working directory (relative paths
in overrides mean what the user thinks). Also runnable as `python -m orchestration.cli`,
which is what torchrun launches: `torchrun --nproc-per-node 8 -m orchestration.cli train`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

USAGE = """usage: sslstream {train,eval,retrain,shards} ...

  sslstream train [--cfg] [key=value ...]     train (and evaluate, register) an encoder
  sslstream eval (--checkpoint PATH | --model URI) [key=value ...]
                                              kNN / linear-probe evaluation of an encoder
  sslstream retrain [key=value ...]           scheduled retraining (new shards -> promote)
  sslstream shards {make,verify} ...          write or verify WebDataset shards

Overrides use Hydra syntax, e.g. `sslstream train method=simclr trainer.epochs=100`
or `sslstream train data=shards data.train=s3://bucket/train-{000000..000127}.tar`.
`--cfg` prints the resolved config and exits.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2


_BRACE = re.compile(r"\{[^{}$]*\.\.[^{}$]*\}")


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
    """The resolved config: conf/config.yaml + its groups + `overrides` (Hydra syntax), with
    the data's recipe unless `recipe=` is given (`with_default_recipe`)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = with_default_recipe(quote_brace_patterns(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def _split_flags(args: list[str], flags_with_value: Sequence[str], bool_flags: Sequence[str]) -> tuple[dict[str, str | bool], list[str]]:
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    it = iter(args)
    for a in it:
        name, eq, val = a.partition("=")
        if name in flags_with_value:
            if not eq:
                try:
                    val = next(it)
                except StopIteration:
                    raise SystemExit(_usage_error(f"{name} needs a value")) from None
            opts[name] = val
        elif a in bool_flags:
            opts[a] = True
        elif a.startswith("--") and "=" not in a:
            raise SystemExit(_usage_error(f"unknown option {a}"))
        else:
            rest.append(a)
    return opts, rest


def _usage_error(msg: str) -> int:
    print(f"sslstream: {msg}\n\n{USAGE}", file=sys.stderr)
    return EXIT_USAGE


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _parse(args: list[str], flags_with_value: Sequence[str] = ()
           ) -> tuple[dict[str, str | bool], DictConfig | None]:
    """Split a subcommand's flags from its Hydra overrides and compose the config.

    Returns `(opts, None)` when the command is already answered (`--help` printed the usage,
    `--cfg` printed the resolved config), so every subcommand handles them the same way.
    """
    opts, overrides = _split_flags(args, flags_with_value, ("--cfg", "-h", "--help"))
    if opts.get("-h") or opts.get("--help"):
        print(USAGE)
        return opts, None
    cfg = compose_config(overrides)
    if opts.get("--cfg"):
        print(OmegaConf.to_yaml(cfg), end="")
        return opts, None
    return opts, cfg


def cmd_train(args: list[str]) -> int:
    _, cfg = _parse(args)
    if cfg is None:
        return 0
    from orchestration.errors import RegistrationError
    from orchestration.train.loop import run_from_config
    from orchestration.train.step import NonFiniteLossError

    try:
        return run_from_config(cfg)
    except NonFiniteLossError as e:
        print(f"sslstream train: FAILED: {e}. Nothing was registered.", file=sys.stderr)
        return EXIT_FAILED
    except RegistrationError as e:
        print(f"sslstream train: FAILED to register the encoder: {e}. "
              "The final checkpoint is kept; rerun the same command to retry.", file=sys.stderr)
        return EXIT_FAILED


def cmd_eval(args: list[str]) -> int:
    opts, _ = _split_flags(args, ("--checkpoint", "--model"), ("--cfg", "-h", "--help"))
    if not (opts.get("-h") or opts.get("--help")) and (
            bool(opts.get("--checkpoint")) == bool(opts.get("--model"))):
        return _usage_error("eval needs exactly one of --checkpoint PATH or --model URI")
    opts, cfg = _parse(args, ("--checkpoint", "--model"))
    if cfg is None:
        return 0
    from orchestration.evaluate.run import evaluate_saved

    res = evaluate_saved(cfg, checkpoint=opts.get("--checkpoint"), model_uri=opts.get("--model"))  # type: ignore[arg-type]
    if res is not None:
        print(f"kNN accuracy: {res.knn_acc:.4f}")
        if res.probe_acc is not None:
            print(f"linear probe accuracy: {res.probe_acc:.4f}")
        print(f"embedding std: {res.embedding_std:.4g}  effective rank: {res.effective_rank:.4g}"
              f"  ({res.bank_size} bank / {res.test_size} test samples, {res.seconds:.1f}s)")
    return 0


def cmd_retrain(args: list[str]) -> int:
    _, cfg = _parse(args)
    if cfg is None:
        return 0
    from orchestration.retrain.job import retrain

    return int(retrain(cfg))


def cmd_shards(args: list[str]) -> int:
    from pipelines.shards.tools import main as shards_main

    return int(shards_main(args))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "retrain": cmd_retrain, "shards": cmd_shards}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else EXIT_USAGE
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        return _usage_error(f"unknown command {cmd!r}")
    _setup_logging()
    try:
        return COMMANDS[cmd](rest)
    except SystemExit as e:  # usage errors here and argparse in `shards` exit with a code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("sslstream: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # config errors, missing shards, ...: one clear line
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, HydraException | OmegaConfBaseException):
            print(f"sslstream {cmd}: config error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, _user_errors()) and not os.environ.get("SSLSTREAM_TRACEBACK"):
            # a bad value, a missing shard / file / split, refused credentials, corrupt data:
            # the message names the input; a traceback would bury it (our frames, not theirs)
            print(f"sslstream {cmd}: error: {e}\n(set SSLSTREAM_TRACEBACK=1 for the traceback)",
                  file=sys.stderr)
            return EXIT_FAILED
        raise


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input (their messages name it), not a bug."""
    from pipelines.shards.storage import StorageError
    from pipelines.shards.stream import BadDataError

    return (StorageError, BadDataError, FileNotFoundError, PermissionError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
