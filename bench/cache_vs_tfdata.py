"""Random-batch read throughput: the training cache (memmap) vs tf.data over the same RLDS.

The cache draws uniformly random transitions (`CachedDataset[i]`, what the training loop's sampler
does). tf.data cannot index, so it does what openvla's loader does: flatten episodes to steps,
decode JPEG, shuffle through a buffer, batch. Both produce batches of images + actions.

    .venv/bin/python bench/cache_vs_tfdata.py \
        --rlds /opt/data/private/vlaforget/datasets/rlds/mw_upstream \
        --cache /opt/data/private/vlaforget/datasets/cache/mw_upstream
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def bench_cache(cache_dir: str, batch: int, batches: int, seed: int = 0) -> dict:
    from vlaforget.data.cache import CachedDataset

    t0 = time.perf_counter()
    ds = CachedDataset(cache_dir, split="all")
    t_open = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    first = None
    for _b in range(batches):
        idx = rng.integers(0, len(ds), size=batch)
        items = [ds[int(i)] for i in idx]
        images = np.stack([x["image"] for x in items])
        actions = np.stack([x["action"] for x in items])
        assert images.shape[0] == actions.shape[0] == batch
        if first is None:
            first = time.perf_counter() - t0
    dt = time.perf_counter() - t0
    return {
        "reader": "cache (memmap)",
        "open_s": t_open,
        "first_batch_s": first,
        "samples_per_s": batch * batches / dt,
        "seconds": dt,
    }


def bench_tfdata(rlds_dir: str, batch: int, batches: int, shuffle_buffer: int, seed: int = 0) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    from vlaforget.data.rlds import load_tensorflow, resolve_builder_dir

    tf = load_tensorflow()
    import tensorflow_datasets as tfds

    tf.config.threading.set_inter_op_parallelism_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tf.config.threading.set_intra_op_parallelism_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    builder = tfds.builder_from_directory(str(resolve_builder_dir(rlds_dir)))
    ds = builder.as_dataset(split="train", shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.flat_map(lambda ep: ep["steps"])
    ds = ds.map(lambda s: {"image": s["observation"]["image"], "action": s["action"]})
    ds = ds.repeat().shuffle(shuffle_buffer, seed=seed).batch(batch).prefetch(2)
    t_open = time.perf_counter() - t0
    it = iter(ds)
    t0 = time.perf_counter()
    next(it)  # fills the shuffle buffer
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        images, actions = b["image"].numpy(), b["action"].numpy()
        assert images.shape[0] == actions.shape[0] == batch
    dt = time.perf_counter() - t0
    return {
        "reader": f"tf.data (shuffle buffer {shuffle_buffer})",
        "open_s": t_open,
        "first_batch_s": first,
        "samples_per_s": batch * batches / dt,
        "seconds": dt,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rlds", required=True, help="TFDS builder dir (or its parent)")
    p.add_argument("--cache", required=True, help="cache dir built from the same RLDS")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--shuffle-buffer", type=int, default=5000)
    args = p.parse_args()
    rows = [
        bench_cache(args.cache, args.batch, args.batches),
        bench_tfdata(args.rlds, args.batch, args.batches, args.shuffle_buffer),
    ]
    print(
        f"batch {args.batch}, {args.batches} batches, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| reader | open + import [s] | first batch [s] | samples/s (steady) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['reader']} | {r['open_s']:.2f} | {r['first_batch_s']:.3f} | {r['samples_per_s']:.0f} |")


if __name__ == "__main__":
    main()
