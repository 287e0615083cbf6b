"""Which library code a stage's output depends on, found from the imports, and its hash.

A stage's code is its entry module (`vlaforget.stages.<stage>`, or, where that does not exist, the
module `cli.COMMANDS` runs for it) and every vlaforget module that one imports, transitively:
`import` / `from ... import` statements anywhere in a module (function-level imports included),
`importlib.import_module("<constant>")`, and the packages (`__init__.py`) each import executes.
Nothing is kept by hand, so a new import is tracked the moment it is written.

Optional parts count only where a job uses them. `stop` modules are not followed from the entry;
the caller adds the closure of the ones a job enables (the train stage: one module per method
plug-in under `train/plugins/`, and the periodic evaluation; codedeps.code_hash).

The hash covers each module's name and its syntax tree without docstrings (canonical_code: node
types and fields, no positions; comments never reach the tree), so editing a comment or a docstring,
or reformatting (`make format`), reruns nothing (docs/DEVELOPMENT.md, "What reruns when code
changes").

The last section applies this to the package itself: `stage_code(stage, enabled)` -> (code hash,
per-file hashes) of a stage job, which stageconfig.stage_config records in each stage config
(`code`, `code_files`); `code_hash("table")` / `("figures")` for the report rules.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

from .errors import ConfigError
from .semantics import periodic_eval_matters

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


# ----------------------------------------------------------------------------- the code of a stage job

PKG_DIR = Path(__file__).resolve().parent  # the vlaforget package

# A stage's code = what its entry module imports, transitively (closure above), hashed without
# comments and docstrings; it goes into the stage config (`code`), since Snakemake's code trigger
# sees only the rule body: editing that code reruns the stage. Optional parts count only for the
# jobs that use them: a method plug-in (train/plugins/<name>.py) for the runs that enable it, the
# periodic evaluation (eval/) for runs whose early stopping it drives.
STAGES_WITH_CODE = (
    "demos",
    "libero_fixture",
    "cache",
    "model",
    "probe",
    "icsm",
    "craft_anchors",
    "train",
    "eval",
    "forgetting",
    "libero_vqa",
    "vqa_convert",
    "export",
    "table",
    "figures",
)
OPTIONAL_CODE: dict[str, dict[str, str]] = {"train": {"periodic_eval": "vlaforget.eval.closed_loop"}}
# Plumbing that records and compares ids, never what a stage computes: not followed from an entry.
CODE_EXCLUDED = ("vlaforget.freshness", "vlaforget.codedeps")


def optional_code(stage: str) -> dict[str, str]:
    """name -> module of the optional parts of a stage's code (train: each plug-in, periodic eval)."""
    out = dict(OPTIONAL_CODE.get(stage, {}))
    if stage == "train":
        for f in sorted((PKG_DIR / "train" / "plugins").glob("*.py")):
            if f.stem != "__init__":
                out[f.stem] = f"vlaforget.train.plugins.{f.stem}"
    return out


def code_modules(stage: str, enabled=()) -> list[str]:
    """The vlaforget modules a stage job's output depends on: the closure of its entry module's
    imports, without the optional parts, plus the closure of each enabled optional part."""
    if stage == "report":  # older rule files: table and figures together
        return sorted(set(code_modules("table")) | set(code_modules("figures")))
    opt = optional_code(stage)
    unknown = set(enabled) - set(opt)
    if unknown:
        raise ConfigError(f"stage {stage}: no optional code named {sorted(unknown)} (known: {sorted(opt)})")
    stop = set(opt.values()) | set(CODE_EXCLUDED)
    mods = closure(PKG_DIR, [stage_entry(PKG_DIR, stage)], stop=stop)
    for name in enabled:
        mods |= closure(PKG_DIR, [opt[name]], stop=stop - {opt[name]})
    return sorted(mods)


_CODE_HASHES: dict = {}


def _stats(files) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def stage_code(stage: str, enabled=()) -> tuple[str, dict]:
    """(code_hash, code_files) of a stage job that runs the optional parts `enabled`."""
    enabled = tuple(sorted(enabled))
    # memoised on the files it read (stage configs ask for it once per input of every job): an edit
    # of one of them, or a new stages/<stage>.py or plug-in module, recomputes it
    key = (stage, enabled, str(PKG_DIR))
    probe = [PKG_DIR / "stages" / f"{stage}.py", PKG_DIR / "cli.py"]
    plugin_dir = PKG_DIR / "train" / "plugins"
    listing = tuple(sorted(p.name for p in plugin_dir.glob("*.py"))) if stage == "train" else ()
    hit = _CODE_HASHES.get(key)
    if hit is not None and hit[0] == listing and hit[1] == _stats(probe + hit[2]):
        return hit[3]
    mods = code_modules(stage, enabled)
    files = [module_file(PKG_DIR, m) for m in mods]
    files = [f for f in files if f is not None]
    val = (hash_modules(PKG_DIR, mods), module_hashes(PKG_DIR, mods))
    _CODE_HASHES[key] = (listing, _stats(probe + files), files, val)
    return val


def code_hash(stage: str, enabled=()) -> str:
    """Hash of a stage's code (code_modules) without comments and docstrings."""
    return stage_code(stage, enabled)[0]


def code_files(stage: str, enabled=()) -> dict[str, str]:
    """{file: hash} behind code_hash: recorded in the stage config so a dry-run can name the file
    whose edit reruns a job (freshness.config_changes names them); not part of the id (`code` covers it)."""
    return dict(stage_code(stage, enabled)[1])


def changed_files(before: dict, after: dict) -> list[str]:
    """The files whose hash differs between two `code_files` records (added or dropped ones too)."""
    return sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))


def train_code_parts(sc: dict) -> list[str]:
    """The optional code a train job runs: its enabled plug-ins, and the periodic evaluation when
    its result can change the run (early stopping)."""
    parts = [k for k, v in (sc.get("method") or {}).items() if isinstance(v, dict) and v.get("enabled")]
    if periodic_eval_matters(sc.get("train") or {}):
        parts.append("periodic_eval")
    return parts
