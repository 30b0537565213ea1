"""models: the learning side, free of data loading and of jobs.

    backbones.py   ResNets (CIFAR stem, mini, 50)
    heads.py       projector / predictor MLPs
    objectives/    one pure loss per file (exact under DDP with explicit gathers)
    state.py       Queue, MomentumEncoder (checkpointable state)
    methods/       one SSL method per file on a small base class
    optim.py       LARS / SGD / AdamW, warmup-cosine schedules
    collapse.py    embedding std, effective rank

May import: torch only (never pipelines or orchestration).
Imported by: orchestration, benchmarks, tests.
"""
