"""embed: from an encoder to embeddings (a data set embedded, the encoder exported).

    job.py         `sslstream embed`: plan, resume or refuse, embed this rank's parts, manifest
    settings.py    EmbedSettings: the `embed` config group and the `data.*` keys it reuses
    model.py       the encoder named by --model: a registered / logged model or a checkpoint
    plan.py        parts (consecutive shards -> one Parquet file) and which rank writes each
    reader.py      a rank's parts through the training data plane, read ahead in a thread
    writer.py      rows collected per part, each part published once it is whole
    parquet.py     a part's rows as Parquet (key, shard, index, label, embedding)
    manifest.py    `_manifest.json` of an output: what made it, its parts, bad samples
    store.py       the output folder: files published whole (local rename, object PUT)
    progress.py    progress lines with rate and ETA
    neighbours.py  `--neighbours`: query images and their nearest neighbours, to MLflow
    export.py      `sslstream export`: one ONNX / TorchScript file, preprocessing inside
    exits.py       exit codes (retrain's numbers) and the error -> code map

May import: orchestration.evaluate, orchestration.tracking, orchestration.runtime,
orchestration.errors, pipelines, models.
Imported by: orchestration.cli.
"""
