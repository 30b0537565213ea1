"""The `sslstream` command: train, eval, retrain, shards.

    sslstream train [--cfg] [key=value ...]      the main job (Hydra overrides)
    sslstream eval  (--checkpoint PATH | --model URI) [key=value ...]
    sslstream retrain [key=value ...]            the scheduled retraining job
    sslstream shards {make,verify,index} ...     write / check / index WebDataset shards

The config is composed with Hydra's compose API over the installed `conf` package, so the
command works from any directory and never changes the working directory (relative paths
in overrides mean what the user thinks). Also runnable as `python -m sslstream.orchestration.cli`,
which is what torchrun launches: `torchrun --nproc-per-node 8 -m sslstream.orchestration.cli train`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

USAGE = """usage: sslstream {train,eval,retrain,shards} ...

  sslstream train [--cfg] [key=value ...]     train (and evaluate, register) an encoder
  sslstream eval (--checkpoint PATH | --model URI) [key=value ...]
                                              kNN / linear-probe evaluation of an encoder
  sslstream retrain [key=value ...]           scheduled retraining (new shards -> promote)
  sslstream shards {make,verify,index} ...    write, verify or index WebDataset shards

Overrides use Hydra syntax, e.g. `sslstream train method=simclr trainer.epochs=100`
or `sslstream train data=shards data.train=s3://bucket/train-{000000..000127}.tar`.
`--cfg` prints the resolved config and exits.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2  # also every configuration error (orchestration/errors.py: ConfigError)
# Stopped by a signal after keeping a resumable state (128 + signal number, the shell's
# convention): rerun the same command to resume. `sslstream retrain` exits 8 instead.
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGUSR1 = 138  # Slurm's notice before the time limit (docs/cluster.md: requeue on it)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config, unchecked (see orchestration/schema.py: `compose_checked`)."""
    from sslstream.orchestration.schema import compose_config as compose
    from sslstream.orchestration.schema import quote_brace_patterns

    return compose(quote_brace_patterns(overrides))


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
    from sslstream.orchestration.schema import compose_checked

    # every key, type and range is checked here, before any data is touched
    cfg = compose_checked(overrides, allow_missing=bool(opts.get("--cfg")))
    if opts.get("--cfg"):
        from sslstream.orchestration.tracking.settings import (
            redact_config,  # no credential is printed
        )

        print(OmegaConf.to_yaml(OmegaConf.create(redact_config(
            OmegaConf.to_container(cfg, resolve=True)))), end="")
        return opts, None
    return opts, cfg


def cmd_train(args: list[str]) -> int:
    _, cfg = _parse(args)
    if cfg is None:
        return 0
    from sslstream.orchestration.errors import RegistrationError
    from sslstream.orchestration.train.loop import run_from_config
    from sslstream.orchestration.train.step import NonFiniteLossError

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
    from sslstream.orchestration.evaluate.run import evaluate_saved

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
    from sslstream.orchestration.retrain.job import retrain

    return int(retrain(cfg))


def cmd_shards(args: list[str]) -> int:
    from sslstream.pipelines.shards.tools import main as shards_main

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
    from sslstream.orchestration.runtime.interrupt import Interrupted, interrupts

    interrupts.install()  # SIGINT / SIGTERM / SIGUSR1 -> Interrupted (train keeps a resumable state)
    try:
        return COMMANDS[cmd](rest)
    except SystemExit as e:  # usage errors here and argparse in `shards` exit with a code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except Interrupted as e:
        print(f"sslstream {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sslstream {cmd}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Exception as e:
        return _report(cmd, e)
    finally:
        interrupts.uninstall()


def _report(cmd: str, e: Exception) -> int:
    """A configuration error: exit 2; bad input: exit 1; both as one line. Anything else is
    a bug or an outage: re-raised, so Python prints its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from sslstream.orchestration.errors import ConfigError

    if isinstance(e, ConfigError | HydraException | OmegaConfBaseException) or _is_config_error(e):
        msg = str(e)
        print(f"sslstream {cmd}: {msg if msg.startswith('config error') else 'config error: ' + msg}",
              file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, _user_errors()) and not os.environ.get("SSLSTREAM_TRACEBACK"):
        # a missing shard / file / split, refused credentials, corrupt data: the message
        # names the input; a traceback would bury it (our frames, not theirs)
        print(f"sslstream {cmd}: error: {e}\n(set SSLSTREAM_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    raise e


def _is_config_error(e: BaseException) -> bool:
    """A bad `method.*` key: models cannot import orchestration, so its error is its own
    class (models.methods.base.MethodConfigError), mapped to the same exit code here."""
    from sslstream.models.methods.base import MethodConfigError

    return isinstance(e, MethodConfigError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input (their messages name it), not a bug."""
    from sslstream.orchestration.errors import UserError
    from sslstream.pipelines.shards.errors import DataError
    from sslstream.pipelines.shards.storage import StorageError
    from sslstream.pipelines.shards.stream import BadDataError

    return (UserError, DataError, StorageError, BadDataError, FileNotFoundError, PermissionError,
            NotADirectoryError)


if __name__ == "__main__":
    sys.exit(main())
