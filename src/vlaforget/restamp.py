"""The code hash of before issue 30, kept to recognise it: `vlaforget migrate-root` carries a data root
over the once-only change of code hashes with it (migrate._code_changes).

Stage configs record a `code` hash and its per-file parts (`code_files`). They were hashes of each
module's text without comments and docstrings (`legacy_source`); they are now hashes of its syntax
tree (codedeps.canonical_code), so formatting is not code. The change gives every stage config a new
id. A file's old hash is accepted as today's code when some version of the file with that old text
hash — today's file, or one in the history of the git repository holding the package — has today's
syntax tree (`formatting_only`): a root made before `make format` (or any edit of comments,
docstrings or layout) moves over without rerunning; a real code edit still reruns its jobs.
docs/DEVELOPMENT.md, docs/troubleshooting.md ("migrate-root").
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import tokenize
from pathlib import Path

from . import codedeps

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


def formatting_only(rel: str, old_digest: str, new_digest: str, versions: Versions) -> bool:
    """Whether a file whose old stage config recorded `old_digest` (the text hash of before issue 30)
    is today's file up to formatting, comments and docstrings: some version of it with that text hash
    (today's file or one in git history) has today's syntax tree (`new_digest`, code_files' entry)."""
    return new_digest[:8] in versions.trees(rel, old_digest)
