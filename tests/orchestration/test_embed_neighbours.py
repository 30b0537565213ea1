"""`sslstream embed --neighbours 5 --queries 8`: a grid of 8 query images and their 5
nearest neighbours, logged to MLflow; the neighbours are checked against a brute-force
float64 cosine search over the written Parquet output."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sslstream.orchestration.cli import main
from sslstream.orchestration.embed.neighbours import GAP, TILE, grid_size
from sslstream.orchestration.embed.parquet import embeddings_of

from tests.fixtures.shards import write_shard_set
from tests.orchestration.test_embed import checkpoint

pytestmark = pytest.mark.timeout(300)


def test_neighbour_grid_logged_to_mlflow(in_tmp_cwd: Path) -> None:
    ss = write_shard_set(in_tmp_cwd / "shards", [20, 17, 23], image_size=32)
    checkpoint(in_tmp_cwd / "ckpt.pt")
    uri = f"sqlite:///{in_tmp_cwd / 'mlflow.db'}"
    assert main(["embed", "--model", "ckpt.pt", "--out", "emb", f"embed.source={ss.root}",
                 "--neighbours", "5", "--queries", "8", f"tracking.uri={uri}",
                 "tracking.experiment=embed-test", "tracking.system_metrics=false"]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("embed-test").experiment_id])
    assert run.data.tags["sslstream.embed.model"] == str(in_tmp_cwd / "ckpt.pt")
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "neighbours"))
    assert names == ["neighbours/neighbours.json", "neighbours/neighbours.png"]
    local = Path(client.download_artifacts(run.info.run_id, "neighbours", str(in_tmp_cwd)))
    figure = Image.open(local / "neighbours.png")
    assert figure.size == grid_size(8, 5) == (6 * TILE + 4 * GAP + 12, 8 * TILE + 7 * GAP)
    doc = json.loads((local / "neighbours.json").read_text())
    assert len(doc["queries"]) == 8 and all(len(q["neighbours"]) == 5 for q in doc["queries"])

    # the neighbours are the brute-force nearest by cosine, in order, never the query itself
    table = pq.read_table(in_tmp_cwd / "emb")
    keys = table.column("key").to_pylist()
    x = embeddings_of(table).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for q in doc["queries"]:
        i = keys.index(q["key"])
        sims = x @ x[i]
        sims[i] = -np.inf
        want = [keys[j] for j in np.argsort(-sims, kind="stable")[:5]]
        assert [n["key"] for n in q["neighbours"]] == want
        np.testing.assert_allclose([n["similarity"] for n in q["neighbours"]],
                                   np.sort(sims)[::-1][:5], atol=1e-5)

    # the first row's first tile is the first query's image
    first = doc["queries"][0]
    with tarfile.open(first["shard"]) as tf:
        data = tf.extractfile(f"{first['key']}.jpg").read()
    tile = Image.open(io.BytesIO(data)).convert("RGB").resize((TILE, TILE),
                                                               Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(figure.convert("RGB"))[:TILE, :TILE], np.asarray(tile))
    assert (in_tmp_cwd / "emb" / "_neighbours.png").is_file()
    assert len(set(pq.read_table(in_tmp_cwd / "emb").column("key").to_pylist())) == 60
    assert set(keys) == ss.good_keys
