"""evaluate: a frozen encoder scored on labelled shards.

    features.py    embed this rank's share of a split (kept local; gathered for the test split)
    bank.py        bank budgets: a deterministic class-balanced subset, any rank count
    knn.py         weighted kNN (k=200, t=0.1), sharded over ranks, bitwise the 1-rank result
    probe.py       linear probe on frozen features (single process, or once over shards)
    run.py         EvalResult; evaluate() inside a run; evaluate_saved() for `sslstream eval`

May import: orchestration.tracking (to load a registered encoder), orchestration.runtime,
pipelines, models.
Imported by: orchestration.train, orchestration.cli.
"""
