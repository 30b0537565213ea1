"""Capture `sslstream train --cfg` for every method x recipe x data combination.

How tests/golden/train_cfg.json was made (at 5a08db0, before the config redesign); kept to
regenerate it on purpose, which redefines what tests/orchestration/test_golden_config.py
holds the config to: `python tests/golden/capture.py tests/golden/train_cfg.json`. The
methods are the ones of that commit (the golden file is a snapshot, not the registry).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import yaml

METHODS = ["byol", "simclr", "mocov2", "simsiam", "vicreg", "barlow_twins", "contrastive"]
RECIPES = ["cifar", "imagenet"]
DATA = {"synthetic": [], "cifar10": [],
        "shards": ["data.train=/data/train-{000000..000003}.tar",
                   "data.test=/data/test-{000000..000001}.tar"]}


def main(out_path: str) -> int:
    for var in ("SSLSTREAM_DATA_DIR", "SSLSTREAM_CIFAR10", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    from sslstream.orchestration.cli import main as cli

    out = {}
    for m in METHODS:
        for r in RECIPES:
            for d, extra in DATA.items():
                args = ["train", "--cfg", f"method={m}", f"recipe={r}", f"data={d}", *extra]
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    assert cli(args) == 0, args
                out[f"{m}/{r}/{d}"] = {"args": args[2:], "cfg": yaml.safe_load(buf.getvalue())}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
