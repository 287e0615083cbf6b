"""torchrun --standalone support: one process per GPU, DDP over k GPUs; single process otherwise."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # rank 0 alone runs the periodic evaluation while the others wait in a broadcast: allow
        # that long (VLAFORGET_DDP_TIMEOUT_MIN, default 60 min; NCCL's own default is 10)
        timeout = datetime.timedelta(minutes=float(os.environ.get("VLAFORGET_DDP_TIMEOUT_MIN", "60")))
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def cleanup_distributed(d: DistInfo) -> None:
    if d.world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def world_size() -> int:
    """Ranks of the running process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def unwrap(model):
    """The module inside DDP (for work one rank does alone: a DDP forward may broadcast buffers,
    a collective the other ranks would never join)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _device() -> torch.device:
    # NCCL needs CUDA tensors; gloo takes CPU ones
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_floats(values, src: int = 0) -> list[float]:
    """Rank src's float64 values on every rank (identity without a process group): a value one rank
    computes (a drift measurement, an evaluation score) is then the same to the bit everywhere."""
    values = [float(v) for v in values]
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.broadcast(t, src=src)
    return [float(v) for v in t.cpu()]


def on_main(fn, n: int = 1) -> list[float]:
    """fn() (-> n floats) run on rank 0 only; its result broadcast to every rank."""
    vals = [float(v) for v in fn()] if rank() == 0 else [0.0] * n
    if len(vals) != n:
        raise ValueError(f"on_main: expected {n} values, got {len(vals)}")
    return broadcast_floats(vals)


def all_reduce_flat(tensors, average: bool = False):
    """All-reduce a list of tensors (None kept) with one collective over a flat float32 buffer;
    returns new tensors in the input dtypes. Sum, or mean with average=True."""
    n = world_size()
    if n == 1:
        return list(tensors)
    live = [t for t in tensors if t is not None]
    if not live:
        return list(tensors)
    dev = _device()
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float32) for t in live])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    if average:
        flat /= n
    out, pieces = [], iter(torch.split(flat, [t.numel() for t in live]))
    for t in tensors:
        out.append(None if t is None else next(pieces).view_as(t).to(device=t.device, dtype=t.dtype))
    return out
