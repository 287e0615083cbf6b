"""Which library code a stage's output depends on, found from the imports, and its hash.

A stage's code is its entry module (`vlaforget.stages.<stage>`, or, where that does not exist, the
module `cli.COMMANDS` runs for it) and every vlaforget module that one imports, transitively:
`import` / `from ... import` statements anywhere in a module (function-level imports included),
`importlib.import_module("<constant>")`, and the packages (`__init__.py`) each import executes.
Nothing is kept by hand, so a new import is tracked the moment it is written.

Optional parts count only where a job uses them. `stop` modules are not followed from the entry;
the caller adds the closure of the ones a job enables (the train stage: one module per method
plug-in under `train/plugins/`, and the periodic evaluation; config.code_hash).

The hash covers each module's name and its syntax tree without docstrings (canonical_code: node
types and fields, no positions; comments never reach the tree), so editing a comment or a docstring,
or reformatting (`make format`), reruns nothing (docs/DEVELOPMENT.md, "What reruns when code
changes").
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

_GRAPH: dict = {}  # (file, mtime, size) -> imported module names
_DIGESTS: dict = {}  # (file, mtime, size) -> code_digest
_TREES: dict = {}  # (file, mtime, size) -> (bytes, ast)


def module_file(pkg_dir: Path, name: str) -> Path | None:
    """The file of module `name` (vlaforget.x.y) in the package at pkg_dir, or None."""
    parts = name.split(".")
    if parts[0] != "vlaforget":
        return None
    base = Path(pkg_dir).joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _key(f: Path):
    st = f.stat()
    return str(f), st.st_mtime_ns, st.st_size


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


_IMPORT_MODULE_RE = re.compile(r"""import_module\(\s*["']([\w.]+)["']""")
_BODIES = ("body", "orelse", "finalbody", "handlers")


def _statements(tree):
    """Every statement of a module, nested ones included (bodies of defs, ifs, loops, try, with)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        for field in _BODIES:
            todo.extend(
                x for x in getattr(node, field, ()) or () if isinstance(x, (ast.stmt, ast.excepthandler))
            )
        for case in getattr(node, "cases", ()) or ():  # match statements
            todo.extend(case.body)


def _tree(f: Path):
    k = _key(f)
    if k not in _TREES:
        raw = f.read_bytes()
        _TREES[k] = (raw, ast.parse(raw, filename=str(f)))
    return _TREES[k]


def imports_of(pkg_dir: Path, name: str) -> set[str]:
    """vlaforget modules that module `name` imports (anywhere in it), with their packages."""
    f = module_file(pkg_dir, name)
    if f is None:
        return set()
    k = _key(f)
    if k in _GRAPH:
        return _GRAPH[k]
    raw, tree = _tree(f)
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(mod: str) -> None:
        if mod == "vlaforget" or mod.startswith("vlaforget."):
            if module_file(pkg_dir, mod) is not None:
                found.add(mod)
            found.update(p for p in _parents(mod) if module_file(pkg_dir, p) is not None)

    for node in _statements(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)] if node.level > 1 else up
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            add(base)
            for a in node.names:
                if module_file(pkg_dir, f"{base}.{a.name}") is not None:
                    add(f"{base}.{a.name}")
    for m in _IMPORT_MODULE_RE.finditer(raw.decode("utf-8")):  # importlib.import_module("<constant>")
        add(m.group(1))
    found.discard(name)
    _GRAPH[k] = found
    return found


def closure(pkg_dir: Path, roots, stop=()) -> set[str]:
    """Every module reachable from `roots` by imports, not following into `stop` modules (a root
    that is itself in `stop` is followed)."""
    roots = [r for r in roots if module_file(pkg_dir, r) is not None]
    stop = set(stop) - set(roots)
    seen: set[str] = set()
    todo = list(roots) + [p for r in roots for p in _parents(r) if module_file(pkg_dir, p) is not None]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(d for d in imports_of(pkg_dir, m) if d not in seen and d not in stop)
    return seen


def stage_entry(pkg_dir: Path, stage: str) -> str:
    """The module that runs stage `stage`: vlaforget.stages.<stage> where it exists, else the module
    the command line runs for it (cli.COMMANDS, read from cli.py's source)."""
    own = f"vlaforget.stages.{stage}"
    if module_file(pkg_dir, own) is not None:
        return own
    commands = _cli_commands(pkg_dir)
    for name in (stage.replace("_", "-"), stage):
        if name in commands:
            return commands[name]
    raise KeyError(f"no entry module for stage '{stage}': neither {own} nor a cli.COMMANDS entry")


def _cli_commands(pkg_dir: Path) -> dict[str, str]:
    tree = ast.parse((Path(pkg_dir) / "cli.py").read_text())
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        )
        if isinstance(target, ast.Name) and target.id == "COMMANDS" and node.value is not None:
            return {k: v[0] for k, v in ast.literal_eval(node.value).items()}
    return {}


# Fields that say where code is or how it was spelt, not what it does: positions, type comments,
# Constant.kind ('u' of u"..."), Module.type_ignores (from `# type: ignore` comments).
_NOT_CODE = frozenset(
    {"lineno", "col_offset", "end_lineno", "end_col_offset", "type_comment", "kind", "type_ignores"}
)
_HAS_DOCSTRING = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _canon(node):
    """A node as nested lists: its type name, then [field, value] for each field that is code and set
    (None and [] left out alike: fields a later Python adds, such as 3.12's type_params, stay
    invisible until used); docstrings dropped; constants as type and repr."""
    if isinstance(node, list):
        return [_canon(x) for x in node]
    if not isinstance(node, ast.AST):
        return f"{type(node).__name__}:{node!r}"
    out: list = [type(node).__name__]
    for name in node._fields:
        value = getattr(node, name, None)
        if name == "body" and isinstance(node, _HAS_DOCSTRING) and value and _is_docstring(value[0]):
            value = value[1:]
        if name in _NOT_CODE or value is None or (isinstance(value, list) and not value):
            continue
        out.append([name, _canon(value)])
    return out


def _is_docstring(stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def canonical_code(path: Path) -> str:
    """The module's syntax tree as canonical text: node types and their fields, without positions,
    comments (the parser drops them) and docstrings (module, class, function). Formatting (quotes,
    wrapping, parentheses, trailing commas: `ruff format`) does not change it, nor does the Python
    version 3.10-3.13 that parses it (tests/test_codedeps_hash.py)."""
    return _canonical(_tree(Path(path))[1])


def _canonical(tree) -> str:
    return json.dumps(_canon(tree), separators=(",", ":"), ensure_ascii=False)


def source_digest(source: bytes | str) -> str:
    """code_digest of a module's source text (an older version of a file, read from git)."""
    return hashlib.sha256(_canonical(ast.parse(source)).encode()).hexdigest()


def code_digest(path: Path) -> str:
    """sha256 (hex) of canonical_code: what a module contributes to a stage's code hash."""
    path = Path(path)
    k = _key(path)
    if k not in _DIGESTS:
        _DIGESTS[k] = hashlib.sha256(canonical_code(path).encode()).hexdigest()
    return _DIGESTS[k]


def module_hashes(pkg_dir: Path, modules) -> dict[str, str]:
    """{file relative to the package: 8 hex digits of its code_digest} of the modules."""
    out = {}
    for m in sorted(set(modules)):
        f = module_file(pkg_dir, m)
        if f is not None:
            out[str(f.relative_to(pkg_dir))] = code_digest(f)[:8]
    return out


def hash_modules(pkg_dir: Path, modules) -> str:
    """12 hex digits over the modules' files and code digests."""
    h = hashlib.sha256()
    for rel, digest in sorted(module_hashes(pkg_dir, modules).items()):
        h.update(f"{rel}\0{digest}\0".encode())
    return h.hexdigest()[:12]
