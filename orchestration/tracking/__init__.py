"""tracking: MLflow runs, the model registry and the served model.

    tracker.py        Tracker: one MLflow run per training (params, metrics, artifacts, model)
    settings.py       what of a config MLflow sees: redaction, flattened params (the
                      settings themselves: orchestration/schema/tracking.py)
    null.py           NullTracker: the same interface with no MLflow import (ranks > 0, off)
    mlflow_env.py     tracking URI resolution (credentials out of the URI), HTTP limits
    registry.py       register a version, aliases, load a registered encoder
    promotion.py      the promotion rule and its race-safe read-compare-set loop
    encoder_model.py  the pyfunc model (models-from-code: logged as a file, no pickles)
    figures.py        the Tracker's plot methods (curves from the run's history, PCA)
    plots.py          loss curves and the PCA plot (matplotlib, pure functions)
    sender.py         the bounded background queue that sends metrics
    system_metrics.py MLflow's system-metrics monitor, restarted after an outage

May import: orchestration.schema, orchestration.runtime, orchestration.errors, pipelines,
models.
Imported by: orchestration.evaluate, orchestration.train, orchestration.retrain,
orchestration.cli.
"""
