"""Product code calls the members its types declare: no `hasattr(x, "m")` or
`getattr(x, "m", default)` to find out whether an object has a member.

A seam between this project's modules is a type (`SampleStream`, `Method`, `TwoViewLoader`,
`TrainOutcome`, ...) whose members are called directly; a probe hides a missing member until
the branch that probes runs, and tends to grow branches that exist only for test doubles.
The probes left are of objects this project does not define (other libraries' exceptions,
file objects and models, a platform's errno table) or of a config that may be a DictConfig
or a plain mapping; each is listed here with its reason, by file and member.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("pipelines", "models", "orchestration", "sslstream")

ALLOWED = {
    ("pipelines/shards/storage.py", "EREMOTEIO"): "errno names differ by platform",
    ("pipelines/shards/storage.py", "response"): "botocore's ClientError carries it, others not",
    ("pipelines/shards/storage.py", "code"): "google's HttpError carries it, others not",
    ("pipelines/shards/tario.py", "peek"): "fsspec's file objects differ by backend",
    ("models/backbones.py", "conv1"): "a torchvision model's stem, by name",
    ("models/backbones.py", "maxpool"): "a torchvision model's stem, by name",
    ("models/backbones.py", "feature_dim"): "a backbone a caller built: checked, named in the error",
    ("orchestration/retrain/stores.py", "__wrapped__"): "gcsfs's decorated request, by version",
    ("orchestration/retrain/stores.py", "response"): "botocore's ClientError carries it",
    ("orchestration/tracking/mlflow_env.py", "reason"): "urllib's URLError carries it, OSError not",
    # a config given as a DictConfig, a dataclass or a mapping
    ("models/backbones.py", "get"): "config",
    ("models/backbones.py", "key"): "config",
    ("models/optim.py", "get"): "config",
    ("models/optim.py", "key"): "config",
    ("models/methods/__init__.py", "get"): "config",
    ("models/methods/__init__.py", "name"): "config",
    ("models/methods/base.py", "items"): "config",
    ("models/methods/base.py", "__name__"): "a typing hint's name (typing objects differ)",
    ("models/methods/base.py", "sync_bn"): "config: the methods whose config has the key",
    ("orchestration/schema/__init__.py", "config_class"): "config",
    ("orchestration/schema/__init__.py", "from_mapping"): "config",
}


def probes() -> list[tuple[str, int, str]]:
    """(file, line, member) of every hasattr / three-argument getattr in product code."""
    found = []
    for room in PRODUCT:
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                    continue
                if node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3):
                    arg = node.args[1]
                    member = arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg)
                    found.append((rel, node.lineno, str(member)))
    return found


def test_no_member_probing_in_product_code():
    bad = [f"{f}:{line}: probes {member!r}" for f, line, member in probes()
           if (f, member) not in ALLOWED]
    assert not bad, "probing instead of a typed member:\n" + "\n".join(bad)
