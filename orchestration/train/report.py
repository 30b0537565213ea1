"""What a finished run prints: the numbers, the model URI and how to load it from anywhere."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from typing import Any

from sslstream.orchestration.train.result import TrainResult


def _anywhere(spec: str) -> str:
    """A data location that means the same from any folder: local paths made absolute."""
    return spec if "://" in spec else os.path.abspath(os.path.expanduser(spec))


def eval_data_overrides(data: Any) -> list[str]:
    """`cfg.data`'s evaluation splits as overrides that name them from any folder:
    `data.bank`, `data.test` (local paths absolute; a list as a Hydra list) and
    `data.num_classes`. A relative default such as ./data/synthetic would be another folder,
    or none, where the command runs."""
    out = []
    for key in ("bank", "test"):
        value = data[key]
        if value is None:
            continue
        if isinstance(value, str):
            out.append(f"data.{key}={_anywhere(value)}")
        else:
            out.append(f"data.{key}=[{','.join(_anywhere(str(v)) for v in value)}]")
    ncls = data["num_classes"]
    out.append(f"data.num_classes={'null' if ncls is None else int(ncls)}")
    return out


def end_of_run_lines(result: TrainResult, seconds: float,
                     eval_overrides: Sequence[str] = ()) -> list[str]:
    """What a user needs after a run: accuracy, the model URI and how to load it anywhere.

    A `models:/` URI means nothing without its tracking store (a relative default store
    would be another one in another folder), so the store's URI (credentials masked) goes
    with it, and the evaluation data (`eval_overrides`, see `eval_data_overrides`), in a
    command that works from any folder.
    """
    lines = []
    if result.eval is not None:
        lines.append(f"kNN accuracy: {result.eval.knn_acc:.4f}")
        if result.eval.probe_acc is not None:
            lines.append(f"linear probe accuracy: {result.eval.probe_acc:.4f}")
    store = result.tracking_uri
    if result.registered_uri:
        role = "champion" if result.promoted else f"challenger: {result.promotion_reason}"
        lines.append(f"registered model: {result.registered_uri} ({role})")
        if store:
            q_store, q_model = shlex.quote(store), shlex.quote(result.registered_uri)
            data = "".join(f" {shlex.quote(o)}" for o in eval_overrides)
            lines.append(f"  tracking store: {store}")
            lines.append(f"  load it from any folder: MLFLOW_TRACKING_URI={q_store} "
                         f"sslstream eval --model {q_model}{data}"
                         + ("  (*** = your credentials)" if "***" in store else ""))
            lines.append(f"  in Python: mlflow.set_tracking_uri({store!r}); "
                         f"mlflow.pyfunc.load_model({result.registered_uri!r})")
    where = (f"MLflow run {result.run_id} in {store}" if result.run_id and store
             else f"MLflow run {result.run_id}" if result.run_id else "tracking off")
    lines.append(f"done in {seconds:.0f}s: {result.step} steps, {where}")
    return lines
