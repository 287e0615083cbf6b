"""RLDS datasets in TFDS format: write ours (LIBERO `*_no_noops` field names), read any.

A builder dir is what `tfds.builder_from_directory` opens: `{out_dir}/{version}/` holding
`dataset_info.json`, `features.json` and `{name}-train.tfrecord-0000i-of-0000N` shards, exactly like
openvla's `modified_libero_rlds/{name}/1.0.0/`. Each record is one episode with `steps` (a nested
dataset) and `episode_metadata`. Step t holds observation t and the action taken from it.

TensorFlow is imported lazily: only these functions need it, never the training cache.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

VERSION = "1.0.0"


def load_tensorflow():
    """Import TensorFlow so that it can share the process with MuJoCo's software rendering.

    TensorFlow and Mesa's llvmpipe (the EGL/OSMesa CPU renderer) both carry LLVM; loaded the plain
    way, the second one to load segfaults. Loading Mesa first and TensorFlow with RTLD_DEEPBIND (its
    libraries then resolve their own symbols first) works in either order of later use. Import TF
    through this function wherever rendering may happen in the same process (tests, tools).
    """
    import sys

    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _load_gl_first()
        flags = sys.getdlopenflags()
        sys.setdlopenflags(os.RTLD_NOW | os.RTLD_DEEPBIND)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.setdlopenflags(flags)
    import tensorflow as tf

    try:  # the cache/writer are CPU jobs; keep TF off any GPU the training job may want
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices already initialised in this process: keep them
        pass
    return tf


def _load_gl_first() -> None:
    """Create and free a 1x1 GL context, so Mesa (and its LLVM) is loaded before TensorFlow."""
    try:
        from ..envs.metaworld import configure_rendering

        configure_rendering()
        from mujoco import gl_context

        if gl_context.GLContext is None:
            return
        ctx = gl_context.GLContext(1, 1)
        ctx.free()
    except Exception:  # noqa: BLE001, S110 (no MuJoCo / no GL here: nothing to protect)
        pass


_quiet_tf = load_tensorflow


def rlds_features(
    image_shape: tuple[int, int, int], state_dim: int, action_dim: int, env_state_dim: int | None = None
):
    """The TFDS feature spec: LIBERO's step fields (+ env_state, episode_metadata/task, seed)."""
    load_tensorflow()
    import tensorflow_datasets as tfds

    obs = {
        "image": tfds.features.Image(
            shape=tuple(image_shape),
            dtype=np.uint8,
            encoding_format="jpeg",
            doc="Main camera RGB observation.",
        ),
        "state": tfds.features.Tensor(
            shape=(state_dim,), dtype=np.float32, doc="Robot proprioception (Meta-World: hand xyz, gripper)."
        ),
    }
    if env_state_dim:
        obs["env_state"] = tfds.features.Tensor(
            shape=(env_state_dim,), dtype=np.float32, doc="Full simulator observation (Meta-World 39-D)."
        )
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(obs),
                    "action": tfds.features.Tensor(
                        shape=(action_dim,), dtype=np.float32, doc="Robot action."
                    ),
                    "discount": tfds.features.Scalar(dtype=np.float32, doc="Discount, 1.0."),
                    "reward": tfds.features.Scalar(
                        dtype=np.float32, doc="1.0 on the final step of a success."
                    ),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                    "language_instruction": tfds.features.Text(doc="Language instruction."),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict(
                {
                    "task": tfds.features.Text(doc="Task name."),
                    "seed": tfds.features.Scalar(dtype=np.int64, doc="Simulator seed of the episode."),
                }
            ),
        }
    )


def episode_to_rlds(ep: dict[str, Any]) -> dict[str, Any]:
    """Our in-memory episode -> the nested RLDS example dict.

    `ep`: images (list of JPEG bytes or uint8 [T, H, W, 3]), states [T, S], actions [T, A],
    instruction str, task str, seed int, success bool, optional env_states [T, E].
    """
    actions = np.asarray(ep["actions"], np.float32)
    n = len(actions)
    success = bool(ep.get("success", True))
    steps = []
    for t in range(n):
        obs = {"image": ep["images"][t], "state": np.asarray(ep["states"][t], np.float32)}
        if ep.get("env_states") is not None:
            obs["env_state"] = np.asarray(ep["env_states"][t], np.float32)
        last = t == n - 1
        steps.append(
            {
                "observation": obs,
                "action": actions[t],
                "discount": 1.0,
                "reward": float(last and success),
                "is_first": t == 0,
                "is_last": last,
                "is_terminal": last and success,
                "language_instruction": ep["instruction"],
            }
        )
    return {"steps": steps, "episode_metadata": {"task": ep["task"], "seed": int(ep.get("seed", -1))}}


def write_rlds(
    out_dir: str | Path,
    name: str,
    episodes: Iterable[dict[str, Any]],
    *,
    image_shape: tuple[int, int, int],
    state_dim: int,
    action_dim: int,
    env_state_dim: int | None = None,
    episodes_per_shard: int = 64,
    description: str = "",
    version: str = VERSION,
) -> dict[str, Any]:
    """Write `episodes` (see episode_to_rlds) as TFDS builder dir `{out_dir}/{version}/`.

    Written to a sibling temp dir and moved into place at the end, so a killed writer leaves no
    half dataset under the final name. Returns counts.
    """
    features = rlds_features(image_shape, state_dim, action_dim, env_state_dim)
    return write_builder_dir(
        out_dir,
        name,
        features,
        (episode_to_rlds(ep) for ep in episodes),
        episodes_per_shard=episodes_per_shard,
        description=description or f"{name}: RLDS episodes (LIBERO *_no_noops field names).",
        version=version,
    )


def write_builder_dir(
    out_dir: str | Path,
    file_name: str,
    features,
    examples: Iterable[dict[str, Any]],
    *,
    episodes_per_shard: int = 64,
    n_shards: int | None = None,
    description: str = "",
    version: str = VERSION,
) -> dict[str, Any]:
    """Serialise RLDS `examples` ({steps: [...], episode_metadata: {...}}) with `features` as the
    TFDS builder dir `{out_dir}/{version}/`, shards `{file_name}-train.tfrecord-0000i-of-0000N`.

    `file_name` is the builder's own name (dataset_info.json's `name`); it need not be the folder's
    name: openvla's `libero_10_no_noops/1.0.0/` holds `liber_o10-train.tfrecord-*`. Shards hold
    `episodes_per_shard` episodes each, or, with `n_shards`, the examples are first collected and
    spread over exactly that many shards (round robin, as many as there are episodes at most).
    Written to a sibling temp dir and moved into place at the end, so a killed writer leaves no
    half dataset under the final name. Returns counts.
    """
    tf = _quiet_tf()
    import tensorflow_datasets as tfds

    out_dir = Path(out_dir)
    final = out_dir / version
    tmp = out_dir / f".{version}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    # Shards are named once the total is known: write to numbered temp names, rename after.
    shard_lengths: list[int] = []
    n_steps = 0
    if n_shards is not None:
        blobs = []
        for ex in examples:
            blobs.append(features.serialize_example(ex))
            n_steps += len(ex["steps"])
        k = max(1, min(int(n_shards), len(blobs)))
        shard_lengths = [0] * k if blobs else []
        writers = [tf.io.TFRecordWriter(str(tmp / f"shard{i:05d}")) for i in range(len(shard_lengths))]
        for i, blob in enumerate(blobs):
            writers[i % k].write(blob)
            shard_lengths[i % k] += 1
        for w in writers:
            w.close()
    else:
        writer = None
        for ex in examples:
            if writer is None or shard_lengths[-1] >= episodes_per_shard:
                if writer is not None:
                    writer.close()
                shard_lengths.append(0)
                writer = tf.io.TFRecordWriter(str(tmp / f"shard{len(shard_lengths) - 1:05d}"))
            writer.write(features.serialize_example(ex))
            shard_lengths[-1] += 1
            n_steps += len(ex["steps"])
        if writer is not None:
            writer.close()
    if not shard_lengths:
        shutil.rmtree(tmp)
        raise RuntimeError(f"no episodes to write for dataset '{file_name}'")
    total = len(shard_lengths)
    for i in range(total):
        os.replace(tmp / f"shard{i:05d}", tmp / f"{file_name}-train.tfrecord-{i:05d}-of-{total:05d}")
    split = tfds.core.SplitInfo(
        name="train", shard_lengths=shard_lengths, num_bytes=sum(f.stat().st_size for f in tmp.iterdir())
    )
    tfds.folder_dataset.write_metadata(
        data_dir=str(tmp),
        features=features,
        split_infos=[split],
        version=version,
        check_data=False,
        description=description or f"{file_name}: RLDS episodes.",
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {"episodes": sum(shard_lengths), "steps": n_steps, "shards": total, "builder_dir": str(final)}


# ----------------------------------------------------------------------------- reading


def resolve_builder_dir(path: str | Path) -> Path:
    """A TFDS builder dir from either the dir itself or its parent holding version folders."""
    p = Path(path)
    if (p / "dataset_info.json").exists():
        return p
    if p.is_dir():
        versions = [d for d in p.iterdir() if d.is_dir() and (d / "dataset_info.json").exists()]
        if versions:

            def key(d: Path):
                try:
                    return tuple(int(x) for x in d.name.split("."))
                except ValueError:
                    return (-1,)

            return max(versions, key=key)
    raise FileNotFoundError(
        f"{p} is not a TFDS builder dir (no dataset_info.json in it or in a version folder such as "
        f"{p}/1.0.0/). Point data.rlds_dir at the folder holding the datasets (e.g. "
        f"modified_libero_rlds/) or run the demos stage for a Meta-World dataset."
    )


def _get(d: dict, key: str):
    for part in key.split("/"):
        if part not in d:
            raise KeyError(part)
        d = d[part]
    return d


def _text(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _text(x.item())
    return str(x)


def builder_info(builder_dir: str | Path) -> dict[str, Any]:
    """Name, version, episode count and feature keys of a builder dir (reads metadata only)."""
    _quiet_tf()
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(str(resolve_builder_dir(builder_dir)))
    return {
        "name": b.info.name,
        "version": str(b.info.version),
        "episodes": int(b.info.splits["train"].num_examples),
        "features": str(b.info.features),
    }


def iter_episodes(
    builder_dir: str | Path,
    image_key: str = "observation/image",
    state_key: str = "observation/state",
    split: str = "train",
) -> Iterator[dict[str, Any]]:
    """Episodes of ANY TFDS RLDS builder dir (LIBERO's or ours), in file order, as numpy.

    Yields dicts: images uint8 [T, H, W, 3], states f32 [T, S], actions f32 [T, A],
    env_states f32 [T, E] or None, instruction str (first step's), task str (episode_metadata/task;
    LIBERO's: the task name in episode_metadata/file_path; else the instruction), index int.
    """
    _quiet_tf()
    import tensorflow_datasets as tfds

    bdir = resolve_builder_dir(builder_dir)
    builder = tfds.builder_from_directory(str(bdir))
    ds = builder.as_dataset(split=split, shuffle_files=False)
    # `steps` is a nested dataset: turn it into one dict of stacked [T, ...] tensors per episode.
    ds = ds.map(lambda ep: dict(ep, steps=ep["steps"].batch(1 << 30).get_single_element()))
    for index, ep in enumerate(tfds.as_numpy(ds)):
        steps = ep["steps"]
        try:
            images = np.asarray(_get(steps, image_key), np.uint8)
        except KeyError as e:
            raise KeyError(
                f"{bdir}: steps have no '{image_key}' (missing '{e.args[0]}'); set "
                f"data.image_key to one of {_keys(steps)}"
            ) from None
        try:
            states = np.asarray(_get(steps, state_key), np.float32)
        except KeyError as e:
            raise KeyError(
                f"{bdir}: steps have no '{state_key}' (missing '{e.args[0]}'); set "
                f"data.state_key to one of {_keys(steps)}"
            ) from None
        obs = steps.get("observation", {})
        env_states = np.asarray(obs["env_state"], np.float32) if "env_state" in obs else None
        instr = _text(steps["language_instruction"][0]) if len(steps["language_instruction"]) else ""
        meta = ep.get("episode_metadata") or {}
        task = _text(meta["task"]) if "task" in meta else task_from_file_path(meta.get("file_path"), instr)
        yield {
            "images": images,
            "states": states,
            "actions": np.asarray(steps["action"], np.float32),
            "env_states": env_states,
            "instruction": instr,
            "task": task,
            "index": index,
            "seed": int(meta["seed"]) if "seed" in meta else -1,
        }


def task_from_file_path(file_path, default: str) -> str:
    """LIBERO's task name from `episode_metadata/file_path` (`.../{task}_demo.hdf5`, as openvla's
    conversion records it), else `default`. The name is what LIBERO's benchmark calls the task."""
    if file_path is None:
        return default
    stem = Path(_text(file_path)).name
    for suffix in (".hdf5", "_demo"):
        stem = stem.removesuffix(suffix)
    return stem or default


def _keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}/")
        else:
            out.append(f"{prefix}{k}")
    return out
