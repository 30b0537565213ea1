"""The `sslstream` command line: dispatch, usage errors, Hydra composition from any cwd."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from orchestration.cli import compose_config, main
from tests.orchestration.test_train import cli_env


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "usage: sslstream" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_config_errors_name_the_key(capsys, in_tmp_cwd):
    assert main(["train", "--cfg", "trainer.nope=1"]) == 2
    assert "trainer.nope" in capsys.readouterr().err
    assert main(["train", "--cfg", "method=does_not_exist"]) == 2
    assert "does_not_exist" in capsys.readouterr().err
    assert main(["train", "--bogus-flag"]) == 2
    assert "--bogus-flag" in capsys.readouterr().err


def test_eval_needs_exactly_one_source(capsys):
    assert main(["eval"]) == 2
    assert main(["eval", "--checkpoint", "a.pt", "--model", "models:/x/1"]) == 2
    assert "exactly one of --checkpoint" in capsys.readouterr().err


def test_compose_works_from_any_cwd_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["data=shards", "data.train=s3://bucket/train-{000000..000127}.tar"])
    assert cfg.data.train == "s3://bucket/train-{000000..000127}.tar"
    assert cfg.run_name == "byol-shards"
    # the embedded default: BYOL, resnet_mini, synthetic data under ./data/synthetic
    default = compose_config([])
    assert (default.method.name, default.backbone.name, default.data.name) == ("byol", "resnet_mini", "synthetic")
    assert default.data.root == "./data/synthetic"
    import os

    assert os.getcwd() == str(tmp_path)  # Hydra's compose API does not chdir


def test_shards_subcommand_is_dispatched(tmp_path, capsys):
    from pipelines.synthetic import samples

    src = tmp_path / "src" / "cls0"
    src.mkdir(parents=True)
    for key, data, _ in samples(3, size=16):
        (src / f"{key}.jpg").write_bytes(data)
    assert main(["shards", "make", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert main(["shards", "verify", str(tmp_path / "out")]) == 0


@pytest.mark.timeout(120)
def test_console_script_and_module_entry_point(tmp_path):
    exe = shutil.which("sslstream")
    cmds = [[sys.executable, "-m", "orchestration.cli"], [sys.executable, "-m", "orchestration"]]
    if exe:
        cmds.append([exe])
    for cmd in cmds:
        proc = subprocess.run([*cmd, "train", "--cfg", "trainer.epochs=3"], cwd=tmp_path,
                              env=cli_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "epochs: 3" in proc.stdout
