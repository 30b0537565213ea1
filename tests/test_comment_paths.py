"""Comments, docstrings and docs name only repository paths that exist.

Walks every comment and docstring of the Python files in pipelines/, models/, orchestration/,
sslstream/, benchmarks/ and tests/, and every line of docs/*.md, README.md and BENCHMARKS.md,
for things that look like repository paths (`orchestration/train/step.py`, `conf/recipe/`,
`shards/stream.py`, a bare `loop.py`), and checks each against the files git tracks now
(so it holds for whatever tree it runs on):

- a path whose first folder is a top-level one (`orchestration/...`, `conf/...`, `tests/...`)
  must be a tracked file or folder, exactly;
- a path that starts inside the tree (`shards/stream.py`, `train/step.py`) must be the end of
  a tracked path;
- a bare file name (`loop.py`, `byol_cifar.yaml`) must be the name of a tracked file.

Not paths of this repository, so not checked: URLs and URIs (`https://...`, `s3://...`,
`models:/...`, `runs:/...`), shell globs and templates (`*`, `{..}`, `<name>`, `$VAR`, `X`),
paths that start with `/`, `./`, `../` or `~/` (a user's or the machine's), paths whose first
folder is not a folder of this repository (`moco/builder.py`, `outputs/...`), bare data and
artifact names (`manifest.json`, `retrain/snapshot.json`), and the few files of other
projects or of examples that the text names on purpose (`ELSEWHERE` below).
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_ROOMS = ("pipelines", "models", "orchestration", "sslstream", "benchmarks", "tests")

# files of other projects, or of a user's example, that the text names on purpose
ELSEWHERE = {
    "augmentations.py": "facebookresearch/vicreg's augmentations",
    "main_moco.py": "facebookresearch/moco's training script",
    "main_dino.py": "facebookresearch/dino's training script",
    "simsiam.yaml": "solo-learn's scripts/pretrain/cifar/simsiam.yaml",
    "simclr.yaml": "solo-learn's scripts/pretrain/cifar/simclr.yaml",
    "symmetric_weak.yaml": "solo-learn's scripts/pretrain/cifar/augmentations/symmetric_weak.yaml",
    "dcl.py": "the method docs/adding-a-method.md adds and removes again",
    "test_dcl.py": "the method docs/adding-a-method.md adds and removes again",
    "dcl_cifar.yaml": "the method docs/adding-a-method.md adds and removes again",
    "dcl_imagenet.yaml": "the method docs/adding-a-method.md adds and removes again",
    "main_swav.py": "facebookresearch/swav's training script",
    "builder.py": "facebookresearch/moco(-v3)'s model builder",
    "resnet50.py": "facebookresearch/swav's model file",
    "main.py": "facebookresearch/barlowtwins' training script",
    "lars.py": "solo-learn's LARS",
    "cifar10_benchmark.py": "lightly's CIFAR-10 benchmark",
    "docs/source/getting_started/benchmarks/": "lightly's benchmark docs",
    "retrain.sh": "the user's cron script in the README's example",
    "CONFIG.md": "facebookresearch/moco-v3's reference setups",
    "vits.py": "facebookresearch/moco-v3's ViT definitions",
    "swav_200ep_bs256_pretrain.sh": "facebookresearch/swav's batch-256 script",
}

EXT = r"py|yaml|yml|md|json|toml|sh|txt|cfg|ini|tsv|csv"
# a path with folders (a file or a folder ending in /), or a bare file name
CANDIDATE = re.compile(
    rf"(?<![\w./:~$*{{<>@\\-])"
    rf"((?:[A-Za-z_][\w.-]*/)+(?:[A-Za-z_][\w.-]*\.(?:{EXT}))?|[A-Za-z_][\w-]*\.(?:{EXT}))"
    rf"(?![\w/*{{}}<>$-])"
)
BARE_CHECKED = ("py", "md", "yaml", "yml", "sh", "toml")  # bare data names are not paths


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).exists()]


class Tree:
    """The tracked files and folders, and every tail of their paths."""

    def __init__(self, files: list[str]) -> None:
        self.files = set(files)
        self.dirs = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
        self.top = {f.split("/")[0] for f in files}
        self.dir_names = {d.rsplit("/", 1)[-1] for d in self.dirs}
        self.names = {f.rsplit("/", 1)[-1] for f in files}
        self.tails = {"/".join(f.split("/")[i:]) for f in files for i in range(f.count("/") + 1)}
        self.tails |= {"/".join(d.split("/")[i:]) + "/" for d in self.dirs
                       for i in range(d.count("/") + 1)}

    def exists(self, path: str) -> bool | None:
        """True / False for a repository path; None for what is not one (see the docstring)."""
        if path in ELSEWHERE:
            return None
        if "/" not in path:
            return path in self.names if path.rsplit(".", 1)[-1] in BARE_CHECKED else None
        parts = path.rstrip("/").split("/")
        if any(re.fullmatch(r"[A-Z]", p.split(".")[0]) for p in parts):
            return None  # a template: conf/method/X.yaml
        if parts[0] in self.top:
            return path.rstrip("/") in self.files or path.rstrip("/") in self.dirs
        if parts[0] in self.dir_names and not path.endswith(".json"):
            return path in self.tails
        return None


def _word(text: str, start: int, end: int) -> str:
    """The whitespace- or quote-delimited word around text[start:end]."""
    stops = " \t\n`'\"()"
    lo, hi = start, end
    while lo > 0 and text[lo - 1] not in stops:
        lo -= 1
    while hi < len(text) and text[hi] not in stops:
        hi += 1
    return text[lo:hi]


def python_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    src = path.read_text(encoding="utf-8")
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(src).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                out.append((node.body[0].lineno, doc))
    return out


def texts_to_check(files: list[str]) -> list[tuple[str, int, str]]:
    out = []
    for f in files:
        if f.endswith(".py") and f.split("/")[0] in CODE_ROOMS:
            out += [(f, line, text) for line, text in python_texts(ROOT / f)]
        elif (f.startswith("docs/") and f.endswith(".md")) or f in ("README.md", "BENCHMARKS.md"):
            lines = (ROOT / f).read_text(encoding="utf-8").splitlines()
            out += [(f, i + 1, line) for i, line in enumerate(lines)]
    return out


def missing_paths(tree: Tree, texts: list[tuple[str, int, str]]) -> list[str]:
    bad = []
    for f, line, text in texts:
        for m in CANDIDATE.finditer(text):
            word = _word(text, m.start(1), m.end(1))
            if ":/" in word or any(ch in word for ch in "*{<$?"):
                continue  # a URL / URI, a glob or a template
            if tree.exists(m.group(1)) is False:
                bad.append(f"{f}:{line}: {m.group(1)}")
    return bad


def test_every_path_in_comments_docstrings_and_docs_exists():
    files = tracked_files()
    bad = missing_paths(Tree(files), texts_to_check(files))
    assert not bad, "paths that do not exist:\n" + "\n".join(bad)


def test_the_check_flags_stale_paths_and_spares_what_is_not_a_repository_path():
    """The rules on a small tree: what fails, and what is never taken for a path."""
    tree = Tree(["orchestration/schema/__init__.py", "orchestration/train/loop.py",
                 "conf/augment/byol.yaml", "tests/test_x.py", "README.md"])
    text = ("see orchestration/schema.py, train.py, conf/augment/simclr.yaml, tests/y.py, "
            "conf/recipe/ and train/job.py")
    assert missing_paths(tree, [("f.py", 1, text)]) == [
        "f.py:1: orchestration/schema.py", "f.py:1: train.py", "f.py:1: conf/augment/simclr.yaml",
        "f.py:1: tests/y.py", "f.py:1: conf/recipe/", "f.py:1: train/job.py"]
    fine = ("orchestration/schema/ and orchestration/train/loop.py, (conf/augment/byol.yaml), "
            "`train/loop.py`, loop.py. https://github.com/a/b/blob/main/x/y.py s3://bucket/train/x.tar "
            "gs://b/conf/z.yaml models:/sslstream-encoder@champion runs:/abc/encoder "
            "conf/augment/*.yaml tests/test_{a,b}.py conf/<group>/<name>.yaml conf/method/X.yaml "
            "./data/synthetic/train /data/imagenet/train ~/outputs/run.py ../shared/data/x.json "
            "moco/builder.py outputs/quality.json manifest.json retrain/snapshot.json "
            "lars.py $HOME/x.py")
    assert missing_paths(tree, [("f.md", 2, fine)]) == []


def test_comments_and_docstrings_are_read_but_code_is_not(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Module: see gone/a.py."""\n\nX = "gone/b.py"  # gone/c.py\n\n'
                   'def f():\n    """gone/d.py"""\n    return "gone/e.py"\n', encoding="utf-8")
    texts = " ".join(t for _, t in python_texts(src))
    assert all(p in texts for p in ("gone/a.py", "gone/c.py", "gone/d.py"))
    assert "gone/b.py" not in texts and "gone/e.py" not in texts


HISTORY = re.compile(r"\b(split (?:out )?from|kept (?:apart|out) (?:of|from)|moved (?:from|here)|"
                     r"was split)\b", re.IGNORECASE)


def test_module_docstrings_say_what_a_module_is_for_not_where_it_came_from():
    """A module docstring that explains why code left another file says nothing about what
    the module does (and names a file that may be gone)."""
    bad = []
    for f in tracked_files():
        if f.endswith(".py") and f.split("/")[0] in CODE_ROOMS:
            doc = ast.get_docstring(ast.parse((ROOT / f).read_text(encoding="utf-8"))) or ""
            bad += [f"{f}: {m.group(0)!r}" for m in HISTORY.finditer(doc)]
    assert not bad, "module docstrings about a file's history:\n" + "\n".join(bad)
