"""Exceptions shared across orchestration modules, in a module that imports nothing heavy.

`RegistrationError` lives here rather than in registry.py (which re-exports it) so that the
CLI and the trainer can catch it without importing MLflow: an untracked run never loads it.
"""

from __future__ import annotations

__all__ = ["RegistrationError"]


class RegistrationError(RuntimeError):
    """The encoder could not be logged or registered; the caller keeps its checkpoint."""
