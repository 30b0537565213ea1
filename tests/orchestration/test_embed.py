"""`sslstream embed`: every input sample exactly once in the Parquet output, with the
encoder's embedding of it; resume, refusal of another model's output, config mistakes
before any read, an unreachable --out before any embedding, bad samples per reason.

The expected embeddings are computed here from the shards' bytes (PIL decode, float64
normalisation, the backbone), not through the eval loader the job uses."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sslstream.models.backbones import build_backbone
from sslstream.orchestration.cli import main
from sslstream.orchestration.embed import exits as X
from sslstream.orchestration.embed.job import EmbedRequest, embed
from sslstream.orchestration.embed.manifest import NAME
from sslstream.orchestration.embed.parquet import embeddings_of
from sslstream.orchestration.schema import compose_config
from sslstream.pipelines.views.recipes import TwoViewRecipe

from tests.fixtures.shards import ShardSet, write_shard_set

pytestmark = pytest.mark.timeout(300)


def checkpoint(path: Path, seed: int = 0, overrides: tuple[str, ...] = ()) -> torch.nn.Module:
    """A training-checkpoint-shaped file holding a resnet_mini with moved BN statistics."""
    cfg = compose_config(list(overrides))
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.backbone)
    with torch.no_grad():
        for _ in range(2):
            backbone(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    backbone.eval()
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    return backbone


def shard_images(ss: ShardSet) -> dict[str, tuple[bytes, str, int]]:
    """key -> (image bytes, shard path, position in the shard), read with tarfile."""
    out = {}
    for url in ss.urls:
        with tarfile.open(url) as tf:
            keys: list[str] = []
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                if key not in keys:
                    keys.append(key)
                if ext == "jpg":
                    out[key] = (tf.extractfile(m).read(), url, keys.index(key))
    return out


def reference(backbone: torch.nn.Module, images: list[bytes]) -> np.ndarray:
    recipe = TwoViewRecipe.from_config(compose_config([]).augment)
    mean = torch.tensor(recipe.view1.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(recipe.view1.std, dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB")))
                     for b in images]).permute(0, 3, 1, 2).double() / 255.0
    with torch.no_grad():
        return backbone(((x - mean) / std).float()).numpy()


def cfg_for(source: str | Path, *extra: str):
    return compose_config([f"embed.source={source}", "data.num_workers=2",
                           "embed.batch_size=16", "embed.progress_every_s=0", *extra])


@pytest.fixture
def data(tmp_path: Path) -> ShardSet:
    return write_shard_set(tmp_path / "shards", [20, 7, 13, 24, 1], image_size=32)


def read(out: Path):
    return pq.read_table(out)  # the manifest is `_manifest.json`: Parquet readers skip it


def test_every_sample_once_with_its_embedding(data: ShardSet, tmp_path: Path) -> None:
    backbone = checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "emb"
    res = embed(cfg_for(data.root, "embed.shards_per_part=2"),
                EmbedRequest(str(tmp_path / "ckpt.pt"), str(out)))
    table = read(out)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(data.good_keys) and len(set(keys)) == len(keys) == 65
    files = sorted(p.name for p in out.iterdir())
    assert files == [NAME, "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    source = shard_images(data)
    by_key = {k: i for i, k in enumerate(keys)}
    assert table.column("shard").to_pylist() == [source[k][1] for k in keys]
    assert table.column("index").to_pylist() == [source[k][2] for k in keys]
    assert table.column("label").to_pylist() == [data.labels[k] for k in keys]
    emb = embeddings_of(table)
    assert emb.dtype == np.float32 and emb.shape == (65, 128)
    want = reference(backbone, [source[k][0] for k in keys])
    np.testing.assert_allclose(emb, want, rtol=0, atol=1e-4)
    manifest = json.loads((out / NAME).read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 65 and manifest["bad"] == {}
    assert manifest["model"]["version"] == str((tmp_path / "ckpt.pt").resolve())
    assert manifest["model"]["identity"] == res.manifest.model.identity
    assert [p["rows"] for p in manifest["parts"]] == [27, 37, 1]
    assert manifest["parts"][1]["shards"] == data.urls[2:4]
    assert by_key  # rows are in (shard, index) order within a part
    assert keys == sorted(keys, key=lambda k: (data.urls.index(source[k][1]), source[k][2]))


def test_float16_and_unlabelled(tmp_path: Path) -> None:
    ss = write_shard_set(tmp_path / "plain", [9, 4], labels=False, manifest=False, image_size=32)
    backbone = checkpoint(tmp_path / "ckpt.pt")
    embed(cfg_for(ss.root, "embed.dtype=float16"), EmbedRequest(str(tmp_path / "ckpt.pt"),
                                                                str(tmp_path / "out")))
    table = read(tmp_path / "out")
    assert table.schema.field("embedding").type.value_type == "halffloat"
    assert table.column("label").null_count == 13  # no label: null, not -1
    source = shard_images(ss)
    keys = table.column("key").to_pylist()
    want = reference(backbone, [source[k][0] for k in keys])
    np.testing.assert_allclose(embeddings_of(table).astype(np.float32), want, rtol=2e-3,
                               atol=2e-3)


def test_rerun_resumes_and_another_model_is_refused(data: ShardSet, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    checkpoint(tmp_path / "a.pt", seed=0)
    checkpoint(tmp_path / "b.pt", seed=1)
    out = tmp_path / "emb"
    args = ["embed", f"embed.source={data.root}", "embed.shards_per_part=1", "--out", str(out)]
    assert main([*args, "--model", str(tmp_path / "a.pt")]) == X.EXIT_OK
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    (out / "part-000003.parquet").unlink()  # as if killed before this part was written
    manifest = json.loads((out / NAME).read_text())
    manifest["status"] = "running"
    (out / NAME).write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="sslstream.embed")
    assert main([*args, "--model", str(tmp_path / "a.pt")]) == X.EXIT_OK
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != "part-000003.parquet")
    assert "resuming" in caplog.text and "1 to embed, 4 already there" in caplog.text
    assert "embedded 24/24 samples (100.0%)" in caplog.text and "ETA 0:00" in caplog.text
    assert sorted(read(out).column("key").to_pylist()) == sorted(data.good_keys)
    # again: complete, nothing to do
    caplog.clear()
    assert main([*args, "--model", str(tmp_path / "a.pt")]) == X.EXIT_OK
    assert "nothing to do" in caplog.text
    # another model: refused, naming both; nothing touched
    assert main([*args, "--model", str(tmp_path / "b.pt")]) == X.EXIT_SOURCE
    err = caplog.text
    assert f"of model {tmp_path / 'a.pt'}" in err and f"not of {tmp_path / 'b.pt'}" in err
    assert "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == after
    # --overwrite replaces them
    assert main([*args, "--model", str(tmp_path / "b.pt"), "--overwrite"]) == X.EXIT_OK
    manifest = json.loads((out / NAME).read_text())
    assert manifest["model"]["version"] == str(tmp_path / "b.pt")
    meta = json.loads(pq.read_schema(out / "part-000000.parquet").metadata[b"sslstream"])
    assert meta["identity"] == manifest["model"]["identity"]


@pytest.mark.parametrize("override, words", [
    ("embed.dtype=float64", "embed.dtype=float64 is not allowed"),
    ("embed.batch_size=0", "embed.batch_size=0"),
    ("embed.batchsize=8", "unknown config key embed.batchsize"),
    ("embed.precision=fp16", "embed.precision=fp16"),
    pytest.param("embed.device=cuda", "embed.device=cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_config_mistakes_exit_2_before_anything_is_read(override: str, words: str,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["embed", "--model", "models:/no-such@champion", "--out", str(out),
                 "embed.source=s3://no-such-bucket/x-{000..009}.tar", override])
    assert code == X.EXIT_CONFIG
    assert words in capsys.readouterr().err + caplog.text
    assert not out.exists()  # not even the output folder was touched


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["embed", "--model", "x.pt"]) == X.EXIT_CONFIG
    assert "embed needs --out" in capsys.readouterr().err
    assert main(["embed", "--model", "x.pt", "--out", "o", "--neighbours", "five"]) == 2


def test_unreachable_out_exits_4_before_the_model_is_loaded(
        data: ShardSet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # the model does not exist either: exit 4 (the output) shows --out is checked first
    code = main(["embed", "--model", "models:/no-such@champion", "--out", str(blocker / "emb"),
                 f"embed.source={data.root}"])
    assert code == X.EXIT_SOURCE
    assert f"--out {blocker / 'emb'}" in caplog.text and "not writable" in caplog.text


def test_missing_checkpoint_exits_6(data: ShardSet, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    code = main(["embed", "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"),
                 f"embed.source={data.root}"])
    assert code == X.EXIT_MODEL and "no such checkpoint file" in caplog.text


def test_bad_samples_counted_per_reason_and_bounded(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Skipped by the reader (too many pixels, empty, no image), refused by the decoder
    (a PNG whose header is fine: undecodable), including a batch of nothing else."""
    import webdataset as wds

    from tests.fixtures.shards import make_jpeg
    from tests.pipelines.test_hostile_images import bomb_png, noise_png

    root = tmp_path / "hostile"
    root.mkdir()
    samples = [{"jpg": make_jpeg(i, 32)} for i in range(12)]
    samples[1], samples[4], samples[7] = {"png": bomb_png()}, {"jpg": b""}, {"txt": b"no image"}
    samples[11] = {"png": noise_png(0)}  # alone in the last batch (the reader yields 8 + 1)
    samples[3] = {"png": noise_png(1)}
    with wds.ShardWriter(str(root / "h-%06d.tar"), maxcount=6) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"k{i:03d}", **sample})
    checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "emb"
    args = ["embed", "--model", str(tmp_path / "ckpt.pt"), "--out", str(out),
            f"embed.source={root}", "embed.batch_size=8", "embed.shards_per_part=2",
            "data.label_key=none"]
    assert main([*args, "data.max_bad_fraction=0.5"]) == X.EXIT_OK
    manifest = json.loads((out / NAME).read_text())
    assert manifest["rows"] == 7
    assert manifest["bad"] == {"too_many_pixels": 1, "empty": 1, "missing_image": 1,
                               "undecodable": 2}
    assert sorted(read(out).column("key").to_pylist()) == [
        f"k{i:03d}" for i in (0, 2, 5, 6, 8, 9, 10)]
    caplog.clear()
    code = main([*args, "data.max_bad_fraction=0.2", "--overwrite"])
    assert code == X.EXIT_FAILED
    assert "max_bad_fraction=0.2" in caplog.text and "h-000000.tar" in caplog.text


def test_dali_and_torchvision_give_the_same_rows(data: ShardSet, tmp_path: Path) -> None:
    """The DALI eval graph (CPU here; `mixed` decode on a GPU) and the torchvision one."""
    pytest.importorskip("nvidia.dali")
    checkpoint(tmp_path / "ckpt.pt")
    tables = {}
    for backend in ("dali", "torchvision"):
        embed(cfg_for(data.root, f"embed.loader_backend={backend}"),
              EmbedRequest(str(tmp_path / "ckpt.pt"), str(tmp_path / backend)))
        tables[backend] = read(tmp_path / backend)
    assert tables["dali"].column("key") == tables["torchvision"].column("key")
    np.testing.assert_allclose(embeddings_of(tables["dali"]), embeddings_of(tables["torchvision"]),
                               rtol=0, atol=1e-5)

