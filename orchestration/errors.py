"""Exceptions shared across orchestration modules, in a module that imports nothing heavy.

Two families, which the CLI (orchestration/cli.py) treats differently:

* `UserError`: the input is wrong and the message names it (a config key, a path). The CLI
  prints the message on one line, no traceback (our frames would bury the user's mistake).
  `ConfigError` is the configuration kind: exit 2 from every command, raised before any data
  is touched (orchestration/schema/ checks the composed config) or, for checks that need
  the data, as soon as they can be made. It is the orchestration room's kind of
  `ConfigValueError` (conf/typed.py, which every config dataclass raises), so a
  ValueError too: callers that guarded config parsing with `except ValueError` keep working.
* everything else is a bug or an outage and shows its traceback.

`RegistrationError` lives here rather than in the tracking room so that the CLI and the
trainer can catch it without importing MLflow: an untracked run never loads it.
"""

from __future__ import annotations

from sslstream.conf.typed import ConfigValueError

__all__ = ["ConfigError", "RegistrationError", "UserError"]


class UserError(Exception):
    """Bad input named by the message: one line for the user, no traceback (CLI exit 1)."""


class ConfigError(UserError, ConfigValueError):
    """A configuration key has a wrong name, type or value (CLI exit 2 for every command).

    `key` is the dotted config key ("" when the error is not about one key).
    """

    def __init__(self, message: str, key: str = "") -> None:
        ConfigValueError.__init__(self, message, key)


class RegistrationError(RuntimeError):
    """The encoder could not be logged or registered; the caller keeps its checkpoint."""
