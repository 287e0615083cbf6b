"""GPU slots for local runs (`vlaforget gpu-run --gpus N -- CMD ...`): lock files, CUDA_VISIBLE_DEVICES.

Snakemake counts `resources: gpu=N` but never says *which* GPUs a job gets. This allocator holds one
fcntl lock file per GPU under `{root}/locks/gpus/` (a local disk: flock on NFS is unreliable; override
with VLAFORGET_GPU_LOCK_DIR), takes N distinct free ids all at once, sets CUDA_VISIBLE_DEVICES and
execs the command. The locks are inherited by the command and released by the kernel when it and every
child holding them exit, crash or get killed, so a slot is never leaked. Children that do not inherit
the descriptor (torchrun's workers: subprocess closes fds) still keep the slot: each job carries a
token in its environment (VLAFORGET_GPU_JOB, inherited by every descendant) that is also written in
its lock files, and a slot whose lock is free is still busy while any process on this host has that
token. Under SLURM (SLURM_JOB_ID set) the scheduler has already chosen the GPUs and this is a plain
exec; so it is with N = 0.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError
from .paths import resolve_root


class GpuAllocationError(UserError, RuntimeError):
    """No GPU slot could be allocated; the message names the locks / devices."""


def visible_gpus() -> list[str]:
    """GPU ids this machine offers: VLAFORGET_NUM_GPUS (tests), CUDA_VISIBLE_DEVICES, nvidia-smi."""
    n = os.environ.get("VLAFORGET_NUM_GPUS")
    if n is not None:
        return [str(i) for i in range(int(n))]
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip():
        return [x.strip() for x in cvd.split(",") if x.strip()]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if out.returncode == 0:
                return [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return []


def pick_device(requested: str | None = None) -> str:
    """The torch device a stage runs on: the requested one (`--device`), else cuda if torch sees a
    GPU, else cpu."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lock_dir(root: str | Path | None = None) -> Path:
    env = os.environ.get("VLAFORGET_GPU_LOCK_DIR")
    d = Path(env) if env else Path(root or resolve_root()) / "locks" / "gpus"
    d.mkdir(parents=True, exist_ok=True)
    return d


JOB_ENV = "VLAFORGET_GPU_JOB"


def job_alive(token: str, proc: Path = Path("/proc")) -> int | None:
    """pid of a live process on this host whose environment carries the job token, else None."""
    needle = f"{JOB_ENV}={token}\0".encode()
    me = os.getpid()
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes() + b"\0"
        except OSError:  # gone, or another user's process
            continue
        if env.startswith(needle) or b"\0" + needle in env:
            try:
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":  # a zombie holds no GPU
                return int(d.name)
    return None


def _holder_token(fd: int) -> str | None:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    for part in text.split():
        if part.startswith("job="):
            tok = part[4:]
            host = tok.split(":", 1)[0]
            return tok if host == socket.gethostname() else None
    return None


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    tok = _holder_token(fd)
    if tok and job_alive(tok) is not None:  # the launcher died but a worker of its job still runs
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return None
    return fd


def try_acquire(k: int, ids: list[str], locks: Path) -> dict[str, int] | None:
    """k distinct free GPU ids with their held lock fds, or None (nothing held) if fewer are free."""
    # One allocation at a time, so two jobs never each grab half of what both need.
    guard = os.open(locks / ".alloc", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(guard, fcntl.LOCK_EX)
    try:
        held: dict[str, int] = {}
        for gid in ids:
            fd = _try_lock(locks / f"gpu{gid}.lock")
            if fd is not None:
                held[gid] = fd
                if len(held) == k:
                    return held
        release(held)
        return None
    finally:
        fcntl.flock(guard, fcntl.LOCK_UN)
        os.close(guard)


def release(held: dict[str, int]) -> None:
    for fd in held.values():
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    held.clear()


def acquire(
    k: int,
    ids: list[str] | None = None,
    locks: Path | None = None,
    timeout: float | None = None,
    poll: float = 2.0,
    out=sys.stderr,
    token: str | None = None,
) -> dict[str, int]:
    """Wait until k GPUs are free and hold them. Raises GpuAllocationError if k > visible or on timeout."""
    ids = visible_gpus() if ids is None else ids
    locks = locks or lock_dir()
    if k > len(ids):
        raise GpuAllocationError(
            f"a job asks for {k} GPU(s) but this machine shows {len(ids)} ({', '.join(ids) or 'none'}). "
            f"Lower resources.*_gpus / train.nproc in the config, or cap the profile's `resources: gpu=`."
        )
    start = time.monotonic()
    told = False
    while True:
        held = try_acquire(k, ids, locks)
        if held is not None:
            token = token or new_token()
            for gid, fd in held.items():
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid={os.getpid()} gpu={gid} job={token}\n".encode(), 0)
            return held
        if timeout is not None and time.monotonic() - start >= timeout:
            raise GpuAllocationError(
                f"no {k} free GPU(s) among {ids} after {timeout:g} s "
                f"(locks in {locks}; a stale holder? check `nvidia-smi`)"
            )
        if not told:
            print(f"[gpu-run] waiting for {k} free GPU(s) among {ids} (locks in {locks})", file=out)
            told = True
        time.sleep(poll)


def new_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def add_args(p) -> None:
    p.add_argument("--gpus", type=int, required=True, help="GPUs this command needs (0 = run as is)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between tries while waiting")
    p.add_argument("cmd", nargs="+", help="the command, after --")


def main(args) -> int:
    cmd = [c for c in args.cmd]
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise GpuAllocationError("gpu-run: no command given (vlaforget gpu-run --gpus N -- CMD ...)")
    if args.gpus > 0 and not os.environ.get("SLURM_JOB_ID"):
        token = new_token()
        held = acquire(args.gpus, timeout=args.timeout, poll=args.poll, token=token)
        os.environ[JOB_ENV] = token  # every process of the job inherits it, torchrun workers included
        for fd in held.values():
            os.set_inheritable(fd, True)  # the command (and its children) keep holding the slots
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(held)
        print(f"[gpu-run] CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)
    return 127  # not reached
