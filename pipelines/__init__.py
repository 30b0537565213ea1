"""pipelines: the data plane, from shard bytes to two augmented views.

    shards/   bytes: storage, manifests, tar reading, the rank plan, the resumable stream,
              validation, shard tools (make / verify), the synthetic data set, snapshots
    views/    pixels: augmentation recipes, the DALI graph, the torchvision reference,
              the two-view loader and the eval loader

May import: nothing in orchestration or models (sslstream.conf.typed, the config vocabulary,
yes); views may import shards, never the reverse.
Imported by: orchestration (every room), benchmarks, tests.
"""
