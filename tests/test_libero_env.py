"""LIBERO protocol functions (no LIBERO needed) + one real episode (marker `libero`)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vlaforget.envs import libero as L


def test_step_caps_and_wait_actions():
    assert {s: L.max_steps_for(s) for s in L.SUITE_MAX_STEPS} == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }
    assert L.max_steps_for("libero_goal_no_noops") == 300
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        L.max_steps_for("libero_100")
    w = L.wait_actions()
    assert len(w) == 10 and all(a == [0, 0, 0, 0, 0, 0, -1] for a in w)


def test_gripper_conversion():
    # model gripper 1 = open -> LIBERO -1 (open); 0 = close -> +1 (close); 0.5 -> sign(0) = 0
    a = np.array(
        [
            [0.1, -0.2, 0.3, 0, 0, 0, 1.0],
            [0, 0, 0, 0, 0, 0, 0.0],
            [0, 0, 0, 0, 0, 0, 0.8],
            [0, 0, 0, 0, 0, 0, 0.2],
            [0, 0, 0, 0, 0, 0, 0.5],
        ]
    )
    out = np.stack([L.convert_gripper(x) for x in a])
    assert out[:, -1].tolist() == [-1.0, 1.0, -1.0, 1.0, 0.0]
    assert np.allclose(out[:, :-1], a[:, :-1])
    assert a[0, -1] == 1.0  # input untouched


def test_preprocess_rotates_and_resizes():
    img = np.zeros((16, 16, 3), np.uint8)
    img[:4, :4] = 255  # top-left block -> bottom-right after 180°
    out = L.preprocess_image(img, size=16, jpeg=False)
    assert out.shape == (16, 16, 3) and out[-1, -1].min() == 255 and out[0, 0].max() == 0
    big = L.preprocess_image(np.tile(img, (4, 4, 1)), size=8)
    assert big.shape == (8, 8, 3) and big.dtype == np.uint8
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    j = L.jpeg_roundtrip(smooth)
    # lossy, close (8x8 blocks of random colour are JPEG's worst case; the fast DCT adds a little)
    assert j.shape == smooth.shape and 0 < np.abs(j.astype(int) - smooth).mean() < 10


def test_center_crop_matches_crop_and_resize_definition():
    h = w = 10
    ramp = np.tile(np.arange(w, dtype=np.float32)[None, :, None] * 25, (h, 1, 3)).astype(np.uint8)
    out = L.center_crop(ramp, area=0.9)
    s = np.sqrt(0.9)
    lo, hi = (1 - s) / 2, (1 + s) / 2
    xs = lo * (w - 1) + np.arange(w) * (hi - lo)  # sample positions (align-corners)
    want = np.floor(np.interp(xs, np.arange(w), np.arange(w) * 25.0) / 255 * 255.5)
    assert np.array_equal(out[0, :, 0], want.astype(np.uint8))
    assert np.array_equal(L.center_crop(ramp, area=1.0), ramp)  # identity box
    batch = L.center_crop(np.stack([ramp, ramp]), 0.9)
    assert batch.shape == (2, h, w, 3) and np.array_equal(batch[1], out)


def test_quat2axisangle():
    assert np.allclose(L.quat2axisangle([0, 0, 0, 1]), 0)
    q = [0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]  # 90° about z
    assert np.allclose(L.quat2axisangle(q), [0, 0, np.pi / 2])


def test_config_messages(tmp_path):
    with pytest.raises(L.LiberoConfigError, match="LIBERO_CONFIG_PATH"):
        L.check_libero_config(tmp_path)
    (tmp_path / "config.yaml").write_text("bddl_files: /x\n")
    with pytest.raises(L.LiberoConfigError, match="benchmark_root, init_states, datasets, assets"):
        L.check_libero_config(tmp_path)
    d = L.libero_config_dict(tmp_path / "pkg")
    assert sorted(d) == sorted(L.CONFIG_KEYS) and d["init_states"].endswith("init_files")


def test_generated_config_per_installation(tmp_path, monkeypatch):
    """One data root, two LIBERO installations (CI's rehearsal root reused by the next clone): each gets
    its own generated config; the first one's paths never reach the second (the old single
    {root}/libero/config.yaml failed preflight with 'bddl_files ... is not a directory')."""
    installs = []
    for name in ("clone-a", "clone-b"):
        pkg = tmp_path / name / "site-packages" / "libero" / "libero"
        (pkg / "bddl_files").mkdir(parents=True)
        (pkg / "init_files").mkdir()
        installs.append(pkg)
    monkeypatch.setenv("VLAFORGET_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    import yaml

    written = []
    for pkg in installs:
        monkeypatch.setattr(L, "libero_package_dir", lambda pkg=pkg: pkg)
        monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
        path = L.ensure_libero_config()
        assert path.parent.parent == tmp_path / "root" / "libero"
        assert yaml.safe_load(path.read_text())["bddl_files"] == str(pkg / "bddl_files")
        assert os.environ["LIBERO_CONFIG_PATH"] == str(path.parent)
        written.append(path)
    assert written[0] != written[1]
    # the first installation is gone (its clone deleted): the second still works, the first's config
    # stays an error naming the cause and the fix
    import shutil

    shutil.rmtree(tmp_path / "clone-a")
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    assert L.ensure_libero_config() == written[1]
    with pytest.raises(L.LiberoConfigError, match="another LIBERO installation.*delete"):
        L.check_libero_config(written[0].parent)


def _libero_ready() -> str | None:
    try:
        pkg = L.libero_package_dir()
    except L.LiberoUnavailable as e:
        return str(e)
    if not (pkg / "assets").is_dir():
        return f"LIBERO assets missing at {pkg / 'assets'}: run `python -m vlaforget.envs.libero_setup`"
    return None


@pytest.mark.libero
def test_real_libero_episode(tmp_path):
    why = _libero_ready()
    if why:
        pytest.skip(why)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    from vlaforget.eval.rollout import make_episodes, run_episodes

    cfg_dir = os.environ.get("LIBERO_CONFIG_PATH") or str(tmp_path / "libero_cfg")
    fac = L.LiberoFactory(
        "libero_goal", config_dir=cfg_dir, resolution=64, image_size=32, wait_steps=2, max_steps=3
    )
    env = fac(0)
    task, instr = env.task, env.instruction
    obs = env.reset(0)
    assert obs["image"].shape == (32, 32, 3) and obs["state"].shape == (8,)
    env.close()

    def zero(images, instructions):
        return np.tile(np.array([0, 0, 0, 0, 0, 0, 1.0], np.float32), (len(images), 1))

    eps = make_episodes([task], {task: instr}, 2, lambda t, i: i, suite="libero_goal")
    res = run_episodes(fac, zero, eps, num_envs=2)
    assert res["n_episodes"] == 2 and res["errors"] == 0
    assert all(e["steps"] == 3 and not e["success"] for e in res["episodes"])
    seq = run_episodes(fac, zero, eps, num_envs=0)
    assert [e["final_digest"] for e in seq["episodes"]] == [e["final_digest"] for e in res["episodes"]]


def test_asset_verification(tmp_path):
    from vlaforget.envs import libero_setup as S

    assert S.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.xml").write_bytes(b"<mujoco/>")
    man = tmp_path / "m.tsv"
    man.write_text(
        f"path\tsize_bytes\tgit_blob_sha1\na/x.xml\t9\t{S.git_blob_sha1(b'<mujoco/>')}\nb.obj\t1\t00\n"
    )
    m = S.read_manifest(man)
    assert S.verify_tree(tmp_path, m) == ["missing: b.obj"]
    (tmp_path / "a" / "x.xml").write_bytes(b"<mujoco!>")
    assert "sha1 mismatch: a/x.xml" in S.verify_tree(tmp_path, m)
    shipped = S.read_manifest(S.DEFAULT_MANIFEST)
    assert len(shipped) == 585 and all(len(sha) == 40 for _, sha in shipped.values())


def _free_body_poses(sim) -> dict[str, np.ndarray]:
    """{body: [x, y, z, qw, qx, qy, qz]} of every body on a free joint (the movable objects)."""
    import mujoco

    m, d = sim.model, sim.data
    raw_m, raw_d = getattr(m, "_model", m), getattr(d, "_data", d)  # robosuite wraps mujoco's structs
    out = {}
    for j in range(raw_m.njnt):
        if int(raw_m.jnt_type[j]) == int(mujoco.mjtJoint.mjJNT_FREE):
            b = int(raw_m.jnt_bodyid[j])
            name = mujoco.mj_id2name(raw_m, mujoco.mjtObj.mjOBJ_BODY, b) or str(b)
            a = int(raw_m.jnt_qposadr[j])  # the joint's own state: xpos/xquat are stale until mj_forward
            out[name] = np.asarray(raw_d.qpos[a : a + 7]).copy()
    return out


def _tilt_deg(q0: np.ndarray, q1: np.ndarray) -> float:
    """Rotation angle between two unit quaternions (w, x, y, z), in degrees."""
    dot = abs(float(np.dot(q0 / np.linalg.norm(q0), q1 / np.linalg.norm(q1))))
    return float(np.degrees(2 * np.arccos(min(1.0, dot))))


@pytest.mark.libero
def test_libero_spatial_task5_initial_states_settle(tmp_path):
    """The simulator the published numbers came from (issue 28): with MuJoCo >= 3.4.0 (box-box
    collision change) libero_spatial task 5's bowl does not come to rest on the ramekin where the
    demonstrations had it (98 % -> 12 % success, RLinf #1460). LIBERO's stored initial states hold the
    objects above the table (z 1.08 / 0.97); they fall during openvla's 10 wait steps. So the check is
    that they have come to REST by then: over 20 further no-op steps no movable object moves more than
    0.5 mm or turns more than 1 degree, for each of the first init states, and the task is not done.
    Measured (this test's loop, init states 0-4): MuJoCo 3.3.0 at most 0.003 mm / 0.004 deg (the bowl
    rests on the ramekin's rim, tilted 15.9 deg); 3.4.0 2.3 mm / 10.4 deg (the bowl is still sliding
    off the rim, flat by step 30) -- docs/evaluation.md "The simulator version"."""
    why = _libero_ready()
    if why:
        pytest.skip(why)
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    import mujoco

    cfg_dir = os.environ.get("LIBERO_CONFIG_PATH") or str(tmp_path / "libero_cfg")
    env = L.LiberoEnv("libero_spatial", 5, config_dir=cfg_dir, resolution=64, image_size=32)
    moved = []
    try:
        for k in range(5):
            env.reset(k)  # set_init_state, then openvla's 10 wait steps (L.WAIT_STEPS)
            before = _free_body_poses(env._env.sim)
            assert before, "no free-joint bodies found in libero_spatial task 5"
            done = False
            for a in L.wait_actions(20):
                _raw, _r, done, _info = env._env.step(a)
            after = _free_body_poses(env._env.sim)
            for name, p0 in before.items():
                p1 = after[name]
                dist, turn = float(np.linalg.norm(p1[:3] - p0[:3])), _tilt_deg(p0[3:], p1[3:])
                if dist > 5e-4 or turn > 1.0:
                    moved.append(f"init {k}: {name} still moving: {dist * 1000:.2f} mm, {turn:.2f} deg")
            assert not done, f"init {k}: the task reports done before the policy acted"
    finally:
        env.close()
    assert not moved, (
        f"mujoco {mujoco.__version__}: initial states of {env.task} have not settled after "
        f"{L.WAIT_STEPS} wait steps (validated: mujoco 3.3.0-3.3.2, `make real-env`): " + "; ".join(moved[:6])
    )
