"""shards: WebDataset tar shards as a stream of (key, image bytes, label) samples.

    storage.py     fsspec file systems, retries, error classification
    masking.py     `mask`: the one rule hiding credentials in every message, log, param
    manifest.py    manifest.json, shard URL expansion (folders, braces, prefixes)
    errors.py      DataError: bad input data named in the message (CLI: no traceback)
    tario.py       tar member iteration (plain and gzip), every header number bounded
    parallel.py    one job per shard on daemon threads, stopped at once on an interrupt
    labels.py      which members hold the image and the label (label_key, image_keys, auto),
                   the before-training check that a labelled split has labels
    reader.py      per-lane shard reading with checks (Good / Bad / Short samples)
    cache.py       the local shard cache: object-store shards on a node's disk, LRU, checked
    badsamples.py  consumers (the loader's decoder) report unusable samples toward the limit
    lanes.py       the reader lanes in worker processes (same lanes, same merge)
    procs.py       worker-process plumbing: spawn, parent watch, errors, stop
    plan.py        which segments of which shards each rank reads each epoch
    resume.py      fast-forward to a cursor for exact mid-epoch resume
    stream.py      ShardStream: the rank's resumable, fault-tolerant sample stream
    sample.py      what it yields and reports: Sample, its counters, BadDataError
    sample_stream.py  SampleStream: the Protocol the loaders take (ShardStream implements it)
    validate.py    header / decode checks of image bytes
    imagesize.py   image size from the header alone
    snapshot.py    fingerprint of a shard set (what a model was trained on)
    tools.py       `sslstream shards make / verify / index` (the CLI, the writer)
    verify.py      `shards verify`: folder, prefix, manifest, brace pattern or one shard
    indexer.py     `shards index`: manifest.json for shards made by any tool
    synthetic.py   the embedded default's procedural data set

May import: the standard library, numpy, PIL, fsspec, webdataset; nothing from views,
models or orchestration.
Imported by: pipelines.views, orchestration, benchmarks, tests.
"""
