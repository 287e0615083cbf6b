"""A stage's code hash is over the syntax tree (codedeps.canonical_code): formatting is not code.

- `ruff format` (here with a narrow line length and single quotes, so files really change) leaves every
  module's digest as it was;
- the digest is the same under every Python 3.10-3.13 found on this machine (PATH, pyenv), and equals
  the committed golden digests of a few fixed sources (a Python whose `ast` differs fails here in CI);
- docstrings and comments are not code; every other string, name and constant is.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlaforget import codedeps

PKG = Path(codedeps.__file__).resolve().parent

# Fixed sources and their digests, computed once (python 3.11); a Python whose `ast` gives another
# canonical form changes these, and every study's ids with it.
SOURCES = {
    "basic": '"""Module doc."""\nimport os\nfrom . import x as y\n\nX: int = 1  # c\n\n\ndef f(a, /, b=2, *c, d, '
    'e=None, **g):\n    """Doc."""\n    return a + b if c else {**g, "k": [i for i in c if i]}\n',
    "fstrings": 'n = 3\ns = f"{n!r:>10} {n=} {n:{n}.2f} {{x}}" u"plain", b"\\x00"\nt = (1e5, 0xFF, 1_000, 2j, ...)\n',
    "classes": '@dataclass(frozen=True)\nclass C(B, metaclass=M):\n    """Doc."""\n\n    x: list[int] = '
    "field(default_factory=list)\n\n    async def run(self):\n        async with a as b:\n"
    "            await b\n        return [y async for y in self]\n",
    "control": "def g(v):\n    global Z\n    while (n := len(v)) > 0:\n        try:\n            v = v[1:-1:2]\n"
    '        except (KeyError, ValueError) as e:\n            raise RuntimeError("x") from e\n'
    "        else:\n            continue\n        finally:\n            del v[0]\n"
    '    match v:\n        case [1, *rest] if rest:\n            pass\n        case {"k": k, **kw}:\n'
    "            pass\n        case Point(x=0) | None:\n            pass\n    return lambda *a, k=1: a\n",
}
GOLDEN = {
    "basic": "b99d39cf82553ec27aeeabd39dd419e4efbf9384db8925918bb389555dc47836",
    "fstrings": "47e179c8d0c37849d0e80cad4cdb0ae231ebde00cfba7893d1766578fd8cc97e",
    "classes": "ac8fd77067c19d16059f0ff87d61e860e496557123ca11db1a85c74c2bfc80df",
    "control": "5a1a14904b0d64dc5d3af557b0c3c63320ad96ee42b39391170cd4748a4dec89",
}


def _digests(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, src in SOURCES.items():
        f = tmp_path / f"{name}.py"
        f.write_text(src)
        out[name] = codedeps.code_digest(f)
    return out


def test_golden_digests_of_fixed_sources(tmp_path):
    assert _digests(tmp_path) == GOLDEN


def test_docstrings_and_comments_are_not_code_but_strings_are(tmp_path):
    def digest(src: str, name: str) -> str:
        f = tmp_path / f"{name}.py"
        f.write_text(src)
        return codedeps.code_digest(f)

    ref = digest('X = "# not a comment"\ndef f():\n    return "λ"\nclass C:\n    y = 1\n', "ref")
    same = digest(
        '"""Doc."""\n\nX = "# not a comment"  # a comment\n\n\ndef f():\n    """Doc\n    two lines."""\n'
        '    return \'λ\'  # λ\n\n\nclass C:\n    """D."""\n\n    y = (\n        1\n    )\n',
        "same",
    )
    assert same == ref
    for i, other in enumerate(
        [
            'X = "# not a comment!"\ndef f():\n    return "λ"\nclass C:\n    y = 1\n',
            'X = "# not a comment"\ndef f():\n    return "λ"\nclass C:\n    y = 1.0\n',
            'X = "# not a comment"\ndef f():\n    "λ"\nclass C:\n    y = 1\n',
            'X = "# not a comment"\ndef f():\n    return "λ"\nclass D:\n    y = 1\n',
        ]
    ):
        assert digest(other, f"other{i}") != ref, other


def _ruff() -> list[str]:
    try:
        subprocess.run([sys.executable, "-m", "ruff", "--version"], check=True, capture_output=True)
        return [sys.executable, "-m", "ruff"]
    except (subprocess.CalledProcessError, FileNotFoundError):
        exe = shutil.which("ruff")
        if exe is None:
            pytest.skip("ruff is not installed (pip install -e '.[dev]')")
        return [exe]


@pytest.fixture(scope="module")
def formatted(tmp_path_factory) -> Path:
    """A copy of the library reformatted by the installed ruff: line length 60 and single quotes, so
    the wrapping, parentheses, trailing commas and quotes of most files change (even once the tree is
    `make format`-clean)."""
    dest = tmp_path_factory.mktemp("fmt") / "vlaforget"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            *_ruff(),
            "format",
            "--quiet",
            "--no-cache",
            "--isolated",
            "--line-length",
            "60",
            "--config",
            "format.quote-style='single'",
            str(dest),
        ],
        check=True,
    )
    return dest


def test_ruff_format_changes_no_module_digest(formatted):
    files = sorted(p.relative_to(PKG) for p in PKG.rglob("*.py"))
    changed = [f for f in files if (formatted / f).read_text() != (PKG / f).read_text()]
    assert len(changed) > len(files) // 2, "the reformat should change most files' text"
    differ = [str(f) for f in files if codedeps.code_digest(formatted / f) != codedeps.code_digest(PKG / f)]
    assert differ == []


_LOADER = r"""
import importlib.util, json, sys
from pathlib import Path
# the package from its source folder (codedeps imports its stdlib-only siblings: errors, semantics),
# never an installed copy: the other Pythons have none
sys.path.insert(0, str(Path(sys.argv[1]).resolve().parent.parent))
import vlaforget.codedeps as m
roots = [Path(r) for r in sys.argv[2:]]
print(json.dumps({f"{i}:{f.relative_to(r)}": m.code_digest(f) for i, r in enumerate(roots) for f in sorted(r.rglob("*.py"))}))
"""


def other_pythons() -> dict[str, str]:
    """{'3.x': interpreter} of every Python 3.10-3.13 that runs here, this minor version excluded
    (PATH's python3.1x, then pyenv's versions: a pyenv shim of a version not selected fails to run)."""
    cands = [shutil.which(f"python3.{m}") for m in range(10, 14)]
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    cands += sorted(glob.glob(os.path.join(pyenv, "versions", "3.1[0-3]*", "bin", "python3")))
    found: dict[str, str] = {}
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for exe in filter(None, cands):
        try:
            v = subprocess.run(
                [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if v in ("3.10", "3.11", "3.12", "3.13") and v != here and v not in found:
            found[v] = exe
    return found


def test_the_digests_agree_under_every_python_found(formatted, tmp_path):
    others = other_pythons()
    if not others:
        pytest.skip("no other Python 3.10-3.13 on this machine (the golden digests still pin the format)")
    src_dir = tmp_path / "golden"
    src_dir.mkdir()
    for name, src in SOURCES.items():
        (src_dir / f"{name}.py").write_text(src)
    roots = [PKG, formatted, src_dir]
    want = json.loads(
        subprocess.run(
            [sys.executable, "-c", _LOADER, codedeps.__file__, *map(str, roots)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert len(want) > 100
    for v, exe in sorted(others.items()):
        got = json.loads(
            subprocess.run(
                [exe, "-c", _LOADER, codedeps.__file__, *map(str, roots)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert {k for k in want if got.get(k) != want[k]} == set(), f"python {v} ({exe})"
