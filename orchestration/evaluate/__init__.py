"""evaluate: a frozen encoder scored on labelled shards.

    features.py    embed every sample an eval loader yields (gathered over ranks)
    knn.py         weighted kNN (k=200, t=0.1 by default)
    probe.py       linear probe on frozen features
    run.py         EvalResult; evaluate() inside a run; evaluate_saved() for `sslstream eval`

May import: orchestration.tracking (to load a registered encoder), orchestration.runtime,
pipelines, models.
Imported by: orchestration.train, orchestration.cli.
"""
