"""train: one training run, from a resolved config to a TrainResult.

    job.py         assemble the run: data, loader, method, optimiser, schedules (Job)
    step.py        one optimiser step: autocast, clipping, non-finite stop, DDP wrapping
    loop.py        the loop: resume, epochs, periodic eval, checkpoints, final eval + register
    result.py      TrainResult (what a run returns)
    checkpoint     lives in orchestration/runtime (the eval command reads checkpoints too)
    monitor.py     collapse/throughput monitors logged while training
    runlog.py      the trainer's side of MLflow (Tracker on rank 0, NullTracker elsewhere)
    warmstart.py   initialise from a checkpoint or a registered encoder
    lineage.py     which run wrote a checkpoint; refuse another run's, method's, config's
    evalid.py      what an evaluation measured (split fingerprint, protocol) for promotion
    report.py      the end-of-run lines (model URI, its store, how to load it anywhere)
    sweep.py       `sslstream train -m`: each combination a run under one parent MLflow run

May import: orchestration.evaluate, orchestration.tracking, orchestration.schema,
orchestration.runtime, orchestration.errors, pipelines, models.
Imported by: orchestration.retrain, orchestration.cli.
"""
