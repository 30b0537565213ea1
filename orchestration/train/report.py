"""What a finished run prints: the numbers, the model URI and how to load it from anywhere."""

from __future__ import annotations

import shlex

from sslstream.orchestration.train.result import TrainResult


def end_of_run_lines(result: TrainResult, seconds: float) -> list[str]:
    """What a user needs after a run: accuracy, the model URI and how to load it anywhere.

    A `models:/` URI means nothing without its tracking store (a relative default store
    would be another one in another folder), so the store's URI (credentials masked) goes
    with it, in a command that works from any folder.
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
            lines.append(f"  tracking store: {store}")
            lines.append(f"  load it from any folder: MLFLOW_TRACKING_URI={q_store} "
                         f"sslstream eval --model {q_model}"
                         + ("  (*** = your credentials)" if "***" in store else ""))
            lines.append(f"  in Python: mlflow.set_tracking_uri({store!r}); "
                         f"mlflow.pyfunc.load_model({result.registered_uri!r})")
    where = (f"MLflow run {result.run_id} in {store}" if result.run_id and store
             else f"MLflow run {result.run_id}" if result.run_id else "tracking off")
    lines.append(f"done in {seconds:.0f}s: {result.step} steps, {where}")
    return lines
