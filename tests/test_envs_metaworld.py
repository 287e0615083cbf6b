"""MetaWorldEnv: per-episode determinism, observation layout, scripted expert, headless rendering."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from vlaforget.envs.metaworld import ENV_STATE_DIM, MetaWorldEnv, MetaWorldFactory, rendering_available

_RENDER = rendering_available()
needs_render = pytest.mark.skipif(not _RENDER[0], reason=f"headless rendering unavailable: {_RENDER[1]}")


def _episode(env, seed=None, n=30):
    obs = env.reset(seed)
    images, actions, states = [obs["image"]], [], [obs["env_state"]]
    for _ in range(n):
        a = env.expert_action(obs)
        actions.append(a)
        obs, _success, done = env.step(a)
        images.append(obs["image"])
        states.append(obs["env_state"])
        if done:
            break
    return np.stack(images), np.stack(actions), np.stack(states)


def test_same_seed_same_episode_without_rendering():
    with (
        MetaWorldEnv("drawer-open-v3", 7, render=False) as a,
        MetaWorldEnv("drawer-open-v3", 3, render=False) as b,
    ):
        _, act_a, st_a = _episode(a)
        _episode(b)  # another episode first: the next one must not depend on it
        _, act_b, st_b = _episode(b, seed=7)
        _, _, st_c = _episode(b, seed=8)
    np.testing.assert_array_equal(act_a, act_b)
    np.testing.assert_array_equal(st_a, st_b)
    assert np.abs(st_a[0] - st_c[0]).max() > 1e-3  # another seed places the objects elsewhere


def test_randomization_scales_the_reset_ranges():
    """randomization r shrinks Meta-World's object/goal reset box about its centre by r."""

    def first_states(r, seeds):
        with MetaWorldEnv("button-press-topdown-v3", 0, render=False, randomization=r) as env:
            return np.stack([env.reset(s)["env_state"] for s in seeds])

    seeds = range(12)
    full, half, none = first_states(1.0, seeds), first_states(0.5, seeds), first_states(0.0, seeds)
    obj = slice(4, 7)  # first object position

    def spread(x):
        return x[:, obj].max(0) - x[:, obj].min(0)

    assert np.allclose(none[:, obj], none[0, obj])  # r = 0: always the centre of the box
    assert spread(full)[0] > 0.05 and np.all(spread(half) <= 0.5 * spread(full) + 0.02)
    centre = none[0, obj]
    assert np.allclose(half[:, obj] - centre, 0.5 * (full[:, obj] - centre), atol=2e-3)
    with pytest.raises(ValueError, match="randomization"):
        MetaWorldEnv("button-press-topdown-v3", 0, render=False, randomization=1.5)


def test_obs_layout_and_expert_actions():
    with MetaWorldEnv("button-press-v3", 0, render=False, render_size=16) as env:
        obs = env.reset()
        assert obs["image"].shape == (16, 16, 3) and obs["image"].dtype == np.uint8
        assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
        assert obs["env_state"].shape == (ENV_STATE_DIM,) and obs["env_state"].dtype == np.float32
        np.testing.assert_array_equal(obs["state"], obs["env_state"][:4])
        assert np.abs(obs["env_state"][36:39]).sum() > 0  # goal visible (the experts read it)
        a = env.expert_action(obs)
        assert a.shape == (4,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)


def test_expert_succeeds_and_done_at_cap():
    with MetaWorldEnv("button-press-v3", 1000, render=False, max_steps=150) as env:
        obs, done, success, n = env.reset(), False, False, 0
        while not done:
            obs, success, done = env.step(env.expert_action(obs))
            n += 1
        assert success and n < 150
    with MetaWorldEnv("button-press-v3", 1000, render=False, max_steps=5) as env:
        env.reset()
        for _i in range(5):
            _, success, done = env.step(np.zeros(4))
        assert done and not success and env.steps == 5


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        MetaWorldEnv("drawer-opne-v3", 0, render=False)
    with pytest.raises(ValueError, match="unknown camera"):
        MetaWorldEnv("drawer-open-v3", 0, camera="front", render=False)
    with MetaWorldEnv("drawer-open-v3", 0, render=False) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset()
        with pytest.raises(ValueError, match="4-D"):
            env.step(np.zeros(7))


@needs_render
def test_rendered_frames_are_deterministic():
    with (
        MetaWorldEnv("drawer-open-v3", 5, render_size=32) as a,
        MetaWorldEnv("drawer-open-v3", 9, render_size=32) as b,
    ):
        img_a, act_a, _ = _episode(a, n=5)
        img_b, act_b, _ = _episode(b, seed=5, n=5)
    assert img_a.shape == (6, 32, 32, 3) and img_a.std() > 5  # a real picture, not a blank frame
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(act_a, act_b)


@needs_render
def test_factory_is_picklable_and_builds_the_configured_env():
    """The rollout engine pickles the factory into spawned workers; a worker's env is the one the
    factory describes (camera, size, cap, randomization)."""
    import pickle

    fac = pickle.loads(
        pickle.dumps(MetaWorldFactory("corner2", render_size=24, max_steps=3, randomization=0.5))
    )
    with fac("reach-v3") as env:
        assert (env.task, env.camera, env.render_size, env.max_steps, env.randomization) == (
            "reach-v3",
            "corner2",
            24,
            3,
            0.5,
        )
        obs = env.reset(4)
        assert obs["image"].shape == (24, 24, 3)
        done = False
        for _ in range(3):
            _obs, _success, done = env.step(np.zeros(4, np.float32))
        assert done  # the factory's cap


@needs_render
def test_corner_image_is_upright():
    """In the (rotated) corner3 image the robot's head is drawn above its pedestal feet."""
    with MetaWorldEnv("reach-v3", 0, render_size=64) as env:
        env.reset()
        r = env._renderer
        r.enable_segmentation_rendering()
        try:
            r.update_scene(env._env.data, camera=env.camera)
            seg = r.render()[::-1, ::-1, 0]  # geom ids, rotated like env.render()
        finally:
            r.disable_segmentation_rendering()
        m = env._env.model

        def rows(body):
            geoms = [g for g in range(m.ngeom) if m.geom_bodyid[g] == m.body(body).id]
            return np.nonzero(np.isin(seg, geoms))[0]

        top, bottom = rows("head"), rows("pedestal_feet")
        assert len(top) and len(bottom), "robot head / pedestal not visible in corner3"
        assert top.mean() < bottom.mean()


@needs_render
def test_demo_generation_keeps_first_successful_seeds():
    from vlaforget.data.instructions import instructions_for
    from vlaforget.data.metaworld_demos import generate, interleave

    kept, counts = generate(["reach-v3", "button-press-v3"], 1, seed=1000, render_size=16, max_steps=150)
    assert counts["reach-v3"]["seeds"] == [1000] == [r["seed"] for r in kept["button-press-v3"]]
    assert (
        counts["button-press-v3"]["failed"] == 0 and counts["button-press-v3"]["expert_success_rate"] == 1.0
    )
    ep = kept["reach-v3"][0]
    assert ep["success"] and len(ep["images"]) == len(ep["actions"]) == ep["steps"]
    assert isinstance(ep["images"][0], bytes)  # JPEG from the worker
    assert ep["instruction"] in instructions_for("reach-v3")
    kept["reach-v3"].append(dict(ep, seed=1001))
    order = [(r["task"], r["seed"]) for r in interleave(kept)]
    assert order == [("reach-v3", 1000), ("button-press-v3", 1000), ("reach-v3", 1001)]
    with pytest.raises(RuntimeError, match="max_steps"):
        generate(["button-press-v3"], 1, seed=0, render_size=16, max_steps=3, max_attempts_factor=1.0)
