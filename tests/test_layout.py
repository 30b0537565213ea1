"""The package layout holds: no import circle anywhere, and imports run one way between rooms.

Every import counts, including the lazy ones inside functions: a lazy import hides a circle
from Python at start-up, not from the reader who has to understand the code. The rooms and
their order are the ones docs/contracts.md draws:

    cli -> retrain -> {train, embed} -> evaluate -> tracking -> runtime/errors
        -> pipelines.views -> pipelines.shards ; models (beside pipelines: neither imports
        the other; train and embed are side by side: neither imports the other)
        ; conf (conf/typed.py, the config vocabulary: below everything, imports nothing)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestration", "pipelines", "models", "conf")

# A module may import its own room and any room with a lower rank; never a higher one.
ROOMS: list[tuple[str, int]] = [
    ("sslstream.orchestration.cli", 90),
    ("sslstream.orchestration.retrain", 80),
    ("sslstream.orchestration.train", 70),
    ("sslstream.orchestration.embed", 70),  # beside train: from an encoder to embeddings
    ("sslstream.orchestration.evaluate", 60),
    ("sslstream.orchestration.tracking", 50),
    ("sslstream.orchestration.runtime", 40),
    ("sslstream.orchestration.errors", 35),  # imports nothing; every orchestration room may raise these
    ("sslstream.orchestration.schema", 45),  # the config check: above errors, below tracking
    ("sslstream.orchestration", 40),  # the package's own __init__
    ("sslstream.pipelines.views", 30),
    ("sslstream.pipelines.shards", 20),
    ("sslstream.pipelines", 20),
    ("sslstream.models", 10),
    ("sslstream.conf", 0),  # typed.py: how config keys are declared and checked
]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["sslstream", *parts])] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Project modules that `name` imports anywhere in its file (lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name):
                    yield _nearest_module(a.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not _ours(base):
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                yield full if full in known else _nearest_module(base, known)


def _ours(dotted: str) -> bool:
    """`sslstream.<room>...`: a module of this project (every import is namespaced)."""
    parts = dotted.split(".")
    return len(parts) > 1 and parts[0] == "sslstream" and parts[1] in PACKAGES


def _nearest_module(dotted: str, known: set[str]) -> str:
    parts = dotted.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = {d for d in imports_of(name, path, known) if d and d != name}
        # importing `a.b.c` runs `a/__init__` and `a/b/__init__` too, but those are leaves
        # by construction (docstrings only), so only the named module is an edge
        g[name] = deps
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def rank(module: str) -> tuple[str, int]:
    for prefix, r in ROOMS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, r
    raise AssertionError(f"{module} belongs to no room: add it to ROOMS and docs/contracts.md")


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_run_one_way() -> None:
    bad = []
    for mod, deps in graph().items():
        room, r = rank(mod)
        for d in deps:
            droom, dr = rank(d)
            if droom != room and dr >= r:
                bad.append(f"{mod} ({room}) imports {d} ({droom})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_models_and_pipelines_stay_apart() -> None:
    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
           if m.split(".")[1] != d.split(".")[1]
           and {m.split(".")[1], d.split(".")[1]} == {"models", "pipelines"}]
    assert not bad, bad


def test_subpackage_docstrings_draw_their_map() -> None:
    """Each room's __init__ says what lives there, what it may import, what imports it."""
    missing = []
    inits = [ROOT / pkg / "__init__.py" for pkg in PACKAGES]
    inits += [p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*/__init__.py"))]
    for init in inits:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for word in ("May import", "Imported by"):
            if word not in doc:
                missing.append(f"{init.relative_to(ROOT)}: no '{word}'")
    assert not missing, missing


@pytest.mark.parametrize("fixture", ["cycle", "upward"])
def test_the_checks_can_fail(fixture: str) -> None:
    """The detectors themselves: a made-up circle and a made-up upward import are caught."""
    if fixture == "cycle":
        g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        assert cycles(g) == [["a", "b", "c"]]
    else:
        assert rank("sslstream.orchestration.tracking.tracker")[1] < rank("sslstream.orchestration.train.loop")[1]
        assert rank("sslstream.pipelines.shards.stream")[1] < rank("sslstream.pipelines.views.loader")[1]
