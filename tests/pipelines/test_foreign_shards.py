"""Shards that other tools wrote: webdataset's ShardWriter, `tar`, img2dataset-style
unlabelled sets; labels in .cls / .json / .txt; images as .png / .webp; and the reverse
direction (webdataset reads what `sslstream shards make` writes).
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from sslstream.pipelines.shards.labels import (
    LabelKey,
    MissingLabels,
    detect_label_key,
    parse_label_key,
    read_label,
    require_labels,
)
from sslstream.pipelines.shards.stream import ShardStream
from sslstream.pipelines.shards.tools import write_shards

from tests.fixtures.shards import make_jpeg, make_png


def _webp(seed: int) -> bytes:
    im = Image.new("RGB", (12, 9), (seed * 40 % 256, 80, 160))
    out = io.BytesIO()
    im.save(out, format="WEBP")
    return out.getvalue()


def _labels(stream: ShardStream) -> dict[str, int]:
    return {s.key: s.label for s in stream}


def _shardwriter(root: Path, n: int, member: str, per_shard: int = 5) -> dict[str, int]:
    """webdataset's own ShardWriter: `member` is json | txt | cls | caption (unlabelled)."""
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    with wds.ShardWriter(str(root / "wds-%06d.tar"), maxcount=per_shard) as sink:
        for i in range(n):
            key, label = f"s{i:04d}", (3 * i) % 10
            sample = {"__key__": key, "png" if i % 2 else "jpg":
                      make_png(i) if i % 2 else make_jpeg(i)}
            if member == "json":
                sample["json"] = {"label": label, "url": f"http://x/{i}"}
            elif member == "txt":
                sample["txt"] = str(label)
            elif member == "cls":
                sample["cls"] = label
            else:  # img2dataset: caption text and metadata, no class
                sample["txt"] = f"a photo of thing {i}"
                sample["json"] = {"caption": f"a photo of thing {i}", "url": f"http://x/{i}"}
            sink.write(sample)
            truth[key] = label if member != "caption" else -1
    return truth


@pytest.mark.parametrize("member", ["json", "txt", "cls"])
def test_shardwriter_labels_are_detected_and_read(tmp_path, member):
    truth = _shardwriter(tmp_path / member, 12, member)
    stream = ShardStream(str(tmp_path / member), shuffle=False, num_workers=1)
    assert stream.label_key == {"json": "json:label", "txt": "txt", "cls": "cls"}[member]
    assert _labels(stream) == truth
    assert stream.counters["skipped_corrupt"] == 0


def test_explicit_label_key_and_string_class_names(tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    with wds.ShardWriter(str(root / "n-%06d.tar"), maxcount=100) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "jpg": make_jpeg(i),
                        "json": {"y": ["cat", "dog"][i % 2]}})
    (root / "manifest.json").write_text(json.dumps(
        {"shards": [{"shard": "n-000000.tar", "samples": 6}], "classes": ["cat", "dog"]}))
    s = ShardStream(str(root), shuffle=False, num_workers=0, label_key="json:y")
    assert _labels(s) == {f"k{i}": i % 2 for i in range(6)}
    with pytest.raises(ValueError, match="cls, json:<field>, txt, none or auto"):
        parse_label_key("yaml")


def test_img2dataset_style_is_unlabelled_and_an_eval_split_of_it_fails_before_training(tmp_path):
    truth = _shardwriter(tmp_path / "caps", 8, "caption")
    s = ShardStream(str(tmp_path / "caps"), shuffle=False, num_workers=0)
    assert s.label_key == "none"  # a caption .txt is not a class index
    assert _labels(s) == truth
    with pytest.raises(MissingLabels) as e:
        require_labels("data.test", str(tmp_path / "caps"))
    msg = str(e.value)
    for part in ("data.test=", "json{caption, url}", "txt", "data.label_key", "eval.at_end=false"):
        assert part in msg, (part, msg)


def test_check_eval_splits_refuses_an_unlabelled_test_split_before_training(tmp_path):
    from sslstream.orchestration.train.job import check_eval_splits

    _shardwriter(tmp_path / "lab", 6, "cls")
    _shardwriter(tmp_path / "caps", 6, "caption")
    cfg = OmegaConf.create({"eval": {"at_end": True, "every_epochs": 0},
                            "data": {"train": str(tmp_path / "lab"), "bank": str(tmp_path / "lab"), "test": str(tmp_path / "caps"),
                                     "label_key": "auto", "storage_options": {},
                                     "max_member_bytes": 1 << 20}})
    with pytest.raises(MissingLabels, match="data.test"):
        check_eval_splits(cfg)
    cfg.data.test = str(tmp_path / "lab")
    check_eval_splits(cfg)
    cfg.data.label_key = "json:label"  # set explicitly to a member the data does not have
    with pytest.raises(MissingLabels, match=r"label_key=json:label gives a label to 0 of"):
        check_eval_splits(cfg)


def test_eval_stream_skips_samples_without_a_label_instead_of_minus_one(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    with wds.ShardWriter(str(root / "m-%06d.tar"), maxcount=100) as sink:
        for i in range(20):
            sample = {"__key__": f"k{i}", "jpg": make_jpeg(i)}
            if i != 17:
                sample["cls"] = i % 3
            sink.write(sample)
    s = ShardStream(str(root), shuffle=False, num_workers=0, require_label=True,
                    max_bad_fraction=0.2)
    got = _labels(s)
    assert "k17" not in got and min(got.values()) >= 0
    assert s.counters["missing_label"] == 1


def test_tar_of_loose_files_with_png_webp_and_cls(tmp_path):
    """`tar cf` over 000001.jpg / 000001.cls style files (members listed in sorted order)."""
    src = tmp_path / "files"
    src.mkdir()
    truth = {}
    for i in range(9):
        key = f"{i:06d}"
        img = [make_jpeg(i), make_png(i), _webp(i)][i % 3]
        (src / f"{key}.{['jpg', 'png', 'webp'][i % 3]}").write_bytes(img)
        (src / f"{key}.cls").write_text(str(i % 4))
        truth[key] = i % 4
    names = sorted(p.name for p in src.iterdir())
    out = tmp_path / "shards"
    out.mkdir()
    subprocess.run(["tar", "cf", str(out / "data-000000.tar"), "-C", str(src), *names], check=True)
    s = ShardStream(str(out / "data-000000.tar"), shuffle=False, num_workers=0)
    assert _labels(s) == truth
    only_jpg = ShardStream(str(out / "data-000000.tar"), shuffle=False, num_workers=0,
                           image_keys=["jpg"], max_bad_fraction=1.0)
    assert set(_labels(only_jpg)) == {k for i, k in enumerate(truth) if i % 3 == 0}
    assert only_jpg.counters["missing_image"] == 6


def test_webdataset_reads_what_shards_make_writes(tmp_path):
    samples = [(f"img{i}", make_jpeg(i) if i % 2 else make_png(i), i % 5) for i in range(11)]
    man = write_shards(iter(samples), tmp_path / "out", max_count=4, classes=list("abcde"))
    urls = [str(tmp_path / "out" / e.shard) for e in man.shards]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    got = {}
    for s in ds:
        img = s.get("jpg") or s.get("png")
        assert img.size == (16, 16)
        got[s["__key__"]] = s["cls"]
    assert got == {k: lbl for k, _, lbl in samples}


def test_read_and_detect_rules():
    assert read_label({"json": b'{"label": "4"}'}, LabelKey("json", "label")) == 4
    assert read_label({"json": b'{"other": 1}'}, LabelKey("json", "label")) is None
    assert read_label({"txt": b" 7\n"}, LabelKey("txt")) == 7
    assert detect_label_key([{"json": b'{"target": 2}'}, {"json": b'{"target": 0}'}]) == \
        LabelKey("json", "target")
    # one caption among integer txt labels: not a label member
    assert detect_label_key([{"txt": b"1"}, {"txt": b"a dog"}]) == LabelKey("none")
    assert detect_label_key([]) == LabelKey("none")
