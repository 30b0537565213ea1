"""runtime: process facilities shared by every job (train, eval, retrain's workers).

    distributed.py   DistEnv, torchrun/process-group set-up, gathers, loader thread sizing
    checkpoint.py    atomic checkpoint files: save, keep-last-K, find latest, load
    interrupt.py     SIGINT / SIGTERM -> Interrupted (deferred to a step boundary in the loop)

May import: orchestration.errors, pipelines, models.
Imported by: orchestration.train, orchestration.evaluate, orchestration.tracking,
orchestration.retrain, orchestration.cli.
"""
