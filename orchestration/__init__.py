"""orchestration: everything that runs a job around the model and the data.

Map (imports run one way, top to bottom; tests/test_layout.py enforces it):

    cli.py                parse argv, compose the config (schema/), dispatch, map errors to exit codes
    retrain/              the scheduled job: snapshot -> lease -> train -> register -> promote
    train/                one training run: job assembly, step, loop, checkpoints, monitors
    evaluate/             frozen-encoder evaluation: features, kNN, linear probe
    tracking/             MLflow: tracker, settings, registry, the served pyfunc model, plots
    schema/               the config: every key typed once, composed from conf/ and checked
    runtime/              process facilities every job uses: ranks/devices, checkpoint files
    errors.py             exceptions shared across rooms (user errors, registration errors)

May import: pipelines, models, sslstream.conf (and, inside, only rooms below the importer).
Imported by: the `sslstream` console script and `python -m sslstream`.
"""
