"""`sslstream shards index` and `shards verify` on shards made by other tools, local, on S3
(moto) and on GCS (the fake server); verify's sources; the non-adjacent-members case."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import webdataset as wds
from sslstream.pipelines.shards.indexer import index_shards
from sslstream.pipelines.shards.stream import BadDataError, ShardStream
from sslstream.pipelines.shards.tools import main, verify

from tests.fixtures.shards import make_jpeg

pytestmark = [pytest.mark.timeout(120)]


def _wds(root: Path, n: int = 13, per: int = 5, labelled: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "part-%06d.tar"), maxcount=per) as sink:
        for i in range(n):
            s = {"__key__": f"k{i:03d}", "jpg": make_jpeg(i)}
            s["json"] = {"label": i % 4} if labelled else {"caption": "x"}
            sink.write(s)


def test_index_writes_counts_bytes_sha256_and_classes(tmp_path, capsys):
    _wds(tmp_path / "w")
    assert main(["index", str(tmp_path / "w")]) == 0
    man = json.loads((tmp_path / "w" / "manifest.json").read_text())
    files = sorted((tmp_path / "w").glob("part-*.tar"))
    assert [e["shard"] for e in man["shards"]] == [f.name for f in files]
    assert [e["samples"] for e in man["shards"]] == [5, 5, 3]
    for e, f in zip(man["shards"], files, strict=True):
        data = f.read_bytes()
        assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    assert man["classes"] == ["0", "1", "2", "3"] and man["label_key"] == "json:label"
    err = capsys.readouterr().err
    assert "3/3 shards" in err  # progress lines
    s = ShardStream(str(tmp_path / "w"), shuffle=False, num_workers=0)
    assert s._refs[0].samples == 5  # counts from the manifest: no counting read
    assert {x.key: x.label for x in s} == {f"k{i:03d}": i % 4 for i in range(13)}
    assert main(["verify", str(tmp_path / "w")]) == 0


def test_index_of_unlabelled_shards_has_no_classes(tmp_path):
    _wds(tmp_path / "u", labelled=False)
    _, man, _ = index_shards(str(tmp_path / "u"))
    assert man.classes is None and man.num_samples == 13


def test_verify_takes_a_single_shard_a_brace_pattern_and_a_bare_folder(tmp_path, capsys):
    _wds(tmp_path / "b")
    one = str(tmp_path / "b" / "part-000001.tar")
    rep = verify(one)
    assert rep.ok and [c.samples for c in rep.shards] == [5]
    assert main(["verify", str(tmp_path / "b" / "part-{000000..000002}.tar")]) == 0
    assert "no manifest.json" in capsys.readouterr().out  # readability only, and the fix
    assert verify(str(tmp_path / "b")).ok  # folder without a manifest: its shards
    index_shards(str(tmp_path / "b"))
    (tmp_path / "b" / "part-000001.tar").write_bytes(b"\0" * 100)
    rep = verify(one)  # the manifest beside it is used for the single shard too
    assert not rep.ok and any("manifest" in p for p in rep.shards[0].problems)


def test_non_adjacent_members_are_named_as_member_order(tmp_path, capsys):
    src = tmp_path / "files"
    src.mkdir()
    for i in range(4):
        (src / f"{i:06d}.jpg").write_bytes(make_jpeg(i))
        (src / f"{i:06d}.cls").write_text(str(i % 2))
    order = [f"{i:06d}.jpg" for i in range(4)] + [f"{i:06d}.cls" for i in range(4)]
    out = tmp_path / "bad"
    out.mkdir()
    subprocess.run(["tar", "czf", str(out / "x-000000.tar.gz"), "-C", str(src), *order], check=True)
    rc = main(["verify", str(out / "x-000000.tar.gz")])
    text = capsys.readouterr().out
    assert rc == 1
    assert "not grouped by key (member order" in text and "--sort=name" in text
    assert "missing image" not in text
    with pytest.raises(ValueError, match="member order"):
        index_shards(str(out))
    assert main(["index", str(out)]) == 2
    assert not (out / "manifest.json").exists()
    with pytest.raises(BadDataError, match=r"missing_image \d+.*shards verify"):
        list(ShardStream(str(out), shuffle=False, num_workers=0))
    # the fix the message names works
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    subprocess.run(["tar", "czf", str(fixed / "x-000000.tar.gz"), "--sort=name", "-C", str(src),
                    "."], check=True)
    _, man, _ = index_shards(str(fixed))
    assert man.num_samples == 4 and man.classes == ["0", "1"]


@pytest.mark.s3
def test_index_on_s3(s3, tmp_path):
    _wds(tmp_path / "s")
    s3.bucket("idx")
    url = s3.upload(tmp_path / "s", "idx/set")
    murl, man, _ = index_shards(url, s3.storage_options)
    assert murl == f"{url}/manifest.json" and man.num_samples == 13
    assert verify(url, s3.storage_options).ok
    s = ShardStream(url, storage_options=s3.storage_options, shuffle=False, num_workers=1)
    assert [r.samples for r in s._refs] == [5, 5, 3]


def test_index_on_gcs(gcs, tmp_path):
    from tests.fixtures.gcs import GCS_OPTIONS

    _wds(tmp_path / "g")
    for p in sorted((tmp_path / "g").iterdir()):
        gcs.put("data", f"g/{p.name}", p.read_bytes())
    murl, man, _ = index_shards("gs://data/g", GCS_OPTIONS, workers=2)
    assert man.num_samples == 13 and man.classes == ["0", "1", "2", "3"]
    assert verify("gs://data/g", GCS_OPTIONS).ok
