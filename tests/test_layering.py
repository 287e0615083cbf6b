"""The library is layered: every import (module- and function-level, read with `ast`) goes from a
higher layer to a lower one or stays inside its own package, and no two packages import each other,
directly or through others. docs/DEVELOPMENT.md draws the same picture.

A "package" is a subpackage (data/, models/, ...) or a top-level module (io.py, config.py, ...).
Layers, lowest first (a package may import only packages of its own layer or below):
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path

PKG = Path(
    os.environ.get("VLAFORGET_LAYERING_PKG", Path(__file__).resolve().parents[1] / "src" / "vlaforget")
)

LAYERS: list[tuple[str, ...]] = [
    (
        "errors",
        "semantics",
        "imaging",
    ),  # user-facing error types; which stage-config keys ids cover; frames as TensorFlow decodes and
    # resizes them: import nothing of vlaforget
    ("io", "paths", "jobs"),  # files, logging, locks; the data-root policy and layout; job environments
    (
        "freshness",
        "gpus",
        "precision",
        "codedeps",
        "stagefile",
    ),  # completion stamps and input checks; the GPU slot allocator; TF32 off for fp32 models; import closures (code hashes);
    # the stage-config file (written by the workflow, read by a stage)
    ("envs",),  # simulators: Meta-World, LIBERO
    ("data",),  # RLDS, caches, splits, demos, VQA, probe-set loading
    ("validation",),  # config checks made at config time (reads data's split rule)
    (
        "settings",
        "study",
        "config",
        "stageconfig",
    ),  # typed stage-config blocks; the study's names, grid and job graph; loading + validation; stage configs
    ("models",),  # backends (tiny, OpenVLA), the action tokenizer, features of a forward
    ("methods",),  # ICSM, HSW, Thermostat, CRaFT: the method maths
    ("train",),  # the training loop and its plug-ins, pretraining, checkpoints
    ("eval",),  # closed-loop rollouts, forgetting metrics, VQA scoring
    ("report",),  # tables and figures
    ("export", "plan", "bench", "preflight", "disk", "restamp", "migrate"),  # tools over the library
    ("stages",),  # one recipe per workflow stage (vlaforget <stage>)
    ("cli", "__init__"),  # the command line
]
LAYER = {p: i for i, names in enumerate(LAYERS) for p in names}
__doc__ += "\n".join(f"  {i}: {', '.join(names)}" for i, names in enumerate(LAYERS)) + "\n"


def package_of(module: str) -> str:
    """vlaforget.data.cache -> data; vlaforget.io -> io; vlaforget -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(pkg: Path = PKG) -> list[tuple[str, str, str, int]]:
    """(from package, to package, file, line) for every import of vlaforget in the library, at any
    depth of the code (function-level imports included), plus cli.py's COMMANDS (modules it imports
    by name)."""
    out = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if f.name == "__init__.py" else rel.parts)
        here = module.split(".") if f.name == "__init__.py" else module.split(".")[:-1]
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif f.name == "cli.py" and isinstance(node, ast.Constant) and isinstance(node.value, str):
                targets = [node.value] if node.value.startswith("vlaforget.") else []
            else:
                continue
            for t in targets:
                if t == "vlaforget" or t.startswith("vlaforget."):
                    a, b = package_of(module), package_of(t)
                    if a != b:
                        out.append((a, b, str(f.relative_to(pkg)), node.lineno))
    return out


def upward(edges) -> list[str]:
    return [
        f"{file}:{line}: {a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
        for a, b, file, line in edges
        if LAYER[b] > LAYER[a]
    ]


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b, _, _ in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer():
    names = {
        p.stem if p.is_file() else p.name
        for p in PKG.iterdir()
        if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert names - set(LAYER) == set(), (
        "give the new package a layer in tests/test_layering.py (and docs/DEVELOPMENT.md)"
    )


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = upward(imports())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    edges = imports()
    found = cycles(edges)
    detail = [
        f"  {a} -> {b} at {file}:{line}"
        for comp in found
        for a, b, file, line in edges
        if a in comp and b in comp
    ]
    assert not found, f"import cycles between packages {found}:\n" + "\n".join(detail)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a function-level relative import from a low package to a high one is
    found, and so is the circle it closes."""
    pkg = tmp_path / "vlaforget"
    (pkg / "data").mkdir(parents=True)
    (pkg / "methods").mkdir()
    for d in (pkg, pkg / "data", pkg / "methods"):
        (d / "__init__.py").write_text("")
    (pkg / "data" / "probe.py").write_text("def f():\n    from ..methods.icsm import g\n")
    (pkg / "methods" / "icsm.py").write_text("from ..data import probe\n")
    edges = imports(pkg)
    assert ("data", "methods", "data/probe.py", 2) in edges and (
        "methods",
        "data",
        "methods/icsm.py",
        1,
    ) in edges
    assert upward(edges) == ["data/probe.py:2: data (layer 4) imports methods (layer 8)"]
    assert cycles(edges) == [["data", "methods"]]
