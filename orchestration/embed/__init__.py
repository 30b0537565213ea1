"""embed: from an encoder to embeddings (a data set embedded, the encoder exported).

    model.py       the encoder named by --model: a registered / logged model or a checkpoint
    export.py      `sslstream export`: one ONNX / TorchScript file, preprocessing inside
    store.py       the output folder: files published whole (local rename, object PUT)

May import: orchestration.evaluate, orchestration.tracking, orchestration.runtime,
orchestration.errors, pipelines, models.
Imported by: orchestration.cli, orchestration.retrain.
"""
