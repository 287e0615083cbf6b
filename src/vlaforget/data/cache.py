"""Stage `cache`: an RLDS/TFDS dataset -> a compact random-access cache training reads without TF.

Cache dir layout (all arrays row-aligned over transitions, episodes contiguous in source order):
  images.u8          raw uint8 [N, S, S, 3] (memmap; resized to `image_size`, otherwise untouched:
                     LIBERO's 180°-rotated images stay rotated, the model/eval code owns transforms)
  actions.npy        f32 [N, A] the dataset's action transform applied (data/transforms.py: LIBERO's
                     gripper becomes 1 = open, 0 = close, as openvla trains on it)
  states.npy  f32 [N, P]      env_states.npy f32 [N, E] (if present)
  episodes.json      [{index, task, instruction, start, length, seed}] in source order
  instructions.json  the distinct instruction strings
  dataset_statistics.json   openvla format, over the transformed actions of ALL episodes (openvla
                     computes them over split "all"; the held-out episodes are included)
  manifest.json      shapes, counts, split (`heldout` mode + `heldout_episodes`), transform, file hashes,
                     per-block hashes (`blocks`), versions (written last: the completion file)

`CachedDataset` opens it with memmaps: RAM does not grow with the dataset. Integrity: the manifest's
`blocks` holds the sha256 of every block of `block_rows` rows of each row-aligned array (images.u8,
actions.npy, states.npy, env_states.npy); a block is hashed and compared the first time a row of it is
read in a process, so flipped bytes are caught whatever the file's mtime, at the cost of hashing what
is read anyway (a whole-file hash of a many-GB images.u8 at every stage start would not be).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import resize_lanczos
from ..io import (
    CorruptInputError,
    log,
    progress,
    provenance,
    read_json,
    rebuild_hint,
    sha256_file,
    write_json,
)
from .statistics import dataset_statistics
from .transforms import resolve_transform

# 2: actions transformed per dataset (LIBERO gripper 1 = open), statistics over all episodes.
# 3: the held-out episodes are recorded in the manifest (data.heldout: per_task by default).
# Older caches: CachedDataset refuses them (rebuild).
CACHE_FORMAT = 3
HELDOUT_MODES = ("per_task", "tail")
IMAGES_FILE = "images.u8"
# Rows per hashed block: 64 rows of LIBERO's 256x256x3 images = 12 MiB, of 224x224x3 = 9.2 MiB.
BLOCK_ROWS = 64
# The row-aligned arrays: file -> key of manifest["shapes"]
ROW_FILES = {
    IMAGES_FILE: "images",
    "actions.npy": "actions",
    "states.npy": "states",
    "env_states.npy": "env_states",
}


class BlockHasher:
    """sha256 of every block of `block_rows` rows of a row-major byte stream fed in any chunks."""

    def __init__(self, row_bytes: int, block_rows: int = BLOCK_ROWS):
        self.block_bytes = int(row_bytes) * int(block_rows)
        self.digests: list[str] = []
        self._h = hashlib.sha256()
        self._filled = 0

    def update(self, data) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), self.block_bytes - self._filled)
            self._h.update(mv[:take])
            self._filled += take
            mv = mv[take:]
            if self._filled == self.block_bytes:
                self.digests.append(self._h.hexdigest())
                self._h, self._filled = hashlib.sha256(), 0

    def finish(self) -> list[str]:
        if self._filled:
            self.digests.append(self._h.hexdigest())
            self._h, self._filled = hashlib.sha256(), 0
        return self.digests


def block_digests(array: np.ndarray, block_rows: int = BLOCK_ROWS) -> list[str]:
    """sha256 of each block of `block_rows` rows of a C-contiguous array (the last block may be short)."""
    a = np.ascontiguousarray(array)
    return [hashlib.sha256(a[r : r + block_rows]).hexdigest() for r in range(0, len(a), block_rows)]


def n_train_episodes(n_episodes: int, train_split: float) -> int:
    """openvla's `train[:95%]`: the first round(train_split * n) episodes, at least one."""
    if not 0 < train_split <= 1:
        raise ValueError(f"data.train_split = {train_split}: give a fraction in (0, 1]")
    return max(1, min(n_episodes, round(train_split * n_episodes)))


def n_heldout_of_task(n_task: int, train_split: float) -> int:
    """Held-out episodes of one task under data.heldout: per_task: max(1, round((1 - train_split) * n)),
    none when train_split = 1, and never the task's last train episode (a 1-episode task stays train)."""
    if not 0 < train_split <= 1:
        raise ValueError(f"data.train_split = {train_split}: give a fraction in (0, 1]")
    if train_split == 1 or n_task < 2:
        return 0
    return min(n_task - 1, max(1, round((1 - train_split) * n_task)))


def heldout_split(episodes: list[dict], train_split: float, mode: str = "per_task") -> dict[str, Any]:
    """Which episodes (positions in source order) are held out.

    per_task: the last n_heldout_of_task(n_task) episodes of EACH task (LIBERO's RLDS stores episodes
    task by task, so the tail would hold out one or two tasks only); tail: openvla's train[:95%], the
    episodes after the first n_train_episodes. per_task without task info (an episode whose task is
    empty/None) falls back to tail, with the reason in `note`.
    Returns {mode (requested), used, heldout_episodes [sorted positions], note}."""
    if mode not in HELDOUT_MODES:
        raise ValueError(f"data.heldout = {mode!r}: use one of {', '.join(HELDOUT_MODES)}")
    n = len(episodes)
    note = None
    used = mode
    if mode == "per_task" and any(not e.get("task") for e in episodes):
        used = "tail"
        note = "episodes carry no task: held out the tail (openvla's train[:95%]) instead of per task"
    if used == "tail":
        held = list(range(n_train_episodes(n, train_split), n)) if n else []
    else:
        by_task: dict[str, list[int]] = {}
        for pos, e in enumerate(episodes):
            by_task.setdefault(e["task"], []).append(pos)
        held = []
        for pos in by_task.values():
            k = n_heldout_of_task(len(pos), train_split)
            held += pos[len(pos) - k :] if k else []
        held.sort()
        single = sorted(t for t, pos in by_task.items() if len(pos) < 2)
        if single and train_split < 1:
            note = f"tasks with a single episode keep it for training (none held out): {single}"
    return {"mode": mode, "used": used, "heldout_episodes": held, "note": note}


def split_episodes(manifest: dict, episodes: list[dict], split: str) -> list[dict]:
    """The episodes of `split` (train / heldout / all) of a cache, in source order, from its manifest."""
    if split == "all":
        return list(episodes)
    held = set(manifest["heldout_episodes"])
    if split == "heldout":
        return [e for i, e in enumerate(episodes) if i in held]
    if split == "train":
        return [e for i, e in enumerate(episodes) if i not in held]
    raise ValueError(f"split '{split}': use train, heldout or all")


def build_cache(
    rlds_dir: str | Path,
    out_dir: str | Path,
    name: str,
    image_size: int,
    train_split: float = 0.95,
    image_key: str = "observation/image",
    state_key: str = "observation/state",
    extra: dict | None = None,
    transform: str | None = None,
    heldout: str = "per_task",
) -> dict[str, Any]:
    """Read every episode of the TFDS builder dir `rlds_dir` once and write the cache.

    `transform`: the action transform's name (data/transforms.py); None = the registry's entry for
    `name` (an unregistered dataset is an error, raised before anything is read)."""
    from .rlds import builder_info, iter_episodes, resolve_builder_dir

    resolve_transform(name, transform)
    if heldout not in HELDOUT_MODES:
        raise ValueError(f"data.heldout = {heldout!r}: use one of {', '.join(HELDOUT_MODES)}")
    bdir = resolve_builder_dir(rlds_dir)
    info = builder_info(bdir)
    episodes = progress(
        iter_episodes(bdir, image_key, state_key), total=info["episodes"], desc=f"cache {name}", unit="ep"
    )
    meta = {"source": str(bdir), "source_info": info, "image_key": image_key, "state_key": state_key}
    done = bdir.parent / "done.json"  # our generated datasets: how the frames were rendered
    if done.exists():
        d = read_json(done)
        meta["simulator"] = {k: d.get(k) for k in ("camera", "render_size", "max_steps", "seed")}
    return write_cache(
        episodes,
        out_dir,
        name,
        image_size,
        train_split,
        extra={**meta, **(extra or {})},
        transform=transform,
        heldout=heldout,
    )


def write_cache(
    episodes: Iterable[dict[str, Any]],
    out_dir: str | Path,
    name: str,
    image_size: int,
    train_split: float = 0.95,
    extra: dict | None = None,
    transform: str | None = None,
    heldout: str = "per_task",
    block_rows: int = BLOCK_ROWS,
) -> dict[str, Any]:
    """Write the cache from episode dicts (as rlds.iter_episodes yields: images, states, actions,
    env_states or None, instruction, task, seed); returns the manifest. Needs no TensorFlow.

    Actions are stored after the dataset's action transform (`transform` names it, else the
    registry's entry for `name`; see data/transforms.py), and the statistics are computed over the
    transformed actions of all episodes, as openvla does. `heldout`: which episodes are held out
    (heldout_split: per_task, or tail = openvla's train[:95%]); recorded in the manifest.
    `block_rows`: rows per hashed block (the manifest's `blocks`, verified as rows are read)."""
    t0 = time.time()
    action_transform = resolve_transform(name, transform)
    if heldout not in HELDOUT_MODES:
        raise ValueError(f"data.heldout = {heldout!r}: use one of {', '.join(HELDOUT_MODES)}")
    out_dir = Path(out_dir)
    tmp = out_dir / ".build.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    img_hash = hashlib.sha256()
    img_blocks = BlockHasher(image_size * image_size * 3, block_rows)
    actions, states, env_states, eps = [], [], [], []
    instructions: dict[str, int] = {}
    src_shape = None
    n = 0
    with open(tmp / IMAGES_FILE, "wb") as f:
        for ep in episodes:
            imgs = np.asarray(ep["images"], np.uint8)
            src_shape = src_shape or list(imgs.shape[1:])
            block = np.stack([resize_lanczos(im, image_size) for im in imgs]).astype(np.uint8)
            data = np.ascontiguousarray(block).tobytes()
            f.write(data)
            img_hash.update(data)
            img_blocks.update(data)
            actions.append(action_transform(np.asarray(ep["actions"], np.float32)))
            states.append(np.asarray(ep["states"], np.float32))
            if ep.get("env_states") is not None:
                env_states.append(np.asarray(ep["env_states"], np.float32))
            instructions.setdefault(ep["instruction"], len(instructions))
            T = len(ep["actions"])
            if not (len(imgs) == len(ep["states"]) == T):
                raise ValueError(
                    f"episode {len(eps)} of {name}: {len(imgs)} images, {len(ep['states'])} "
                    f"states, {T} actions; every step needs all three"
                )
            eps.append(
                {
                    "index": len(eps),
                    "task": ep.get("task") or "",  # "" = no task info (data.heldout falls back to tail)
                    "instruction": ep["instruction"],
                    "start": n,
                    "length": T,
                    "seed": int(ep.get("seed", -1)),
                }
            )
            n += T
    if not eps:
        shutil.rmtree(tmp)
        raise RuntimeError(
            f"dataset {name} holds no episodes: regenerate it (demos stage) or fix data.rlds_dir"
        )
    A = np.concatenate(actions)
    P = np.concatenate(states)
    np.save(tmp / "actions.npy", A)
    np.save(tmp / "states.npy", P)
    has_env = len(env_states) == len(eps)
    if has_env:
        np.save(tmp / "env_states.npy", np.concatenate(env_states))
    write_json(tmp / "episodes.json", eps)
    write_json(tmp / "instructions.json", list(instructions))

    hsplit = heldout_split(eps, train_split, heldout)
    held = set(hsplit["heldout_episodes"])
    n_train = len(eps) - len(held)
    # openvla: statistics over split "all" (every episode, held-out ones included), after the transform
    stats = {name: dataset_statistics(A, P, len(eps))}

    files = {IMAGES_FILE: img_hash.hexdigest()}
    for fn in ("actions.npy", "states.npy", "env_states.npy", "episodes.json", "instructions.json"):
        if (tmp / fn).exists():
            files[fn] = sha256_file(tmp / fn)
    blocks = {IMAGES_FILE: img_blocks.finish(), "actions.npy": block_digests(A, block_rows)}
    blocks["states.npy"] = block_digests(P, block_rows)
    if has_env:
        blocks["env_states.npy"] = block_digests(np.load(tmp / "env_states.npy", mmap_mode="r"), block_rows)
    tasks = sorted({e["task"] for e in eps})
    manifest = {
        "format": CACHE_FORMAT,
        "name": name,
        "source_image_shape": src_shape,
        "image_size": image_size,
        "num_episodes": len(eps),
        "num_transitions": n,
        "num_train_episodes": n_train,
        "train_split": train_split,
        "heldout": hsplit["mode"],
        "heldout_used": hsplit["used"],
        "heldout_note": hsplit["note"],
        "heldout_episodes": hsplit["heldout_episodes"],
        "heldout_tasks": sorted({eps[i]["task"] for i in held}),
        "action_transform": action_transform.describe(),
        "statistics_episodes": "all",
        "tasks": tasks,
        "episodes_per_task": {t: sum(e["task"] == t for e in eps) for t in tasks},
        "shapes": {
            "images": [n, image_size, image_size, 3],
            "actions": list(A.shape),
            "states": list(P.shape),
            "env_states": [n, env_states[0].shape[1]] if has_env else None,
        },
        "dtypes": {
            "images": "uint8",
            "actions": "float32",
            "states": "float32",
            "env_states": "float32" if has_env else None,
        },
        "files": files,
        "blocks": {"block_rows": block_rows, "sha256": blocks},
        "seconds": round(time.time() - t0, 2),
        "provenance": provenance(),
        **(extra or {}),
    }
    # Move everything into place; statistics then manifest last (the manifest marks completion).
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "dataset_statistics.json"):
        if (out_dir / stale).exists():
            os.unlink(out_dir / stale)
    for fn in files:
        os.replace(tmp / fn, out_dir / fn)
    if not has_env and (out_dir / "env_states.npy").exists():
        os.unlink(out_dir / "env_states.npy")
    shutil.rmtree(tmp)
    write_json(out_dir / "dataset_statistics.json", stats)
    write_json(out_dir / "manifest.json", manifest)
    return manifest


class CachedDataset:
    """Random access to a cache dir: `ds[i]` -> image, instruction, action, state, env_state, task,
    episode, step. O(1) RAM in dataset size (memmaps; per-episode index only).

    split: "train", "heldout" (the manifest's `heldout_episodes`: per data.heldout, the last
    (1 - train_split) of each task's episodes, or openvla's tail) or "all";
    shots=n keeps n episodes per task of the train split, chosen with `seed`.
    """

    def __init__(self, cache_dir: str | Path, split: str = "train", shots: int | None = None, seed: int = 0):
        self.cache_dir = Path(cache_dir)
        mpath = self.cache_dir / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(
                f"{self.cache_dir} is not a finished dataset cache (no manifest.json): "
                f"run the cache stage (`vlaforget cache --config ...`) for it"
            )
        self.manifest = read_json(mpath)
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{self.cache_dir} is a format-{self.manifest.get('format')} dataset cache; this code "
                f"reads format {CACHE_FORMAT} (actions transformed per dataset: LIBERO's gripper is "
                f"1 = open, 0 = close, statistics over all episodes; held-out episodes per data.heldout, "
                f"recorded in the manifest). Rebuild it: delete the folder and "
                f"rerun the cache stage (`vlaforget cache --config ...` or the workflow)"
            )
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split '{split}': use train, heldout or all")
        if shots is not None and split != "train":
            raise ValueError("shots subsets the train split; use split='train' with shots")
        self.name = self.manifest["name"]
        self.split, self.shots, self.seed = split, shots, seed
        all_eps = read_json(self.cache_dir / "episodes.json")
        eps = split_episodes(self.manifest, all_eps, split)
        if shots is not None:
            eps = select_shots(eps, shots, seed)
        self.episodes: list[dict] = eps
        self._ends = np.cumsum([e["length"] for e in eps], dtype=np.int64)  # [n_episodes]
        self._starts = np.asarray([e["start"] for e in eps], dtype=np.int64)
        self.action_dim = int(self.manifest["shapes"]["actions"][1])
        self.state_dim = int(self.manifest["shapes"]["states"][1])
        self.image_size = int(self.manifest["image_size"])
        self.tasks = sorted({e["task"] for e in eps})
        self._stats = None
        self._mm: dict[str, np.ndarray] | None = None
        blocks = self.manifest.get("blocks") or {}
        self.block_rows = int(blocks.get("block_rows") or 0)
        self._block_sha = blocks.get("sha256") or {}
        self._verified: set[int] = set()  # blocks hashed in this process (not pickled into workers)
        if not self._block_sha:
            _warn_no_blocks(self.cache_dir)

    # memmaps open lazily, so a dataset pickled into DataLoader workers reopens them there
    def _arrays(self) -> dict[str, np.ndarray]:
        if self._mm is None:
            s = self.manifest["shapes"]
            mm = {
                "images": np.memmap(
                    self.cache_dir / IMAGES_FILE, dtype=np.uint8, mode="r", shape=tuple(s["images"])
                ),
                "actions": np.load(self.cache_dir / "actions.npy", mmap_mode="r"),
                "states": np.load(self.cache_dir / "states.npy", mmap_mode="r"),
            }
            if s.get("env_states"):
                mm["env_states"] = np.load(self.cache_dir / "env_states.npy", mmap_mode="r")
            for fn, key in ROW_FILES.items():  # an .npy header changed: its rows are not the written ones
                if key in mm and list(mm[key].shape) != list(s[key]):
                    raise CorruptInputError(
                        f"{self.cache_dir / fn} holds an array of shape {list(mm[key].shape)} but was "
                        f"written with {s[key]}: it was changed or corrupted; "
                        f"{rebuild_hint(self.cache_dir, 'cache')}"
                    )
            self._mm = mm
        return self._mm

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        d["_verified"] = set()  # each process (DataLoader workers too) hashes the blocks it reads
        return d

    def verify_rows(self, row: int) -> None:
        """Hash the block holding cache row `row` (every row-aligned file) against the manifest, once
        per process; raises CorruptInputError naming the file, the block's rows and the 'cache' rule."""
        if not self.block_rows:
            return
        b = row // self.block_rows
        if b in self._verified:
            return
        a = self._arrays()
        r0 = b * self.block_rows
        for fn, key in ROW_FILES.items():
            digests = self._block_sha.get(fn)
            if digests is None or key not in a:
                continue
            rows = a[key][r0 : r0 + self.block_rows]
            got = block_digests(rows, self.block_rows)[0]  # the digest build_cache recorded
            want = digests[b] if b < len(digests) else "(none recorded)"
            if got != want:
                raise CorruptInputError(
                    f"{self.cache_dir / fn} rows {r0}..{r0 + len(rows) - 1} (block {b}, {self.block_rows} "
                    f"rows a block) do not match the sha256 recorded when the cache was made "
                    f"({got[:12]}… vs {want[:12]}…): it was changed or corrupted; "
                    f"{rebuild_hint(self.cache_dir, 'cache')}"
                )
        self._verified.add(b)

    @property
    def statistics(self) -> dict:
        if self._stats is None:
            self._stats = read_json(self.cache_dir / "dataset_statistics.json")[self.name]
        return self._stats

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, i: int) -> tuple[int, int, int]:
        """Transition i of this view -> (position in self.episodes, step in episode, cache row)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} transitions")
        k = int(np.searchsorted(self._ends, i, side="right"))
        step = i - (int(self._ends[k - 1]) if k else 0)
        return k, step, int(self._starts[k]) + step

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, step, row = self.locate(int(i))
        self.verify_rows(row)
        a = self._arrays()
        ep = self.episodes[k]
        return {
            "image": np.array(a["images"][row]),
            "instruction": ep["instruction"],
            "action": np.array(a["actions"][row]),
            "state": np.array(a["states"][row]),
            "env_state": np.array(a["env_states"][row]) if "env_states" in a else None,
            "task": ep["task"],
            "episode": ep["index"],
            "step": step,
        }

    def episode_rows(self, k: int) -> np.ndarray:
        """Cache rows of the k-th episode of this view."""
        e = self.episodes[k]
        return np.arange(e["start"], e["start"] + e["length"])


_WARNED_NO_BLOCKS: set[str] = set()


def _warn_no_blocks(cache_dir: Path) -> None:
    if str(cache_dir) not in _WARNED_NO_BLOCKS:
        _WARNED_NO_BLOCKS.add(str(cache_dir))
        log.warning(
            "%s was built before caches recorded per-block hashes: its rows are not verified as they are "
            "read (only whole-file hashes at stage start, trusted while a file's size and mtime are "
            "unchanged). Rebuild it to have them verified: delete the folder and rerun the 'cache' rule",
            cache_dir,
        )


def select_shots(episodes: list[dict], shots: int, seed: int) -> list[dict]:
    """n episodes per task, chosen with `seed`, kept in source order."""
    if shots <= 0:
        raise ValueError(f"shots = {shots}: give a positive number of episodes per task")
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for pos, e in enumerate(episodes):
        by_task.setdefault(e["task"], []).append(pos)
    keep: list[int] = []
    for task in sorted(by_task):
        pos = by_task[task]
        if len(pos) < shots:
            raise ValueError(
                f"task '{task}' has only {len(pos)} train episodes, fewer than shots={shots}: "
                f"lower study.shots or generate more episodes"
            )
        keep += [pos[j] for j in rng.choice(len(pos), size=shots, replace=False)]
    return [episodes[p] for p in sorted(keep)]
