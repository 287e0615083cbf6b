"""Training micro-batches for the loop: sample reads, image augmentation and tokenisation in
DataLoader worker processes (train.num_workers > 0; pinned memory, prefetch) or in the training
process (num_workers 0), with the same batches either way.

Order: the loop's StepSampler (seeded permutation per epoch, resumable). The workers run a copy of
it ahead of the loop (prefetch); the loop's own sampler is advanced only when a batch is consumed,
so a checkpoint records exactly the samples used. Augmentation of micro-batch k (k = samples drawn
so far // batch size, so also after a resume) draws from a generator seeded by (seed, k): no
generator state crosses processes, and the batch does not depend on which process built it.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing

import numpy as np
import torch

log = logging.getLogger("vlaforget.train")

PREFETCH_PER_WORKER = 4  # micro-batches each worker keeps ready


def micro_index(sampler, bsz: int) -> int:
    """How many micro-batches of `bsz` the sampler has handed out (from its resumable state)."""
    return (sampler.epoch * len(sampler._perm) + sampler.pos) // bsz


def aug_generator(seed: int, k: int) -> torch.Generator:
    s = int(np.random.SeedSequence([int(seed), 31, int(k)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(s)


class _MicroBatches(torch.utils.data.Dataset):
    """key (k, indices) -> the host half of the collated batch (backend.collate_host)."""

    def __init__(self, ds, backend, image_aug: bool, seed: int):
        self.ds, self.backend, self.image_aug, self.seed = ds, backend, bool(image_aug), int(seed)

    def __len__(self) -> int:  # keys come from the stream below, not from a range
        return len(self.ds)

    def __getitem__(self, key):
        k, idx = key
        samples = [self.ds[int(i)] for i in idx]
        gen = aug_generator(self.seed, k) if self.image_aug else None
        batch = self.backend.collate_host(samples, train=self.image_aug, generator=gen)
        batch["_k"] = torch.tensor(int(k))
        return batch


class _KeyStream(torch.utils.data.Sampler):
    """Endless (k, indices) keys from a copy of the loop's sampler state."""

    def __init__(self, sampler, bsz: int):
        self.sampler, self.bsz = copy.deepcopy(sampler), int(bsz)

    def __iter__(self):
        while True:
            k = micro_index(self.sampler, self.bsz)
            yield k, tuple(self.sampler.take(self.bsz))

    def __len__(self) -> int:
        return 2**62


class BatchSource:
    """`next()` -> the next training micro-batch on the model's device; advances `sampler`."""

    def __init__(
        self,
        ds,
        backend,
        sampler,
        bsz: int,
        seed: int,
        image_aug: bool,
        num_workers: int = 0,
        device: torch.device | None = None,
    ):
        self.backend, self.sampler, self.bsz = backend, sampler, int(bsz)
        self.data = _MicroBatches(ds, backend, image_aug, seed)
        self.num_workers = int(num_workers or 0)
        self._it = None
        if self.num_workers > 0:
            ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            loader = torch.utils.data.DataLoader(
                self.data,
                sampler=_KeyStream(sampler, bsz),
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=device is not None and device.type == "cuda",
                prefetch_factor=PREFETCH_PER_WORKER,
                multiprocessing_context=ctx,
            )
            self._it = iter(loader)

    def next(self) -> dict:
        k = micro_index(self.sampler, self.bsz)
        idx = self.sampler.take(self.bsz)  # the loop's authoritative position
        if self._it is None:
            host = self.data[(k, tuple(idx))]
        else:
            host = next(self._it)
            if int(host["_k"]) != k:  # the workers' copy of the order must match the loop's
                raise RuntimeError(f"DataLoader returned micro-batch {int(host['_k'])}, expected {k}")
        host.pop("_k")
        return self.backend.to_device(host)

    def close(self) -> None:
        if self._it is not None:
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._it = None
