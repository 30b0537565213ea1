"""runtime: process facilities shared by every job (train, eval, retrain's workers).

    distributed.py   DistEnv, torchrun/process-group set-up, gathers, loader thread sizing
    runstore.py      the run's folder on any fsspec store (local, s3://, gs://): whole-object
                     writes, retries, URLs with credentials masked
    checkpoint.py    checkpoints published atomically (state, then manifest): save,
                     keep-last-K, list published ones, verified load
    uploader.py      checkpoint uploads off the step path (snapshot, one background thread)
    interrupt.py     SIGINT / SIGTERM / SIGUSR1 -> Interrupted (deferred to a step boundary)
    launch.py        torchrun that exits with its workers' exit code (for schedulers)

May import: orchestration.errors, pipelines, models.
Imported by: orchestration.train, orchestration.evaluate, orchestration.tracking,
orchestration.retrain, orchestration.cli.
"""
