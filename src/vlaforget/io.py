"""Small shared helpers: atomic writes, hashes, provenance, seeding, logging."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

log = logging.getLogger("vlaforget")


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it; guarded against threads)."""
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """The one temp-file-then-replace: yields a fresh temporary path next to `path` (same
    filesystem; `suffix` for writers that pick the format from the name, e.g. ".mp4", ".png"). When
    the block ends normally the file takes `path`'s place in one rename, with the permissions a file
    written in place would get (0666 & ~umask: mkstemp's 0600 would hide tables, evals and
    checkpoints from a group sharing the data root); on any error it is removed and `path` is
    untouched. Readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Put the finished folder tmp at out. A reader sees the old folder, none, or the new one,
    never a half-written one (renames within one filesystem)."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import io as _io

    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# The files of a PEFT adapter folder a run reads when it starts from it (train.init_adapter): the
# adapter's config and weights, and the user's optimizer state (finetune.py's trainer_state.pt).
INIT_ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "trainer_state.pt",
)
_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def adapter_hashes(directory: str | Path) -> dict[str, str]:
    """{file: sha256} of the INIT_ADAPTER_FILES present in a PEFT adapter folder (hashed once per
    process while a file's size and mtime stay): what a run starting from it records in its id."""
    out = {}
    for name in INIT_ADAPTER_FILES:
        p = Path(directory) / name
        if not p.is_file():
            continue
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _FILE_HASHES:
            _FILE_HASHES[key] = sha256_file(p)
        out[name] = _FILE_HASHES[key]
    return out


def sha256_tensor(t) -> str:
    """Hash of a tensor's dtype, shape and bytes (CPU, contiguous)."""
    a = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{a.dtype}{tuple(a.shape)}".encode())
    h.update(a.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def relocatable(obj: Any, root: str | None, allowed_root: str | None = None) -> Any:
    """obj with every string under `root` / `allowed_root` written as `{root}/...` / `{allowed_root}/...`,
    so an id computed from it does not change when the data root moves."""
    subs = [(r.rstrip("/"), tag) for r, tag in ((root, "{root}"), (allowed_root, "{allowed_root}")) if r]

    def sub(x):
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [sub(v) for v in x]
        if isinstance(x, str):
            for r, tag in subs:
                if x == r or x.startswith(r + "/"):
                    return tag + x[len(r) :]
        return x

    return sub(obj)


def fill_root(obj: Any, root: str) -> Any:
    """The inverse of relocatable for the data root: `{root}/...` -> `<root>/...`."""
    if isinstance(obj, dict):
        return {k: fill_root(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill_root(v, root) for v in obj]
    if isinstance(obj, str) and (obj == "{root}" or obj.startswith("{root}/")):
        return root + obj[len("{root}") :]
    return obj


# Keys of a stage config that say where it runs, not what it computes (left out of its id). Its own
# output path contains its id (stageconfig.stage_config), so the id is taken with that path written `{out}`.
LOCATION_KEYS = ("root", "allowed_root", "run_id", "config_id", "out_dir", "out_file", "ckpt_dir")
OUT_TAG = "{out}"


def own_output(sc: dict) -> str | None:
    """The stage job's own output path (folder or file): it contains the job's config id."""
    return sc.get("out_dir") or sc.get("out_file")


def relocate_own_output(obj: Any, out: str | None) -> Any:
    """obj with the job's own output path written as `{out}` (the path holds the id being computed)."""
    if not out:
        return obj
    out = out.rstrip("/")

    def sub(x):
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [sub(v) for v in x]
        if isinstance(x, str) and (x == out or x.startswith(out + "/")):
            return OUT_TAG + x[len(out) :]
        return x

    return sub(obj)


def config_id(sc: dict, n: int = 12) -> str:
    """Identity of a stage config: its content with the data root factored out (a moved root keeps
    every id), including the ids of the inputs it expects (so a changed input changes it too), and
    without the keys that cannot change a result (semantics.NON_SEMANTIC)."""
    from .semantics import semantic_view  # without the keys that cannot change a result

    body = semantic_view({k: v for k, v in sc.items() if k not in LOCATION_KEYS})
    body = relocate_own_output(body, own_output(sc))
    return stable_hash(relocatable(body, sc.get("root"), sc.get("allowed_root")), n=n)


def stable_hash(obj: Any, n: int = 8) -> str:
    """Short hash of a JSON-able object, independent of key order."""
    s = json.dumps(obj, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(s.encode()).hexdigest()[:n]


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("vlaforget", "torch", "transformers", "peft", "tokenizers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def provenance() -> dict[str, Any]:
    return {"versions": versions(), "git_commit": git_commit()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def progress(iterable=None, total=None, desc: str = "", **kw):
    """tqdm progress bar on stderr; quiet when VLAFORGET_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = os.environ.get("VLAFORGET_NO_PROGRESS") == "1"
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=disable,
        dynamic_ncols=True,
        mininterval=2.0,
        file=sys.stderr,
        **kw,
    )


# ----------------------------------------------------------------------------- one owner per output


class LockedError(UserError, RuntimeError):
    """Another live process holds the lock of a run directory / output."""


class DirLock:
    """An exclusive fcntl lock on `{path}` (a file), held for the life of this object or process.

    The kernel drops it when the holder exits, crashes or is killed -9, so a lock is never stale;
    the file only records who held it last (host, pid, start time) for the message a second
    process gets."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> "DirLock":  # noqa: UP037 (quotes kept: unquoting changes every code hash)
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise LockedError(
                f"{self.what} is in use by another live process ({holder}; lock {self.path}). Two "
                f"drivers (or a driver and an orphaned trainer) must not write one run. Wait for it, "
                f"or stop it (`kill <pid>` on that host) and rerun; the lock is released the moment "
                f"that process ends, so there is nothing to delete."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"host={socket.gethostname()} pid={os.getpid()} "
            f"since={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(),
            0,
        )
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- verified inputs


class CorruptInputError(UserError, RuntimeError):
    """A file a stage reads does not match the size / sha256 recorded when it was made."""


def rebuild_hint(directory: str | Path, rule: str) -> str:
    """The fix a CorruptInputError names: delete the artifact's folder and rerun the rule that made it."""
    return (
        f"rebuild it: delete {directory} and rerun the '{rule}' rule (snakemake --forcerun {rule} "
        f"...), or `vlaforget {rule.replace('_', '-')} --config <its stage config>`"
    )


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def verify_files(
    directory: str | Path,
    hashes: dict[str, str],
    *,
    rule: str,
    sizes: dict[str, int] | None = None,
    hash_fn=None,
    trust_mtime: bool = True,
) -> None:
    """Check files of an artifact against its manifest: size always (when recorded), sha256 once per
    process and again whenever a file's size or mtime changed; `trust_mtime=False` (small artifacts:
    ICSM bases, adapters) hashes every time, so bytes changed with the mtime put back are caught too.
    Raises CorruptInputError naming the file and the rule that rebuilds it."""
    directory = Path(directory)
    hash_fn = hash_fn or sha256_file
    memo_file = directory / ".verified.json"  # name -> [size, mtime_ns, sha256] of files hashed before
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    changed = False
    for name, want in hashes.items():
        p = directory / name
        fix = rebuild_hint(directory, rule)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise CorruptInputError(f"{p} is missing although its manifest lists it; {fix}") from None
        if sizes and name in sizes and st.st_size != int(sizes[name]):
            raise CorruptInputError(
                f"{p} has {st.st_size} bytes but was written with {sizes[name]} "
                f"(truncated or overwritten); {fix}"
            )
        key = (str(p), st.st_size, st.st_mtime_ns)
        got = _VERIFIED.get(key) if trust_mtime else None
        remembered = memo.get(name, [None, None, None])
        if got is None and trust_mtime and remembered[:2] == [st.st_size, st.st_mtime_ns]:
            got = remembered[2]
        if got is None:
            got = hash_fn(p)
            memo[name] = [st.st_size, st.st_mtime_ns, got]
            changed = True
        _VERIFIED[key] = got
        if got != want:
            raise CorruptInputError(
                f"{p} does not match the sha256 recorded when it was made "
                f"({got[:12]}… vs {want[:12]}…): it was changed or corrupted; {fix}"
            )
    if changed:
        try:
            atomic_write_text(memo_file, json.dumps(memo, sort_keys=True))
        except OSError:
            pass  # a read-only artifact is checked again next time
