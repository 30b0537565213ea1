"""models: the learning side, free of data loading and of jobs.

    backbones.py   ResNets (CIFAR stem, mini, 50), timm ViTs (Tiny/Small/Base, any patch);
                   shipped alone with every registered encoder
    backbone_config.py  the backbone.* keys (typed)
    heads.py       projector / predictor MLPs, DINO head, SwAV prototypes
    objectives/    one pure loss per file (exact under DDP with explicit gathers)
    state.py       Queue, MomentumEncoder, FeatureQueue, DINOCenter (checkpointable state)
    methods/       one SSL method per file on a small base class, and the METHODS registry
    optim.py       LARS / SGD / AdamW (their optim.* keys, the OPTIMIZERS registry), warmup-cosine
    collapse.py    embedding std, effective rank

May import: torch, torchvision, timm (ViTs only) and sslstream.conf.typed (the config
vocabulary) only (never pipelines or orchestration).
Imported by: orchestration, benchmarks, tests.
"""
