"""Shard writing, manifest, verify and the `shards` CLI, checked with tarfile/hashlib/PIL."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from sslstream.pipelines.shards.manifest import Manifest, resolve_shards
from sslstream.pipelines.shards.tools import main, verify, write_shards
from sslstream.pipelines.shards.validate import CorruptImage, check_header, validate_image

from tests.fixtures.shards import make_jpeg, make_png

REPO = Path(__file__).resolve().parents[2]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


# ------------------------------------------------------------ validate


def test_header_check_accepts_real_images_and_reports_size() -> None:
    info = check_header(make_jpeg(1, size=24))
    assert (info.format, info.width, info.height, info.progressive) == ("jpeg", 24, 24, False)
    assert check_header(make_jpeg(1, progressive=True)).progressive
    assert (check_header(make_png(2, size=8)).width, check_header(make_png(2, size=8)).format) == (8, "png")
    assert validate_image(make_jpeg(3), "decode").width == 16


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"<html>404</html>", "magic"),
        (make_jpeg(4)[:-50], "no end-of-image"),  # cut inside the scan
        (make_jpeg(4)[:200], "truncated"),  # cut inside the tables
        (make_jpeg(4)[:20], "truncated"),  # cut before the frame header
        (b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 20 + b"\xff\xd9", "no SOF"),
        (make_png(5)[:-12], "IEND"),
        (make_png(5)[:8] + b"\x00" * 40, "IHDR"),
    ],
    ids=["empty", "html", "cut-scan", "cut-tables", "cut-early", "no-sof", "png-cut", "png-no-ihdr"],
)
def test_header_check_rejects_broken_images(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptImage) as e:
        validate_image(data, "header")
    assert reason in e.value.reason


def test_decode_mode_rejects_what_pil_cannot_decode() -> None:
    good = make_jpeg(6, size=32)
    # Header-valid, but the frame claims 9999 components' worth of nonsense tables:
    # replace the quantisation tables' segment marker so PIL finds no DQT.
    broken = good.replace(b"\xff\xdb", b"\xff\xe5", 2)
    validate_image(broken, "header")  # the structure still parses
    with pytest.raises(CorruptImage, match="decode failed"):
        validate_image(broken, "decode")


# ------------------------------------------------------------ write_shards


def _samples(n: int, labelled: bool = True):
    return [(f"k{i:03d}", make_jpeg(i), i % 3 if labelled else None) for i in range(n)]


def test_write_shards_splits_by_count_and_writes_a_true_manifest(tmp_path: Path) -> None:
    man = write_shards(_samples(23), tmp_path, prefix="train", max_count=10, classes=["a", "b", "c"])
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["classes"] == ["a", "b", "c"]
    assert [e["samples"] for e in doc["shards"]] == [10, 10, 3]
    for e in doc["shards"]:
        data = (tmp_path / e["shard"]).read_bytes()
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["bytes"] == len(data)
        mem = _members(tmp_path / e["shard"])
        assert len(mem) == 2 * e["samples"]  # .jpg + .cls
    with tarfile.open(tmp_path / "train-000002.tar") as tf:
        assert tf.getnames() == ["k020.jpg", "k020.cls", "k021.jpg", "k021.cls", "k022.jpg", "k022.cls"]
        assert tf.extractfile("k021.cls").read() == b"0"  # 21 % 3
        assert tf.extractfile("k020.jpg").read() == make_jpeg(20)
    assert man.num_samples == 23


def test_write_shards_by_bytes_gzip_reproducible_unlabelled(tmp_path: Path) -> None:
    s = _samples(12, labelled=False)
    size = len(s[0][1])
    m1 = write_shards(s, tmp_path / "a", max_bytes=4 * (size + 600), compress=True)
    m2 = write_shards(s, tmp_path / "b", max_bytes=4 * (size + 600), compress=True)
    assert all(e.samples <= 4 for e in m1.shards) and m1.num_samples == 12
    assert len(m1.shards) >= 3
    assert [e.sha256 for e in m1.shards] == [e.sha256 for e in m2.shards]  # byte-reproducible
    with tarfile.open(tmp_path / "a" / m1.shards[0].shard, "r:gz") as tf:
        assert all(n.endswith(".jpg") for n in tf.getnames())  # no .cls when unlabelled


def test_write_shards_reencodes_to_baseline_and_skips_bad(tmp_path: Path) -> None:
    samples = [("prog", make_jpeg(1, size=32, progressive=True), 0), ("png", make_png(2), 1),
               ("bad", b"garbage", 0), ("dotted.name", make_jpeg(3), 1)]
    man = write_shards(samples, tmp_path, reencode_baseline=True)
    assert man.extra["skipped"] == ["bad"]
    with tarfile.open(tmp_path / man.shards[0].shard) as tf:
        assert tf.getnames() == ["prog.jpg", "prog.cls", "png.jpg", "png.cls", "dotted_name.jpg", "dotted_name.cls"]
        for name in ("prog.jpg", "png.jpg"):
            data = tf.extractfile(name).read()
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert not im.info.get("progressive") and not im.info.get("progression")
            assert not check_header(data).progressive


def test_write_shards_rejects_duplicate_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate key 'k'"):
        write_shards([("k", make_jpeg(1), 0), ("k", make_jpeg(2), 0)], tmp_path)


# ------------------------------------------------------------ manifest layouts


def test_manifest_reads_the_cifar_split_layout() -> None:
    doc = {"classes": ["a"], "train": [{"shard": "t-0.tar", "samples": 3}],
           "test": [{"shard": "v-0.tar", "samples": 2}], "format": "x"}
    m = Manifest.from_dict(doc)
    assert [e.shard for e in m.entries("train")] == ["t-0.tar"]
    assert m.num_samples == 5 and m.extra == {"format": "x"}
    with pytest.raises(KeyError, match="pick one"):
        m.entries()
    with pytest.raises(KeyError, match="no split 'val'"):
        m.entries("val")


def test_cifar10_manifest_resolves_and_verifies(cifar10_dir: Path) -> None:
    refs, classes = resolve_shards(f"{cifar10_dir}#test")
    assert len(classes) == 10 and [r.samples for r in refs] == [5000, 5000]
    refs2, _ = resolve_shards(str(cifar10_dir / "train-{000000..000009}.tar.gz"))
    assert len(refs2) == 10 and all(r.samples == 5000 and r.sha256 for r in refs2)
    rep = verify(f"{cifar10_dir}#test")
    assert rep.ok, [c.problems for c in rep.bad]
    assert [c.samples for c in rep.shards] == [5000, 5000]


# ------------------------------------------------------------ CLI make / verify


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    for ci, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"img.{i}.jpg").write_bytes(make_jpeg(100 * ci + i))
    return root


def test_cli_make_labelled_folder_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _image_folder(tmp_path / "src", {"cat": 5, "dog": 4, "eel": 3})
    (tmp_path / "src" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["make", str(src), str(out), "--max-count", "5", "--gzip"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 images" in cap.out
    # progress on stderr, one line per shard as it closes: running count of 13 images
    assert re.findall(r"shard-00000\d\.tar\.gz: (\d) samples.* -- (\d+)/13 images", cap.err) == [
        ("5", "5"), ("5", "10"), ("2", "12")]
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["classes"] == ["cat", "dog", "eel"]
    assert sum(e["samples"] for e in doc["shards"]) == 12 and len(doc["shards"]) == 3
    labels: dict[str, int] = {}
    for e in doc["shards"]:
        with tarfile.open(out / e["shard"], "r:gz") as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    labels[m.name[:-4]] = int(tf.extractfile(m).read())
    assert labels["cat_img_0"] == 0 and labels["dog_img_3"] == 1 and labels["eel_img_2"] == 2
    assert len(labels) == 12
    assert main(["verify", str(out)]) == 0
    cap = capsys.readouterr()
    assert "all 3 shards" in cap.out
    assert sorted(re.findall(r"ok  shard-\d+\.tar\.gz -- (\d)/3 shards", cap.err)) == ["1", "2", "3"]
    from sslstream.pipelines.shards.stream import ShardStream

    streamed = {x.key: x.label for x in ShardStream(str(out), num_workers=1)}
    assert streamed == labels


def test_cli_verify_names_tampered_missing_and_truncated_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    man = write_shards(_samples(20), tmp_path, max_count=5, classes=["a", "b", "c"])
    s = [tmp_path / e.shard for e in man.shards]
    data = bytearray(s[1].read_bytes())
    data[700] ^= 0x01  # one bit inside the first image
    s[1].write_bytes(bytes(data))
    s[2].write_bytes(s[2].read_bytes()[:1500])
    s[3].unlink()
    rc = main(["verify", str(tmp_path / "manifest.json")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "ok  shard-000000.tar" in out
    assert "BAD shard-000001.tar" in out and "sha256" in out
    assert "BAD shard-000002.tar" in out and "unreadable after" in out
    assert "BAD shard-000003.tar" in out and "does not exist" in out
    assert (f"3 of 4 shards of {tmp_path / 'manifest.json'} bad: shard-000001.tar, "
            "shard-000002.tar, shard-000003.tar") in err


def test_cli_verify_of_a_data_root_checks_its_split_folders(tmp_path: Path, capsys) -> None:
    """The embedded default's root (./data/synthetic) holds its shards in train/ and test/:
    `verify ROOT` checks both; a bad shard in one is named with that folder's manifest."""
    from sslstream.pipelines.shards.synthetic import ensure_synthetic

    root = tmp_path / "synthetic"
    ensure_synthetic(root, train_samples=24, test_samples=8, image_size=8, seed=0)
    (root / "notes").mkdir()  # a folder without shards is not a split
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    for split in ("train", "test"):
        assert f"shards of {root / split / 'manifest.json'} verified" in out
    shard = sorted((root / "test").glob("*.tar*"))[0]
    shard.write_bytes(shard.read_bytes()[:600])
    assert main(["verify", str(root)]) == 1
    out, err = capsys.readouterr()
    assert f"shards of {root / 'train' / 'manifest.json'} verified" in out
    assert f"1 of 1 shards of {root / 'test' / 'manifest.json'} bad: {shard.name}" in err
    assert main(["verify", str(root / "notes")]) == 2  # nothing here or one level down
    assert "no *.tar / *.tar.gz / *.tgz shards under" in capsys.readouterr().err


def test_cli_verify_unlabelled_folder_as_module(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(make_png(i))
    assert main(["make", str(src), str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "classes" not in doc and doc["shards"][0]["samples"] == 3
    r = subprocess.run([sys.executable, "-m", "sslstream.pipelines.shards.tools", "verify", str(tmp_path / "nothere")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nothere/manifest.json does not exist" in r.stderr


# ------------------------------------------------------------ tar reader


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "gz"])
def test_tar_reader_agrees_with_tarfile(tmp_path: Path, fmt: int, gz: bool) -> None:
    from sslstream.pipelines.shards.tario import iter_tar_samples

    names = ["d/k1.jpg", "d/k1.cls", "x" * 120 + "/k2.jpg", "x" * 120 + "/k2.cls",
             "k4.jpg", "k4.meta.json"]
    if fmt != tarfile.USTAR_FORMAT:  # names ustar cannot hold
        names.append("y" * 40 + "/" + "z" * 110 + ".jpg")
    if fmt == tarfile.PAX_FORMAT:
        names.append("unicodé/k5.jpg")
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w:gz" if gz else "w", format=fmt) as tf:
        d = tarfile.TarInfo("d")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, n in enumerate(names):
            data = bytes([i]) * (i * 300)  # sizes crossing 512-byte blocks, and an empty one
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    expected: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            key, ext = m.name.split("/")[-1].split(".", 1)
            key = m.name.rsplit("/", 1)[0] + "/" + key if "/" in m.name else key
            if not expected or expected[-1][0] != key:
                expected.append((key, {}))
            expected[-1][1][ext] = tf.extractfile(m).read()
    with path.open("rb") as f:
        got = list(iter_tar_samples(io.BufferedReader(f)))
    assert got == expected
