"""Copy metaworld with only the assets the named tasks' scene XMLs reach (for a GPU machine's carry).

The GPU study's machine has no metaworld and a 64 MiB working-tree limit; metaworld 3.1.1 is 41 MB,
almost all of it meshes and textures of the 50 tasks. A task's env names its scene XML in
`model_name`; every file an XML reaches through `file=` attributes (includes, meshes, textures) is
kept, recursively (MuJoCo resolves them relative to the including file, or to a compiler
meshdir/texturedir). Everything else under assets/ is dropped; the Python package stays whole.
Usage: python bench/prune_metaworld.py OUTDIR task-v3 [task-v3 ...]
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import metaworld
from metaworld.env_dict import ALL_V3_ENVIRONMENTS


def reached(xml: Path, seen: set[Path], assets: Path) -> None:
    """Add xml and every file its `file=` attributes name, recursively. MuJoCo resolves a name
    against the including file's folder or the top model's meshdir/texturedir, so a name is matched
    as a path suffix of the files under assets/ (over-keeping a same-named file is harmless)."""
    if xml in seen:
        return
    seen.add(xml)
    if xml.suffix != ".xml":
        return
    for name in re.findall(r'\bfile="([^"]+)"', xml.read_text()):
        name = name.lstrip("./")
        hits = [f for f in assets.rglob(Path(name).name) if f.as_posix().endswith(name)]
        for f in hits:
            reached(f.resolve(), seen, assets)


def main(out: str, tasks: list[str]) -> None:
    pkg = Path(metaworld.__file__).parent
    assets = (pkg / "assets").resolve()
    keep: set[Path] = set()
    for t in tasks:
        env = ALL_V3_ENVIRONMENTS[t]
        reached(Path(env.model_name.fget(None)).resolve(), keep, assets)  # model_name reads no instance state
    dst = Path(out) / "metaworld"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(
        pkg,
        dst,
        ignore=lambda d, names: (
            [n for n in names if n == "__pycache__"]
            + (
                [n for n in names if (Path(d) / n).is_file() and (Path(d) / n).resolve() not in keep]
                if Path(d).resolve().is_relative_to(assets)
                else []
            )
        ),
    )
    n = sum(1 for _ in (dst / "assets").rglob("*") if _.is_file())
    print(f"kept {n} asset files of {sum(1 for _ in assets.rglob('*') if _.is_file())} for {tasks}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
