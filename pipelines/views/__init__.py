"""views: two augmented views of each image, as torch batches on the trainer's device.

    recipes.py      augmentation recipes as data, per-batch parameter drawing
    backend.py      which backend runs (DALI or the torchvision reference), host checks
    dali.py         the DALI two-view graph (GPU `mixed` decode, or CPU mode)
    reference.py    the torchvision v2 reference of the same recipe
    handoff.py      host thread -> device hand-off on a side stream
    loader.py       TwoViewLoader: stream -> views -> Batch
    hostprep.py     batch assembly, bad-sample replacement, parameter drawing (torch-free)
    workers.py      the reader process per rank that runs the stream + hostprep
    eval_loader.py  the single-view eval loader (resize + center crop)

May import: pipelines.shards (never the reverse), sslstream.conf.typed, torch, DALI,
torchvision.
Imported by: orchestration, benchmarks, tests.
"""
