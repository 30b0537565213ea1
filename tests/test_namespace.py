"""One installed namespace: sslstream neither shadows nor is shadowed by a user's packages.

Most ML projects have their own `models` and `pipelines` packages. These tests work as such a
user does, in fresh processes, from a folder that holds both (each with a marker, and a line
written to a log whenever one is imported):

- `sslstream train` from that folder (default store, default data under ./data/synthetic)
  trains and registers a champion, imports neither package, and prints no MLflow chatter;
- the command it prints to load the encoder works from any other folder;
- `mlflow.pyfunc.load_model("models:/<name>@champion")` from that folder predicts what it
  predicts elsewhere, and `import models` afterwards is still the user's (a);
- the same with the user's `models` imported first (b);
- `sslstream train --cfg` from that folder imports neither package (c);
- the wheel installs `sslstream` and nothing else at the top level.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.orchestration.test_train import cli_env, tiny

REPO = Path(__file__).resolve().parents[1]
MODEL = "models:/sslstream-encoder@champion"
MLFLOW_NOISE = re.compile(r"INFO mlflow|Downloading artifacts|View run|alembic")

USER_PACKAGE = '''"""The user's own {name} package (not sslstream's)."""
import os

MARK = "user-{name}"
if os.environ.get("USER_IMPORT_LOG"):
    with open(os.environ["USER_IMPORT_LOG"], "a") as f:
        f.write("{name}\\n")
'''

PREDICT = '''
import json, sys
import mlflow, numpy as np
{before}
mlflow.set_tracking_uri({store!r})
model = mlflow.pyfunc.load_model({model!r})
x = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
pred = model.predict(x)
{after}
print(json.dumps({{"pred": pred.tolist(), "marks": marks}}))
'''


def user_folder(root: Path) -> Path:
    """A folder holding the user's `models` and `pipelines` packages."""
    for name in ("models", "pipelines"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(USER_PACKAGE.format(name=name))
    return root


def env_for(folder: Path) -> dict[str, str]:
    env = cli_env(USER_IMPORT_LOG=str(folder / "user-imports.log"))
    env.pop("SSLSTREAM_DATA_DIR", None)
    return env


def imported_user_packages(folder: Path) -> list[str]:
    log = folder / "user-imports.log"
    return log.read_text().split() if log.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """`sslstream train` from the user's folder, everything at its defaults but the size:
    data generated under ./data/synthetic, the store ./mlflow.db, outputs ./outputs."""
    folder = user_folder(tmp_path_factory.mktemp("user"))
    args = [a for a in tiny(folder) if not a.startswith(("data.root=", "trainer.output_dir="))]
    proc = subprocess.run([sys.executable, "-m", "sslstream", "train", *args], cwd=folder,
                          env=env_for(folder), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    store = re.search(r"tracking store: (\S+)", proc.stdout)
    assert store, proc.stdout[-2000:]
    return SimpleNamespace(folder=folder, out=out, stdout=proc.stdout, store=store.group(1))


def predict(folder: Path, store: str, *, before: str = "", after: str = "marks = {}") -> dict:
    """Load the champion in a fresh `python -c` process in `folder` (which puts `folder` first
    on sys.path, as a script or notebook there would) and predict 4 images."""
    code = PREDICT.format(before=before, after=after, store=store, model=MODEL)
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env_for(folder),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory) -> list:
    """The champion's predictions in a folder without user packages."""
    return predict(tmp_path_factory.mktemp("clean"), trained.store)["pred"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_from_a_folder_with_user_packages_imports_neither_and_is_quiet(trained):
    assert "registered model: models:/sslstream-encoder/1 (champion)" in trained.stdout
    assert imported_user_packages(trained.folder) == []
    assert not MLFLOW_NOISE.search(trained.out), MLFLOW_NOISE.search(trained.out).group(0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_printed_load_command_works_from_any_folder(trained, tmp_path):
    """The README's newcomer runs the printed command elsewhere: its data and store are
    named absolutely, nothing is created there, and MLflow says nothing."""
    line = next(x for x in trained.stdout.splitlines() if "load it from any folder:" in x)
    command = line.split("load it from any folder: ", 1)[1]
    words = shlex.split(command)
    assert words[1:3] == ["sslstream", "eval"], command
    words[1:2] = [sys.executable, "-m", "sslstream"]  # the console script, wherever it is
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(["env", *words], cwd=elsewhere, env=env_for(elsewhere),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "kNN accuracy: " in proc.stdout
    assert list(elsewhere.iterdir()) == []  # no stray store, no data
    assert not MLFLOW_NOISE.search(out), MLFLOW_NOISE.search(out).group(0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_champion_loads_in_the_users_folder_and_leaves_their_packages_alone(trained, reference):
    """(a) load, predict, then `import models` / `import pipelines`: the user's."""
    got = predict(trained.folder, trained.store, after=(
        "import models, pipelines\n"
        "marks = {'models': models.MARK, 'pipelines': pipelines.MARK}"))
    assert got["marks"] == {"models": "user-models", "pipelines": "user-pipelines"}
    assert got["pred"] == reference
    assert len(got["pred"]) == 4 and all(len(row) == len(reference[0]) for row in got["pred"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_champion_loads_after_the_users_models_is_imported(trained, reference):
    """(b) the user's `models` first: loading and predicting neither replaces nor uses it."""
    got = predict(trained.folder, trained.store,
                  before="import models\nmine = models",
                  after=("import models\n"
                         "marks = {'same': models is mine and sys.modules['models'] is mine,"
                         " 'models': models.MARK}"))
    assert got["marks"] == {"same": True, "models": "user-models"}
    assert got["pred"] == reference


@pytest.mark.timeout(120)
def test_train_cfg_from_a_folder_with_user_packages_imports_neither(tmp_path):
    """(c) the config check runs every import the training does up to the data."""
    folder = user_folder(tmp_path / "user")
    proc = subprocess.run([sys.executable, "-m", "sslstream", "train", "--cfg"], cwd=folder,
                          env=env_for(folder), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run_name:" in proc.stdout
    assert imported_user_packages(folder) == []


@pytest.mark.timeout(120)
def test_python_m_sslstream_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sslstream", "--help"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sslstream train" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_installs_only_the_sslstream_namespace(tmp_path):
    """What `pip install` puts in site-packages: `sslstream/` (with the rooms and the
    config files inside) and its dist-info; no top-level models, pipelines, orchestration
    or conf."""
    src = tmp_path / "src"  # a copy of the tracked files: the build leaves the checkout alone
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith("benchmarks/results/"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path), str(src)],
                          capture_output=True, text=True, timeout=500,
                          env={**os.environ, "PIP_NO_INPUT": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("sslstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    (info,) = [t for t in top if t.endswith(".dist-info")]
    assert top == {"sslstream", info}, sorted(top)
    top_level = zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split() \
        if f"{info}/top_level.txt" in names else ["sslstream"]
    assert top_level == ["sslstream"]
    for inside in ("sslstream/models/backbones.py", "sslstream/pipelines/shards/stream.py",
                   "sslstream/orchestration/cli.py", "sslstream/conf/config.yaml",
                   "sslstream/__main__.py"):
        assert inside in names, inside
