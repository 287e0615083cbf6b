"""RLDS (TFDS builder dir) -> cache round trip, splits, n-shot subsets, O(1)-RAM CachedDataset."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

try:  # TF through the loader that lets it share a process with MuJoCo's renderer
    from vlaforget.data.rlds import load_tensorflow

    load_tensorflow()
    import tensorflow_datasets  # noqa: F401
except ImportError:
    pytest.skip("tensorflow-datasets not installed", allow_module_level=True)

from vlaforget.data.cache import CachedDataset, build_cache, n_train_episodes, select_shots, write_cache
from vlaforget.data.rlds import iter_episodes, resolve_builder_dir, write_rlds
from vlaforget.imaging import encode_jpeg
from vlaforget.io import read_json, sha256_file


def _smooth_images(rng, T, size):
    """Smooth images (JPEG keeps them within a few levels), distinct per step."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 1, (T, 1, 1, 3))
    img = 255 * (0.5 * base + 0.25 * (xx[None, ..., None] + yy[None, ..., None]))
    return np.clip(img, 0, 255).astype(np.uint8)


def _episodes(n=6, tasks=("t-a", "t-b"), size=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 3 + i % 4
        out.append(
            {
                "images": _smooth_images(rng, T, size),
                "states": rng.normal(size=(T, 4)).astype(np.float32),
                "actions": rng.uniform(-1, 1, (T, 4)).astype(np.float32),
                "env_states": rng.normal(size=(T, 39)).astype(np.float32),
                "instruction": f"do thing {i % len(tasks)}",
                "task": tasks[i % len(tasks)],
                "seed": 100 + i,
                "success": True,
            }
        )
    return out


@pytest.fixture(scope="module")
def rlds_dir(tmp_path_factory):
    eps = _episodes()
    for ep in eps:  # the writer takes JPEG bytes (what the demos workers send)
        ep["jpeg"] = [encode_jpeg(im) for im in ep["images"]]
    d = tmp_path_factory.mktemp("rlds") / "mw_tiny"
    info = write_rlds(
        d,
        "mw_tiny",
        [dict(e, images=e["jpeg"]) for e in eps],
        image_shape=(16, 16, 3),
        state_dim=4,
        action_dim=4,
        env_state_dim=39,
        episodes_per_shard=4,
    )
    assert info == {
        "episodes": 6,
        "steps": sum(len(e["actions"]) for e in eps),
        "shards": 2,
        "builder_dir": str(d / "1.0.0"),
    }
    return d, eps


def test_builder_dir_readable_by_tfds(rlds_dir):
    import tensorflow_datasets as tfds

    d, eps = rlds_dir
    assert {p.name for p in (d / "1.0.0").iterdir()} >= {
        "dataset_info.json",
        "features.json",
        "mw_tiny-train.tfrecord-00000-of-00002",
    }
    b = tfds.builder_from_directory(str(d / "1.0.0"))
    assert b.info.name == "mw_tiny" and b.info.splits["train"].num_examples == 6
    ep = next(iter(tfds.as_numpy(b.as_dataset(split="train"))))
    steps = list(ep["steps"])
    assert [bool(s["is_first"]) for s in steps] == [True] + [False] * (len(steps) - 1)
    assert bool(steps[-1]["is_last"]) and bool(steps[-1]["is_terminal"]) and steps[-1]["reward"] == 1.0
    assert steps[0]["language_instruction"].decode() == eps[0]["instruction"]
    assert ep["episode_metadata"]["task"].decode() == "t-a"


def test_round_trip_rlds_to_cache(rlds_dir, tmp_path):
    d, eps = rlds_dir
    read = list(iter_episodes(d))
    assert [r["task"] for r in read] == [e["task"] for e in eps]
    for r, e in zip(read, eps):
        np.testing.assert_array_equal(r["actions"], e["actions"])
        np.testing.assert_array_equal(r["states"], e["states"])
        np.testing.assert_array_equal(r["env_states"], e["env_states"])
        assert np.abs(r["images"].astype(int) - e["images"]).mean() < 3  # JPEG, smooth images
    (d / "done.json").write_text('{"camera": "corner4", "render_size": 16}')  # as the demos stage
    m = build_cache(d, tmp_path / "cache", "mw_tiny", image_size=16, train_split=0.5, transform="metaworld")
    (d / "done.json").unlink()
    assert m["image_key"] == "observation/image" and m["state_key"] == "observation/state"
    assert m["simulator"]["camera"] == "corner4" and m["source_image_shape"] == [16, 16, 3]
    # data.heldout: per_task (default): 2 tasks x 3 episodes, round(0.5 * 3) = 2 held out of each
    assert m["num_episodes"] == 6 and m["num_train_episodes"] == 2 and m["heldout"] == "per_task"
    for fn, h in m["files"].items():
        assert sha256_file(tmp_path / "cache" / fn) == h
    ds = CachedDataset(tmp_path / "cache", split="all")
    assert len(ds) == sum(len(e["actions"]) for e in eps)
    i = 0
    for k, (r, e) in enumerate(zip(read, eps)):
        for t in range(len(e["actions"])):
            item = ds[i]
            np.testing.assert_array_equal(item["image"], r["images"][t])  # the decoded RLDS frame
            np.testing.assert_array_equal(item["action"], e["actions"][t])
            np.testing.assert_array_equal(item["state"], e["states"][t])
            np.testing.assert_array_equal(item["env_state"], e["env_states"][t])
            assert (item["task"], item["instruction"], item["episode"], item["step"]) == (
                e["task"],
                e["instruction"],
                k,
                t,
            )
            i += 1


def test_training_image_is_the_frame_the_cache_holds(rlds_dir):
    """eval.frames.training_image (what the embedded evaluation feeds the policy) is bit for bit the
    frame the cache stage reads from the RLDS writer's JPEG (TensorFlow's decoder, INTEGER_FAST DCT);
    PIL's decoder (INTEGER_ACCURATE) is not."""
    import io

    from PIL import Image

    from vlaforget.eval.frames import training_image

    d, eps = rlds_dir
    rng = np.random.default_rng(1)
    noisy = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]  # many DCT terms
    for r, e in zip(iter_episodes(d), eps):
        np.testing.assert_array_equal(r["images"], np.stack([training_image(im) for im in e["images"]]))
    import tensorflow as tf

    for im in noisy:
        b = encode_jpeg(im)
        tf_frame = tf.io.decode_jpeg(b).numpy()
        np.testing.assert_array_equal(training_image(im), tf_frame)
        pil = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        assert not np.array_equal(pil, tf_frame)  # why not PIL


def test_iter_episodes_reads_a_libero_layout(tmp_path):
    """A builder with LIBERO's own features (7-D actions, 8-D state, wrist image, no task metadata)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    feats = tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="jpeg"),
                            "wrist_image": tfds.features.Image(shape=(8, 8, 3), encoding_format="jpeg"),
                            "state": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                            "joint_state": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                        }
                    ),
                    "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                    "discount": tfds.features.Scalar(dtype=np.float32),
                    "reward": tfds.features.Scalar(dtype=np.float32),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                    "language_instruction": tfds.features.Text(),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
        }
    )
    vdir = tmp_path / "libero_tiny_no_noops" / "1.0.0"
    vdir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    with tf.io.TFRecordWriter(str(vdir / "libero_tiny_no_noops-train.tfrecord-00000-of-00001")) as w:
        for k in range(2):
            steps = [
                {
                    "observation": {
                        "image": np.full((8, 8, 3), 10 * k + t, np.uint8),
                        "wrist_image": np.zeros((8, 8, 3), np.uint8),
                        "state": rng.normal(size=8).astype(np.float32),
                        "joint_state": np.zeros(7, np.float32),
                    },
                    "action": rng.normal(size=7).astype(np.float32),
                    "discount": 1.0,
                    "reward": 0.0,
                    "is_first": t == 0,
                    "is_last": t == 2,
                    "is_terminal": t == 2,
                    "language_instruction": f"put the bowl {k}",
                }
                for t in range(3)
            ]
            path = f"/data/regenerated--no_noops/libero_tiny/put_the_bowl_{k}_demo.hdf5"
            w.write(feats.serialize_example({"steps": steps, "episode_metadata": {"file_path": path}}))
    tfds.folder_dataset.write_metadata(
        data_dir=str(vdir),
        features=feats,
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[2], num_bytes=0)],
        check_data=False,
    )
    assert resolve_builder_dir(vdir.parent) == vdir
    eps = list(iter_episodes(vdir.parent))
    assert [e["task"] for e in eps] == ["put_the_bowl_0", "put_the_bowl_1"]  # LIBERO's task name
    assert [e["instruction"] for e in eps] == ["put the bowl 0", "put the bowl 1"]
    assert eps[0]["actions"].shape == (3, 7) and eps[0]["states"].shape == (3, 8)
    assert eps[0]["env_states"] is None and eps[1]["images"].shape == (3, 8, 8, 3)
    wrist = list(iter_episodes(vdir.parent, image_key="observation/wrist_image"))
    assert wrist[0]["images"].max() <= 3
    with pytest.raises(KeyError, match="observation/wrist_image"):
        next(iter_episodes(vdir.parent, image_key="observation/agentview_rgb"))
    with pytest.raises(FileNotFoundError, match="builder dir"):
        resolve_builder_dir(tmp_path)


# ------------------------------------------------------------------ caches written without TF


@pytest.fixture
def cache_dir(tmp_path):
    eps = _episodes(n=20, tasks=("t-a", "t-b", "t-c", "t-d"), size=16, seed=3)
    write_cache(
        eps, tmp_path / "c", "tiny", image_size=8, train_split=0.95, transform="metaworld", heldout="tail"
    )
    return tmp_path / "c", eps


def test_splits_follow_openvla(cache_dir):  # data.heldout: tail = openvla's train[:95%]
    d, eps = cache_dir
    n_train = n_train_episodes(20, 0.95)
    assert n_train == 19
    tr, ho, al = (CachedDataset(d, s) for s in ("train", "heldout", "all"))
    assert [e["index"] for e in tr.episodes] == list(range(19))
    assert [e["index"] for e in ho.episodes] == [19]
    assert len(tr) + len(ho) == len(al) == sum(len(e["actions"]) for e in eps)
    assert ho[0]["episode"] == 19 and ho[0]["step"] == 0
    assert tr[len(tr) - 1]["episode"] == 18 and tr[-1]["step"] == len(eps[18]["actions"]) - 1
    assert tr[0]["image"].shape == (8, 8, 3)  # resized to image_size
    from vlaforget.imaging import resize_lanczos  # the eval's resize: cache and policy images agree

    np.testing.assert_array_equal(tr[0]["image"], resize_lanczos(eps[0]["images"][0], 8))
    with pytest.raises(IndexError):
        tr[len(tr)]
    # statistics over ALL episodes (openvla: split "all"), held-out ones included
    stats = read_json(d / "dataset_statistics.json")["tiny"]
    assert stats["num_trajectories"] == 20 and stats["num_transitions"] == len(al)
    all_actions = np.concatenate([e["actions"] for e in eps])
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(all_actions, 0.99, axis=0), rtol=1e-6)
    assert tr.statistics == stats and tr.action_dim == 4


def test_shots_are_seeded_per_task(cache_dir):
    d, _ = cache_dir
    a = CachedDataset(d, "train", shots=2, seed=0)
    b = CachedDataset(d, "train", shots=2, seed=0)
    assert [e["index"] for e in a.episodes] == [e["index"] for e in b.episodes]
    counts = {}
    for e in a.episodes:
        counts[e["task"]] = counts.get(e["task"], 0) + 1
    assert counts == {"t-a": 2, "t-b": 2, "t-c": 2, "t-d": 2}
    assert all(e["index"] < 19 for e in a.episodes)  # from the train split only
    seen = {tuple(e["index"] for e in CachedDataset(d, "train", shots=2, seed=s).episodes) for s in range(6)}
    assert len(seen) > 1  # the seed matters
    with pytest.raises(ValueError, match="fewer than shots"):
        CachedDataset(d, "train", shots=6)
    with pytest.raises(ValueError, match="train split"):
        CachedDataset(d, "heldout", shots=1)


def test_select_shots_keeps_source_order():
    eps = [{"task": "ab"[i % 2], "index": i} for i in range(10)]
    out = select_shots(eps, 3, seed=1)
    assert [e["index"] for e in out] == sorted(e["index"] for e in out) and len(out) == 6


def test_cached_dataset_is_memmapped_not_loaded(tmp_path):
    eps = _episodes(n=40, size=64, seed=5)  # 40 * ~4.5 steps * 12 KiB images ~ 2 MiB of pixels
    write_cache(eps, tmp_path / "big", "big", image_size=64, transform="metaworld")
    tracemalloc.start()
    ds = CachedDataset(tmp_path / "big", "all")
    for i in range(0, len(ds), 7):
        ds[i]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    image_bytes = (tmp_path / "big" / "images.u8").stat().st_size
    assert isinstance(ds._arrays()["images"], np.memmap)
    assert peak < image_bytes / 4, (peak, image_bytes)


def test_missing_manifest_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the cache stage"):
        CachedDataset(tmp_path)
