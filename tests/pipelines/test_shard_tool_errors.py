"""`sslstream shards index / verify` and `sslstream eval` on bad input: one line naming the
file, shard or sample and the fix, exit 2 -- never a traceback, never a silently unlabelled
manifest. Shards are written by hand (tests/pipelines/tarcraft.py), not by the code under
test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sslstream.pipelines.shards.tools import main

from tests.fixtures.shards import make_jpeg
from tests.pipelines import tarcraft as tc

pytestmark = [pytest.mark.timeout(120)]
IMG = make_jpeg(2)


def _shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(tc.member(f"s{i:03d}.{ext}", data) for i, parts in enumerate(samples)
                    for ext, data in parts.items())
    path.write_bytes(body + tc.end())
    return path


def _one_error_line(capsys, rc: int, expect_rc: int = 2) -> str:
    cap = capsys.readouterr()
    assert rc == expect_rc, cap.out + cap.err
    assert "Traceback" not in cap.out + cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("shards ")]
    assert len(lines) == 1, cap.err
    return lines[0]


def test_index_json_label_key_on_bad_json_names_the_shard_and_the_sample(tmp_path, capsys):
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "json": b'{"label": 1}'},
                                      {"jpg": IMG, "json": b'{"label": 2'}])
    line = _one_error_line(capsys, main(["index", str(tmp_path / "d"), "--label-key",
                                         "json:label"]))
    assert "a.tar" in line and "sample s001" in line and "not valid JSON" in line, line
    assert "--label-key" in line  # the fix
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_index_json_label_key_that_matches_nothing_is_an_error(tmp_path, capsys):
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "json": b'{"caption": "a cat"}'}] * 3)
    line = _one_error_line(capsys, main(["index", str(tmp_path / "d"), "--label-key",
                                         "json:label"]))
    assert "label_key=json:label gives none of its 3 samples a label" in line, line
    assert "json{caption}" in line and "--label-key none" in line, line
    assert not (tmp_path / "d" / "manifest.json").exists()
    assert main(["index", str(tmp_path / "d"), "--label-key", "none"]) == 0  # the fix works


def test_index_bad_cls_text_is_an_error_not_a_class_name(tmp_path, capsys):
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "cls": b"3"}, {"jpg": IMG, "cls": b"3.5x"}])
    line = _one_error_line(capsys, main(["index", str(tmp_path / "d"), "--label-key", "cls"]))
    assert "sample s001" in line and ".cls = '3.5x' is not a class index" in line, line
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_index_json_class_names_still_make_classes(tmp_path):
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "json": b'{"label": "dog"}'},
                                      {"jpg": IMG, "json": b'{"label": "cat"}'}])
    assert main(["index", str(tmp_path / "d"), "--label-key", "json:label"]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["classes"] == ["cat", "dog"]


BAD_MANIFESTS = {
    "a list": ([], "a JSON object expected, not a list"),
    "a string": ("x", "a JSON object expected, not a str"),
    "shards not a list": ({"shards": "x"}, "shards must be a list of shard entries"),
    "entries not objects": ({"shards": [1, 2]}, "shards[0] is not a shard entry"),
    "samples not a count": ({"shards": [{"shard": "a.tar", "samples": "x"}]},
                            '"samples" must be a count'),
    "negative samples": ({"shards": [{"shard": "a.tar", "samples": -3}]},
                         '"samples" must be a count'),
    "classes not a list": ({"classes": 5, "shards": [{"shard": "a.tar", "samples": 1}]},
                           "classes must be a list"),
    "no shard name": ({"shards": [{"shard": None, "samples": 1}]}, 'no "shard" file name'),
    "sha256 not hex": ({"shards": [{"shard": "a.tar", "samples": 1, "sha256": 5}]},
                       '"sha256" must be 64 hex digits'),
    "bytes not a count": ({"shards": [{"shard": "a.tar", "samples": 1, "bytes": "x"}]},
                          '"bytes" must be an integer'),
    "a bad split entry": ({"train": [{"shard": "a.tar", "samples": 1}, 3]},
                          "train[1] is not a shard entry"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_verify_a_manifest_of_the_wrong_shape_is_one_line(tmp_path, capsys, case):
    doc, why = BAD_MANIFESTS[case]
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "cls": b"1"}])
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(doc))
    line = _one_error_line(capsys, main(["verify", str(tmp_path / "d")]))
    assert "manifest.json" in line and why in line and "shards index" in line, line


def test_index_over_a_manifest_of_the_wrong_shape_replaces_it(tmp_path, capsys):
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "cls": b"1"}])
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"classes": 5, "shards": []}))
    assert main(["index", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["shards"][0]["samples"] == 1


def test_storage_options_that_are_not_json_are_one_line_without_the_value(tmp_path, capsys):
    _shard(tmp_path / "d" / "a.tar", [{"jpg": IMG, "cls": b"1"}])
    line = _one_error_line(capsys, main(["verify", str(tmp_path / "d"), "--storage-options",
                                         "{secret: hunter2}"]))
    assert "--storage-options is not valid JSON" in line and "hunter2" not in line, line


def test_index_on_an_invalid_bucket_name_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    line = _one_error_line(capsys, main(["index", "s3://Not_A_Bucket!/x"]))
    assert "s3://Not_A_Bucket!/x" in line and 'Invalid bucket name "Not_A_Bucket!"' in line, line


@pytest.mark.timeout(180)
def test_index_on_an_unreachable_endpoint_is_one_line(tmp_path):
    """A refused connection is retried (it may be a blip), then one line with the fix."""
    env = {**__import__("os").environ, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-m", "sslstream.pipelines.shards.tools", "index", "s3://bucket/prefix",
         "--storage-options", '{"config_kwargs": {"retries": {"max_attempts": 1}}}'],
        capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("shards index: listing: s3://bucket/prefix: gave up") and \
        "AWS_ENDPOINT_URL" in last, last


def test_eval_on_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    from sslstream.orchestration.cli import main as cli

    rc = cli(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "tracking.enabled=false",
              f"data.root={tmp_path / 'data'}", "data.generate=false"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert f"checkpoint {tmp_path / 'nope.pt'} does not exist" in err, err
