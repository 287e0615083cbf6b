"""The LIBERO-format RLDS fixture writer: openvla's modified_libero_rlds layout, feature dict and
conventions (180° rotation, raw gripper −1 = open / +1 = close), read back by TFDS the way openvla
loads it and by the project's own reader and cache stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

try:
    from vlaforget.data.rlds import load_tensorflow

    load_tensorflow()
    import tensorflow_datasets as tfds
except ImportError:
    pytest.skip("tensorflow-datasets not installed", allow_module_level=True)

from conftest import REPO

from vlaforget.data import libero_rlds as L
from vlaforget.data.rlds import iter_episodes, resolve_builder_dir

SUITES = ("libero_spatial", "libero_10")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("modified_libero_rlds")
    summary = L.write_libero_fixture(d, SUITES, n_tasks=2, episodes_per_task=2, steps=12, seed=0, shards=2)
    return d, summary


def test_layout_is_openvlas(fixture_dir):
    d, summary = fixture_dir
    # {rlds_dir}/{suite}_no_noops/1.0.0/{builder name}-train.tfrecord-0000i-of-0000N, train split only
    for suite, stem in (("libero_spatial", "libero_spatial"), ("libero_10", "liber_o10")):
        vdir = d / f"{suite}_no_noops" / "1.0.0"
        names = sorted(p.name for p in vdir.iterdir())
        assert names == [
            "dataset_info.json",
            "features.json",
            f"{stem}-train.tfrecord-00000-of-00002",
            f"{stem}-train.tfrecord-00001-of-00002",
        ]
        info = json.loads((vdir / "dataset_info.json").read_text())
        assert info["name"] == stem and info["version"] == "1.0.0"
        assert [s["name"] for s in info["splits"]] == ["train"]
        assert sorted(p.name for p in (d / f"{suite}_no_noops").iterdir()) == ["1.0.0"]
    assert summary["datasets"]["libero_10_no_noops"]["episodes"] == 4


def test_feature_dict_matches_the_libero_builder(fixture_dir):
    d, _ = fixture_dir
    b = tfds.builder_from_directory(str(d / "libero_spatial_no_noops" / "1.0.0"))
    f = b.info.features
    obs = f["steps"]["observation"]
    for key in ("image", "wrist_image"):
        assert isinstance(obs[key], tfds.features.Image)
        assert obs[key].shape == (256, 256, 3) and obs[key].dtype == np.uint8
        assert obs[key].encoding_format == "jpeg"
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    assert obs["joint_state"].shape == (7,) and obs["joint_state"].dtype == np.float32
    steps = f["steps"]
    assert steps["action"].shape == (7,) and steps["action"].dtype == np.float32
    for key, dtype in (
        ("discount", np.float32),
        ("reward", np.float32),
        ("is_first", np.bool_),
        ("is_last", np.bool_),
        ("is_terminal", np.bool_),
    ):
        assert steps[key].shape == () and steps[key].dtype == dtype
    assert isinstance(steps["language_instruction"], tfds.features.Text)
    assert set(f["episode_metadata"].keys()) == {"file_path"}
    assert set(steps.keys()) == {
        "observation",
        "action",
        "discount",
        "reward",
        "is_first",
        "is_last",
        "is_terminal",
        "language_instruction",
    }
    assert set(obs.keys()) == {"image", "wrist_image", "state", "joint_state"}


def test_openvla_style_loading_and_conventions(fixture_dir):
    """tfds.builder(name, data_dir) + split 'all' (how openvla's make_dataset_from_rlds opens it)."""
    d, _ = fixture_dir
    b = tfds.builder("libero_10_no_noops", data_dir=str(d))
    assert b.info.splits["train"].num_examples == 4
    eps = list(b.as_dataset(split="all"))
    assert len(eps) == 4
    grippers, instructions, paths = set(), set(), set()
    for ep in eps:
        steps = list(ep["steps"])
        grippers |= {float(s["action"][-1]) for s in steps}
        instructions |= {s["language_instruction"].numpy().decode() for s in steps}
        paths.add(ep["episode_metadata"]["file_path"].numpy().decode())
        assert bool(steps[0]["is_first"]) and bool(steps[-1]["is_last"]) and bool(steps[-1]["is_terminal"])
        assert float(steps[-1]["reward"]) == 1.0 and sum(float(s["reward"]) for s in steps) == 1.0
        a = np.stack([s["action"].numpy() for s in steps])
        assert np.abs(a[:, :3]).max() <= L.POS_LIMIT and np.abs(a[:, 3:6]).max() <= L.ROT_LIMIT
        g = a[:, -1]  # raw: open (−1), close (+1), open again
        assert g[0] == -1.0 and g[-1] == -1.0 and (g == 1.0).any()
    assert grippers == {-1.0, 1.0}
    assert instructions == {
        "put both the alphabet soup and the tomato sauce in the basket",
        "put both the cream cheese box and the butter in the basket",
    }
    assert all(p.endswith("_demo.hdf5") and "/libero_10/LIVING_ROOM_SCENE2_put_both" in p for p in paths)


def test_instruction_from_task_name_as_the_builder():
    assert L.instruction_from_task_name("KITCHEN_SCENE3_turn_on_the_stove") == "turn on the stove"
    assert L.instruction_from_task_name("put_the_bowl_on_the_plate") == "put the bowl on the plate"


def test_images_are_stored_rotated_like_openvlas_eval_sees_them(fixture_dir):
    """The stored image is the simulator frame rotated 180°: exactly what the LIBERO eval's
    preprocessing (agentview[::-1, ::-1] -> JPEG -> resize) gives for the same frame."""
    from vlaforget.envs.libero import preprocess_image

    d, _ = fixture_dir
    raw = L.synthetic_episode("libero_spatial", 1, 0, steps=12, seed=0)
    ep = next(
        e for e in iter_episodes(d / "libero_spatial_no_noops") if e["task"] == raw["task"]
    )  # episode 0 of task 1 comes first for its task
    stored = ep["images"].astype(np.int16)
    assert stored.shape == raw["agentview"].shape
    seen = np.stack([preprocess_image(f, 256) for f in raw["agentview"]]).astype(np.int16)
    unrotated = raw["agentview"].astype(np.int16)
    assert np.abs(stored - seen).mean() < 3.0  # JPEG twice: a few grey levels
    assert np.abs(stored - unrotated).mean() > 10 * np.abs(stored - seen).mean()
    np.testing.assert_array_equal(ep["actions"], raw["actions"])
    np.testing.assert_array_equal(ep["states"], raw["states"])


def test_generator_is_deterministic_and_seeded():
    a = L.synthetic_episode("libero_goal", 0, 1, steps=10, seed=3)
    b = L.synthetic_episode("libero_goal", 0, 1, steps=10, seed=3)
    c = L.synthetic_episode("libero_goal", 0, 1, steps=10, seed=4)
    for k in ("actions", "states", "joint_states", "agentview", "wrist"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["actions"][:, :6], c["actions"][: len(a["actions"]), :6])
    assert a["states"].dtype == np.float32 and a["states"].shape[1] == 8
    assert a["joint_states"].shape[1] == 7 and a["wrist"].shape[1:] == (256, 256, 3)


def test_read_back_by_the_project_reader_and_cache(fixture_dir, tmp_path):
    from vlaforget.data.cache import CachedDataset, build_cache

    d, _ = fixture_dir
    bdir = resolve_builder_dir(d / "libero_spatial_no_noops")
    assert bdir == d / "libero_spatial_no_noops" / "1.0.0"
    m = build_cache(bdir, tmp_path / "cache", "libero_spatial_no_noops", image_size=32)
    assert m["num_episodes"] == 4 and m["source_image_shape"] == [256, 256, 3]
    assert m["tasks"] == sorted(L.SUITE_TASKS["libero_spatial"][:2])
    assert m["shapes"]["actions"][1] == 7 and m["shapes"]["states"][1] == 8
    ds = CachedDataset(tmp_path / "cache", split="all")
    s = ds[0]
    assert s["image"].shape == (32, 32, 3) and s["action"].shape == (7,)
    assert s["instruction"] == L.instruction_from_task_name(s["task"])


def test_heldout_split_of_a_libero_fixture_covers_every_task(tmp_path):
    """data.heldout per_task holds out the last episode(s) of every task, whatever the stored order;
    tail (openvla's train[:95%]) holds out the last episode(s) only (here one, of one task)."""
    from vlaforget.data.cache import CachedDataset, build_cache, n_train_episodes

    L.write_libero_fixture(
        tmp_path / "rlds", ("libero_spatial",), n_tasks=3, episodes_per_task=4, steps=8, seed=1, shards=1
    )
    bdir = resolve_builder_dir(tmp_path / "rlds" / "libero_spatial_no_noops")
    tasks = sorted(L.SUITE_TASKS["libero_spatial"][:3])
    m = build_cache(bdir, tmp_path / "pt", "libero_spatial_no_noops", image_size=16)
    eps = CachedDataset(tmp_path / "pt", split="all").episodes
    last = sorted(max(e["index"] for e in eps if e["task"] == t) for t in tasks)  # each task's last episode
    ho, tr = CachedDataset(tmp_path / "pt", split="heldout"), CachedDataset(tmp_path / "pt", split="train")
    assert ho.tasks == tr.tasks == tasks == m["heldout_tasks"]
    assert [e["index"] for e in ho.episodes] == last and len(last) == 3
    assert {e["index"] for e in tr.episodes} == set(range(12)) - set(last)
    t = build_cache(bdir, tmp_path / "tail", "libero_spatial_no_noops", image_size=16, heldout="tail")
    ho_tail = CachedDataset(tmp_path / "tail", split="heldout")
    assert [e["index"] for e in ho_tail.episodes] == list(range(n_train_episodes(12, 0.95), 12)) == [11]
    assert len(ho_tail.tasks) == 1 and t["heldout_used"] == "tail"


def test_bad_suite_names_the_choices():
    with pytest.raises(ValueError, match="libero_spatial"):
        L.suite_of("libero_kitchen")
    with pytest.raises(ValueError, match="has 10 tasks"):
        L.suite_task_names("libero_goal", 11)


def test_cli_writes_a_fixture(tmp_path):
    from vlaforget.cli import main

    rc = main(
        [
            "libero-fixture",
            "--out",
            str(tmp_path),
            "--suites",
            "libero_object_no_noops",
            "--tasks",
            "1",
            "--episodes",
            "1",
            "--steps",
            "8",
            "--shards",
            "1",
        ]
    )
    assert rc == 0
    assert (
        tmp_path / "libero_object_no_noops" / "1.0.0" / "libero_object-train.tfrecord-00000-of-00001"
    ).is_file()
    assert (
        json.loads((tmp_path / L.FIXTURE_FILE).read_text())["datasets"]["libero_object_no_noops"]["episodes"]
        == 1
    )


def _libero_python():
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("libero") is not None:
        return sys.executable
    return os.environ.get("VLAFORGET_LIBERO_PYTHON")


def test_source_libero_needs_a_python_with_libero(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("libero") is not None:
        pytest.skip("LIBERO is importable here")
    monkeypatch.delenv("VLAFORGET_LIBERO_PYTHON", raising=False)
    with pytest.raises(RuntimeError, match="--libero-python"):
        L.libero_python()


@pytest.mark.libero
@pytest.mark.skipif(
    _libero_python() is None,
    reason="needs the LIBERO simulator: import libero here, or VLAFORGET_LIBERO_PYTHON=.venv-libero/bin/python",
)
def test_source_libero_records_the_real_simulator(tmp_path):
    """Real LIBERO frames/states through the same writer (~40 s on 2 CPU cores)."""
    summary = L.write_libero_fixture(
        tmp_path,
        ["libero_goal"],
        n_tasks=1,
        episodes_per_task=1,
        steps=12,
        shards=1,
        source="libero",
        python=_libero_python(),
    )
    assert summary["source"] == "libero"
    assert sorted(p.name for p in tmp_path.iterdir()) == [L.FIXTURE_FILE, "libero_goal_no_noops"]
    (ep,) = list(iter_episodes(tmp_path / "libero_goal_no_noops"))
    assert ep["task"] == "open_the_middle_drawer_of_the_cabinet"
    assert ep["instruction"] == "open the middle drawer of the cabinet"
    g, fingers = ep["actions"][:, -1], ep["states"][:, 6]
    assert g[0] == -1.0 and (g == 1.0).any()
    closing = np.flatnonzero(g == 1.0)
    assert fingers[closing[-1] + 1 if closing[-1] + 1 < len(g) else -1] < fingers[0] - 0.005  # it closed
    assert ep["images"].shape[1:] == (256, 256, 3) and ep["images"].std() > 10


def test_cache_stage_of_the_real_config_reads_the_fixture(tmp_root, tmp_path):
    """config/config.yaml (world libero) pointed at a fixture: stage config -> `vlaforget cache`."""
    import yaml

    from vlaforget.cli import main
    from vlaforget.config import load_config
    from vlaforget.data.cache import CachedDataset
    from vlaforget.stageconfig import stage_config

    rlds = tmp_root.parent / "modified_libero_rlds"
    L.write_libero_fixture(rlds, ["libero_spatial"], n_tasks=2, episodes_per_task=2, steps=8, shards=2)
    cfg = load_config(REPO / "config" / "config.yaml", overrides={"data": {"rlds_dir": str(rlds)}})
    sc = stage_config(cfg, "cache", "libero_spatial_no_noops")
    assert sc["transform"] is None and sc["rlds_dir"] == str(rlds / "libero_spatial_no_noops")
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(sc))
    assert main(["cache", "--config", str(path)]) == 0
    ds = CachedDataset(sc["out_dir"], split="all")
    assert ds.manifest["action_transform"]["name"] == "libero" and len(ds.episodes) == 4
    g = np.stack([ds[i]["action"][-1] for i in range(len(ds))])
    assert set(np.unique(g)) == {0.0, 1.0}  # openvla's training convention: 1 = open
