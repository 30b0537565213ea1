"""Which augmentation backend runs, and how much image checking the host does: shared by
the two-view loader and the eval loader.
"""

from __future__ import annotations

import warnings

from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views.hostprep import image_hw

__all__ = ["BACKENDS", "effective_validation", "image_hw", "resolve_backend"]

BACKENDS = ("auto", "dali", "torchvision")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'dali' where nvidia-dali imports, else 'torchvision' with a warning."""
    if backend not in BACKENDS:
        raise ValueError(f"loader backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        if dali_mod.DALI_AVAILABLE:
            return "dali"
        warnings.warn(f"nvidia-dali is not importable ({dali_mod.DALI_IMPORT_ERROR}); "
                      "augmenting with the torchvision reference backend (slower)", stacklevel=3)
        return "torchvision"
    if backend == "dali" and not dali_mod.DALI_AVAILABLE:
        raise RuntimeError(f"backend='dali' but nvidia-dali is not importable "
                           f"({dali_mod.DALI_IMPORT_ERROR}); use backend='auto' or 'torchvision'")
    return backend


def effective_validation(validate: str, stream: SampleStream) -> str:
    """'auto': skip the header check when the stream already ran one (ShardStream does), so
    the host thread only reads sizes; otherwise check headers here."""
    if validate != "auto":
        return validate
    return "none" if stream.validate in ("header", "decode") else "header"
