"""The `sslstream` command: train, eval, retrain, embed, export, shards.

    sslstream train [-m] [--cfg] [key=value ...] the main job (Hydra overrides; -m: a sweep)
    sslstream eval  (--checkpoint PATH | --model URI) [key=value ...]
    sslstream retrain [key=value ...]            the scheduled retraining job
    sslstream embed --model URI --out URL [key=value ...]   embeddings of a data set
    sslstream export --model URI --format onnx|torchscript --out PATH
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
import threading
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

USAGE = """usage: sslstream {train,eval,retrain,embed,export,shards} ...

  sslstream train [-m] [--cfg] [key=value ...]
                                              train (and evaluate, register) an encoder
  sslstream eval (--checkpoint PATH | --model URI) [key=value ...]
                                              kNN / linear-probe evaluation of an encoder
  sslstream retrain [key=value ...]           scheduled retraining (new shards -> promote)
  sslstream embed --model URI --out URL [--overwrite] [--neighbours K --queries Q]
                  [key=value ...]             embeddings of embed.source as Parquet files
  sslstream export --model URI --format onnx|torchscript --out PATH [key=value ...]
                                              the encoder as one file (uint8 NHWC in)
  sslstream shards {make,verify,index} ...    write, verify or index WebDataset shards

Overrides use Hydra syntax, e.g. `sslstream train method=simclr trainer.epochs=100`
or `sslstream train data=shards data.train=s3://bucket/train-{000000..000127}.tar`.
`--cfg` prints the resolved config and exits; `sslstream train --help` lists the choices
(data, method, recipe, ...) and the common keys.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2  # also every configuration error (orchestration/errors.py: ConfigError)
# Stopped by a signal after keeping a resumable state (128 + signal number, the shell's
# convention): rerun the same command to resume. `sslstream retrain` exits 8 instead.
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGUSR1 = 138  # Slurm's notice before the time limit (docs/cluster.md: requeue on it)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved config for tools and tests (orchestration/schema: `compose_config`)."""
    from sslstream.orchestration.schema import compose_config as compose

    return compose(overrides)


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
    """Our INFO lines on stderr, with credentials masked (pipelines/shards/masking.py: a URL
    or an exception text may quote one), tracebacks this process prints masked too. MLflow's
    own INFO lines (database set-up, "View run", input-example validation) and its per-file
    "Downloading artifacts" bars would bury ours on a local store: MLflow says only warnings
    and errors, unless the environment already sets MLFLOW_LOGGING_LEVEL /
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR (child processes, such as retrain's torchrun ranks,
    inherit the same)."""
    from sslstream.pipelines.shards.masking import install_log_masking

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    install_log_masking()
    sys.excepthook = _masked_excepthook
    threading.excepthook = _masked_thread_excepthook


def _masked_excepthook(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
    """Python's traceback print for an error that reaches the top, credentials masked."""
    import traceback

    from sslstream.pipelines.shards.masking import mask

    sys.stderr.write(mask("".join(traceback.format_exception(exc_type, exc, tb))))  # type: ignore[arg-type]


def _masked_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """The same for an error that ends a thread."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    sys.stderr.write(f"Exception in thread {name}:\n")
    _masked_excepthook(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback)


def _parse(args: list[str], flags_with_value: Sequence[str] = (), bool_flags: Sequence[str] = (),
           *, command: str = "train"
           ) -> tuple[dict[str, str | bool], DictConfig | None]:
    """Split a subcommand's flags from its Hydra overrides and compose the config.

    Returns `(opts, None)` when the command is already answered (`--help` printed the usage,
    `--cfg` printed the resolved config), so every subcommand handles them the same way.
    """
    opts, overrides = _split_flags(args, flags_with_value, ("--cfg", "-h", "--help", *bool_flags))
    if opts.get("-h") or opts.get("--help"):
        from sslstream.orchestration.schema.help import help_text

        print(help_text(command))
        return opts, None
    from sslstream.orchestration.schema import compose_checked

    # every key, type and range is checked here, before any data is touched
    cfg = compose_checked(overrides, allow_missing=bool(opts.get("--cfg")))
    from sslstream.pipelines.shards.masking import remember

    remember(OmegaConf.to_container(cfg, resolve=False))  # secrets of the config, masked anywhere
    if opts.get("--cfg"):
        _print_config(cfg)
        return opts, None
    _warn(cfg, command)
    if cfg.tracking.enabled:
        from sslstream.orchestration.tracking.mlflow_env import resolve_tracking_uri

        # credentials out of the URI, or a ConfigError: before any data or request
        resolve_tracking_uri(cfg.tracking.uri)
    return opts, cfg


def _print_config(cfg: DictConfig) -> None:
    from sslstream.pipelines.shards.masking import mask  # no credential is printed

    print(OmegaConf.to_yaml(OmegaConf.create(mask(
        OmegaConf.to_container(cfg, resolve=True)))), end="")


def _warn(cfg: DictConfig, command: str) -> None:
    """Settings that run but are probably not meant (orchestration/schema: `advisories`)."""
    from sslstream.orchestration.schema import advisories

    for line in advisories(cfg):
        print(f"sslstream {command}: warning: {line}", file=sys.stderr)


def cmd_train(args: list[str]) -> int:
    if "-m" in args or "--multirun" in args:
        return _sweep([a for a in args if a not in ("-m", "--multirun")])
    _, cfg = _parse(args)
    if cfg is None:
        return 0
    return _train(cfg)


def _train(cfg: DictConfig) -> int:
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


def _sweep(args: list[str]) -> int:
    """`sslstream train -m a=1,2 b=x,y`: every combination checked first, then run in turn
    (orchestration/train/sweep.py)."""
    opts, overrides = _split_flags(args, (), ("--cfg", "-h", "--help"))
    if opts.get("-h") or opts.get("--help"):
        _parse(["--help"])
        return 0
    from sslstream.orchestration.schema import compose_checked, expand_sweep

    children = expand_sweep(overrides)
    # every child is composed and checked before any of them runs
    configs = [compose_checked(child, allow_missing=bool(opts.get("--cfg"))) for child in children]
    if opts.get("--cfg"):
        for child, cfg in zip(children, configs, strict=True):
            print(f"# {' '.join(child)}")
            _print_config(cfg)
        return 0
    for cfg in configs:
        _warn(cfg, "train")
    from sslstream.orchestration.train.sweep import run_sweep

    return run_sweep(overrides, children, configs, _train)


def cmd_eval(args: list[str]) -> int:
    opts, _ = _split_flags(args, ("--checkpoint", "--model"), ("--cfg", "-h", "--help"))
    if not (opts.get("-h") or opts.get("--help")) and (
            bool(opts.get("--checkpoint")) == bool(opts.get("--model"))):
        return _usage_error("eval needs exactly one of --checkpoint PATH or --model URI")
    opts, cfg = _parse(args, ("--checkpoint", "--model"), command="eval")
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
    _, cfg = _parse(args, command="retrain")
    if cfg is None:
        return 0
    from sslstream.orchestration.retrain.job import retrain

    return int(retrain(cfg))


def cmd_embed(args: list[str]) -> int:
    flags, bools = ("--model", "--out", "--neighbours", "--queries"), ("--overwrite",)
    opts, _ = _split_flags(args, flags, ("--cfg", "-h", "--help", *bools))
    extra = []
    for flag, key in (("--neighbours", "embed.neighbours"), ("--queries", "embed.queries")):
        if flag in opts:
            if not str(opts[flag]).isdigit():
                return _usage_error(f"{flag} {opts[flag]}: expected a whole number")
            extra.append(f"{key}={int(opts[flag])}")
    if not (opts.get("-h") or opts.get("--help") or opts.get("--cfg")):
        missing = [f for f in ("--model", "--out") if not opts.get(f)]
        if missing:
            return _usage_error(f"embed needs {' and '.join(missing)}")
    opts, cfg = _parse([*_without_values(args, ("--neighbours", "--queries")), *extra],
                       ("--model", "--out"), bools, command="embed")
    if cfg is None:
        return 0
    from sslstream.orchestration.embed.job import EmbedRequest, run

    return run(cfg, EmbedRequest(model=str(opts["--model"]), out=str(opts["--out"]),
                                 overwrite=bool(opts.get("--overwrite"))))


def _without_values(args: list[str], flags: Sequence[str]) -> list[str]:
    """``args`` without ``flags`` and their values (``--flag v`` or ``--flag=v``)."""
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif a.partition("=")[0] not in flags:
            out.append(a)
    return out


def cmd_export(args: list[str]) -> int:
    flags = ("--model", "--format", "--out")
    opts, _ = _split_flags(args, flags, ("--cfg", "-h", "--help"))
    if not (opts.get("-h") or opts.get("--help") or opts.get("--cfg")):
        missing = [f for f in flags if not opts.get(f)]
        if missing:
            return _usage_error(f"export needs {', '.join(missing)}")
        from sslstream.orchestration.embed.export import FORMATS

        if opts["--format"] not in FORMATS:
            return _usage_error(f"--format {opts['--format']}: expected one of "
                                f"{', '.join(FORMATS)}")
    opts, cfg = _parse(args, flags, command="export")
    if cfg is None:
        return 0
    from sslstream.orchestration.embed.export import export_encoder
    from sslstream.orchestration.embed.model import load_encoder

    encoder = load_encoder(cfg, str(opts["--model"]))
    done = export_encoder(encoder, str(opts["--format"]), str(opts["--out"]),
                          storage_options=dict(cfg.data.storage_options))
    print(f"exported {encoder.version} as {done.format} to {done.path} (uint8 (N, H, W, 3) "
          f"in, float32 (N, {encoder.spec.feature_dim}) out; checked on {done.checked} images, "
          f"max |diff| {done.max_abs_diff:.2g})")
    return 0


def cmd_shards(args: list[str]) -> int:
    from sslstream.pipelines.shards.tools import main as shards_main

    return int(shards_main(args))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "retrain": cmd_retrain, "embed": cmd_embed,
            "export": cmd_export, "shards": cmd_shards}


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
    from sslstream.pipelines.shards.masking import remember

    remember(rest)  # credentials in the arguments (URLs, options): masked in every output
    interrupts.install()  # SIGINT / SIGTERM / SIGUSR1 -> Interrupted (train keeps a resumable state)
    try:
        return COMMANDS[cmd](rest)
    except SystemExit as e:  # usage errors here and argparse in `shards` exit with a code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except Interrupted as e:
        print(_masked(f"sslstream {cmd}: {e}"), file=sys.stderr)
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
        print(_masked(f"sslstream {cmd}: "
                      f"{msg if msg.startswith('config error') else 'config error: ' + msg}"),
              file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, _user_errors()) and not os.environ.get("SSLSTREAM_TRACEBACK"):
        # a missing shard / file / split, refused credentials, corrupt data: the message
        # names the input; a traceback would bury it (our frames, not theirs)
        print(_masked(f"sslstream {cmd}: error: {e}\n(set SSLSTREAM_TRACEBACK=1 for the "
                      "traceback)"), file=sys.stderr)
        return EXIT_FAILED
    raise e


def _masked(text: str) -> str:
    from sslstream.pipelines.shards.masking import mask

    return mask(text)


def _is_config_error(e: BaseException) -> bool:
    """A bad key found by a config dataclass outside the schema's compose (models/ and
    pipelines/ cannot import orchestration: their error is conf/typed.py's
    ConfigValueError, which orchestration's ConfigError extends): the same exit code."""
    from sslstream.conf.typed import ConfigValueError

    return isinstance(e, ConfigValueError)


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
