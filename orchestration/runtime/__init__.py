"""runtime: process facilities shared by every job (train, eval, retrain's workers).

    distributed.py   DistEnv, torchrun/process-group set-up, gathers, loader thread sizing
    checkpoint.py    atomic checkpoint files: save, keep-last-K, find latest, load

May import: pipelines, models (nothing else in orchestration).
Imported by: orchestration.train, orchestration.evaluate, orchestration.tracking,
orchestration.retrain.
"""
