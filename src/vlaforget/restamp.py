"""`vlaforget restamp --root R`: carry a data root over the once-only change of code hashes (issue 30).

Stage configs record a `code` hash and its per-file parts (`code_files`). They were hashes of each
module's text without comments and docstrings; they are now hashes of its syntax tree
(codedeps.canonical_code), so formatting is not code. The change gives every stage config a new id,
which would rerun the whole study. This command re-stamps what it can prove unchanged instead:

- a finished job is re-stamped when every file of its code today (the same files: config.code_modules)
  has the syntax tree of the file it was made with. The old per-file hash is of text; the text it was
  made from is found among the current file and the file's versions in git history (whichever has
  that old text hash), and that version's tree must equal today's. So a root made before `make
  format` (or any edit of comments, docstrings or layout) is re-stamped; a real code edit is not;
- its inputs must be re-stamped (or already current) first: ids chain through `inputs`;
- its output must record the old id (it was made for that very config).

Re-stamping rewrites the stage config's `code`, `code_files`, input ids (and a train run's `run_id`,
renaming its checkpoint folder) and the id recorded in its completion file, keeping every file's
modification time, so Snakemake's mtime logic sees nothing new. Everything else reruns as it would
have. Snakemake's own record of the `stage_config` rule's params (the old id) would still rerun the
re-stamped jobs: `--cleanup-metadata` on the re-stamped stage-config files forgets it (this command
runs it with `--profile`, or prints it). Tables and figures are rebuilt (seconds; their records hold
the report code's hash without per-file parts). docs/DEVELOPMENT.md, docs/troubleshooting.md.

Kept in its own module so the one-root migration (`migrate-root`) can call `restamp_root`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path

import yaml

from . import codedeps, freshness
from . import config as vfc
from .io import atomic_write_text, config_id, read_json

# ----------------------------------------------------------------------------- the old text hash


def legacy_source(raw: bytes) -> str:
    """The code hash's input before issue 30: the module's text without comments, docstrings
    (module / class / function), blank lines and trailing spaces (the former
    codedeps.normalized_source, kept to recognise the old hashes)."""
    import ast

    tree = ast.parse(raw)
    lines = raw.decode("utf-8").splitlines()
    cut: list[tuple[int, int, int, int]] = []  # (line0, col0, line1, col1), 1-based lines, char cols
    for tok in tokenize.tokenize(io.BytesIO(raw).readline):
        if tok.type == tokenize.COMMENT:
            cut.append((*tok.start, *tok.end))

    def char_col(line: int, byte_col: int) -> int:  # ast columns count UTF-8 bytes
        return len(lines[line - 1].encode("utf-8")[:byte_col].decode("utf-8", "ignore"))

    for node in [tree, *codedeps._statements(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            d = node.body[0]
            if (
                isinstance(d, ast.Expr)
                and isinstance(d.value, ast.Constant)
                and isinstance(d.value.value, str)
            ):
                cut.append(
                    (
                        d.lineno,
                        char_col(d.lineno, d.col_offset),
                        d.end_lineno,
                        char_col(d.end_lineno, d.end_col_offset),
                    )
                )
    keep = [list(x) for x in lines]
    for l0, c0, l1, c1 in cut:
        for ln in range(l0, l1 + 1):
            row = keep[ln - 1]
            a = c0 if ln == l0 else 0
            b = c1 if ln == l1 else len(row)
            for i in range(a, min(b, len(row))):
                row[i] = None
    out = []
    for row in keep:
        s = "".join(ch for ch in row if ch is not None).rstrip()
        if s.strip() and s.strip() != "\\":
            out.append(s)
    return "\n".join(out) + "\n"


def legacy_digest(raw: bytes) -> str:
    """8 hex digits: a file's entry in an old stage config's `code_files`."""
    return hashlib.sha256(legacy_source(raw).encode()).hexdigest()[:8]


def combine(file_digests: dict[str, str]) -> str:
    """The stage's `code` from its per-file digests (as codedeps.hash_modules combines them)."""
    h = hashlib.sha256()
    for rel, digest in sorted(file_digests.items()):
        h.update(f"{rel}\0{digest}\0".encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- versions of a file


class Versions:
    """Per library file: old text hash -> syntax-tree digests of the versions that had it (the file
    today, and every version in the history of the git repository holding the package, if any)."""

    def __init__(self, pkg_dir: Path):
        self.pkg_dir = Path(pkg_dir)
        self._blobs: dict[str, set[str]] | None = None  # rel -> git blob ids
        self._seen: dict[str, dict[str, set[str]]] = {}
        self.top: Path | None = None

    def _git(self, *args: str, data: bytes | None = None) -> bytes:
        return subprocess.run(
            ["git", "-C", str(self.top or self.pkg_dir), *args],
            input=data,
            capture_output=True,
            check=True,
            timeout=300,
        ).stdout

    def _history(self) -> dict[str, set[str]]:
        if self._blobs is None:
            self._blobs = {}
            try:
                self.top = Path(self._git("rev-parse", "--show-toplevel").decode().strip())
                prefix = self.pkg_dir.resolve().relative_to(self.top.resolve()).as_posix()
                raw = self._git(
                    "log", "--all", "--format=", "--raw", "--no-abbrev", "--no-renames", "--", prefix
                )
            except (OSError, ValueError, subprocess.SubprocessError):
                return self._blobs
            for line in raw.decode().splitlines():  # :100644 100644 <old> <new> M\t<path>
                meta, _, path = line.partition("\t")
                parts = meta.split()
                if len(parts) >= 4 and path.endswith(".py") and path.startswith(prefix + "/"):
                    rel = path[len(prefix) + 1 :]
                    self._blobs.setdefault(rel, set()).update(b for b in parts[2:4] if set(b) != {"0"})
        return self._blobs

    def _read_blobs(self, blobs: list[str]) -> list[bytes]:
        out = self._git("cat-file", "--batch", data="".join(b + "\n" for b in blobs).encode())
        texts, pos = [], 0
        for _ in blobs:  # "<sha> blob <size>\n<bytes>\n"
            header_end = out.index(b"\n", pos)
            size = int(out[pos:header_end].split()[2])
            texts.append(out[header_end + 1 : header_end + 1 + size])
            pos = header_end + 1 + size + 1
        return texts

    def trees(self, rel: str, old: str) -> set[str]:
        """Syntax-tree digests (8 hex) of the versions of `rel` whose old text hash is `old`."""
        if rel not in self._seen:
            table: dict[str, set[str]] = {}
            texts = []
            f = self.pkg_dir / rel
            if f.is_file():
                texts.append(f.read_bytes())
            blobs = sorted(self._history().get(rel, ()))
            if blobs:
                try:
                    texts += self._read_blobs(blobs)
                except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                    pass
            for raw in texts:
                try:
                    table.setdefault(legacy_digest(raw), set()).add(codedeps.source_digest(raw)[:8])
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
            self._seen[rel] = table
        return self._seen[rel].get(old, set())


# ----------------------------------------------------------------------------- one root


def _code_now(sc: dict) -> tuple[str, dict[str, str]]:
    """(code, code_files) of this stage config's job with today's library."""
    parts = vfc.train_code_parts(sc) if sc["stage"] == "train" else ()
    return vfc.code_hash(sc["stage"], parts), vfc.code_files(sc["stage"], parts)


def _why_not_same_code(sc: dict, files_now: dict[str, str], versions: Versions) -> str | None:
    """None when the recorded code (old text hashes) is today's code up to formatting, comments and
    docstrings; else why not."""
    old = sc.get("code_files") or {}
    if not old:
        return "its stage config records no per-file code hashes"
    if combine(old) != sc.get("code"):
        return "its `code` is not made of its `code_files`"
    if set(old) != set(files_now):
        gone, new = sorted(set(old) - set(files_now)), sorted(set(files_now) - set(old))
        return f"its code is other files now (no longer: {gone}; new: {new})"
    changed = [rel for rel in sorted(old) if files_now[rel] not in versions.trees(rel, old[rel])]
    if changed:
        return "code changed (or its old version is not in git history): " + ", ".join(changed)
    return None


def _keep_mtime(path: Path, write) -> None:
    st = path.stat()
    write()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _restamp_output(comp: Path, old_id: str, new_id: str, run_id: str | None) -> bool:
    """Record new_id in the completion file (or its sidecar), keeping mtimes. False: it records
    neither id (made for another config, or missing)."""
    got = freshness.recorded_id(comp)
    if got == new_id:
        return True
    if got != old_id:
        return False
    side = freshness._sidecar(comp)
    if side.exists():  # the id is recorded beside the output (anchors.pt; `snakemake --touch`)
        rec = read_json(side)
        st = comp.stat()
        if [rec.get("inode"), rec.get("size")] == [st.st_ino, st.st_size]:
            rec["config_id"] = new_id
            atomic_write_text(side, json.dumps(rec) + "\n")
            return True
    rec = read_json(comp)
    rec["config_id"] = new_id
    if run_id is not None and "run_id" in rec:
        rec["run_id"] = run_id
    _keep_mtime(
        comp, lambda: atomic_write_text(comp, json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
    )
    return True


def restamp_root(root: str | Path, dry_run: bool = False, out=None) -> dict:
    """Re-stamp every stage config under {root}/configs whose job's code is unchanged but for the hash
    scheme (module doc). Returns {"restamped": [stage-config files], "current": [...], "left":
    {file: why it reruns}}."""
    root = Path(root)
    files = sorted(p for p in (root / "configs").glob("*/*.yaml") if p.parent.name in freshness.COMPLETION)
    configs: dict[Path, dict] = {}
    for p in files:
        sc = yaml.safe_load(p.read_text())
        if isinstance(sc, dict) and sc.get("stage") in freshness.COMPLETION and "code" in sc:
            configs[p] = sc
    by_id: dict[str, Path] = {config_id(sc): p for p, sc in configs.items()}
    versions = Versions(vfc.PKG_DIR)
    new: dict[Path, dict | None] = {}  # path -> re-stamped stage config (None: not re-stamped)
    why: dict[Path, str] = {}

    def restamped(p: Path, depth: int = 0) -> dict | None:
        if p in new:
            return new[p]
        new[p] = None  # a cycle cannot re-stamp
        sc = configs[p]
        code, files_now = _code_now(sc)
        if sc.get("code") != code:
            reason = _why_not_same_code(sc, files_now, versions)
            if reason:
                why[p] = reason
                return None
        inputs = {}
        for name, inp in (sc.get("inputs") or {}).items():
            up = by_id.get(inp.get("id"))
            up_sc = restamped(up, depth + 1) if up is not None and depth < 50 else None
            if up_sc is None:
                why[p] = f"input {name} ({inp.get('rule')}) " + (
                    f"is not re-stamped: {why.get(up, '?')}"
                    if up is not None
                    else "has no stage config under the root"
                )
                return None
            inputs[name] = {**inp, "id": config_id(up_sc)}
        sc2 = {**sc, "code": code, "code_files": dict(files_now), "inputs": inputs}
        if sc["stage"] == "train":
            sc2["run_id"] = vfc.run_id_of(sc2, sc["run_name"])
        new[p] = sc2
        return sc2

    report: dict = {"restamped": [], "current": [], "left": {}}
    for p, sc in configs.items():
        sc2 = restamped(p)
        if sc2 is None:
            report["left"][str(p)] = why.get(p, "?")
            continue
        old_id, new_id = config_id(sc), config_id(sc2)
        if old_id == new_id:
            report["current"].append(str(p))
            continue
        comp = freshness.completion_file(sc)
        if not comp.exists():
            report["left"][str(p)] = "no output yet"
            continue
        if freshness.recorded_id(comp) not in (old_id, new_id):
            report["left"][str(p)] = f"its output {comp} was made for another config"
            continue
        report["restamped"].append(str(p))
        if dry_run:
            continue
        if sc["stage"] == "train" and sc.get("run_id") != sc2["run_id"]:
            ck = Path(sc["out_dir"]) / "checkpoints"
            if (ck / sc["run_id"]).is_dir() and not (ck / sc2["run_id"]).exists():
                os.replace(ck / sc["run_id"], ck / sc2["run_id"])
        _restamp_output(comp, old_id, new_id, sc2.get("run_id"))
        _keep_mtime(p, lambda p=p, sc2=sc2: atomic_write_text(p, yaml.safe_dump(sc2, sort_keys=True)))
    if out is not None:
        verb = "would re-stamp" if dry_run else "re-stamped"
        print(
            f"vlaforget restamp: {verb} {len(report['restamped'])} finished job(s), "
            f"{len(report['current'])} already current, {len(report['left'])} left to rerun",
            file=out,
        )
        for f, reason in sorted(report["left"].items()):
            print(f"  reruns: {f}: {reason}", file=out)
    return report


def cleanup_command(files: list[str], profile: str | None) -> list[str]:
    """Snakemake's command that forgets its params record of the re-stamped stage-config files."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        *(["--profile", profile] if profile else []),
        "--cleanup-metadata",
        *files,
    ]


def add_args(p) -> None:
    p.add_argument("--root", required=True, help="the data root to re-stamp ({root}/configs, its outputs)")
    p.add_argument("--dry-run", action="store_true", help="say what would be re-stamped; write nothing")
    p.add_argument(
        "--profile",
        help="also run `snakemake --profile P --cleanup-metadata <re-stamped "
        "stage configs>` here (the repository of the study); without it the command is printed",
    )


def main(args) -> int:
    rep = restamp_root(args.root, dry_run=args.dry_run, out=sys.stdout)
    files = rep["restamped"]
    if args.dry_run or not files:
        return 0
    listing = Path(args.root) / "logs" / "restamped_configs.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(listing, "\n".join(files) + "\n")
    cmd = cleanup_command(files, args.profile)
    if args.profile:
        rc = subprocess.run(cmd).returncode
        if rc:
            print("vlaforget restamp: Snakemake had no record of the files it lists (nothing to forget for those; "
                  "any other error above is real)")
        return rc
    print(
        "Then, in the study's repository, so Snakemake forgets the old ids it recorded as params:\n"
        f"  {shlex.join(cmd[: -len(files)])} $(cat {shlex.quote(str(listing))})"
    )
    return 0
