"""The embedded evaluation's frames are the training pipeline's frames (eval/frames.py; issue 27,
session 14). The decoder's equality with TensorFlow's is tests/test_rlds_cache.py's
test_training_image_is_the_frame_the_cache_holds."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from vlaforget.eval.frames import TrainingFrames, training_image
from vlaforget.imaging import decode_jpeg


def test_training_image_is_a_jpeg_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = training_image(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)  # JPEG changed it
    np.testing.assert_array_equal(training_image(img), out)  # deterministic
    from vlaforget.imaging import encode_jpeg

    np.testing.assert_array_equal(decode_jpeg(encode_jpeg(img)), out)


class _Env:
    def __init__(self, task):
        self.task, self.steps = task, 0

    def _obs(self):
        v = 40 * self.steps + (0 if self.task == "a" else 100)
        y, x = np.mgrid[0:16, 0:16]
        img = np.stack([(x * 8 + v) % 256, (y * 8) % 256, np.full((16, 16), v % 256)], -1).astype(np.uint8)
        return {"image": img, "state": np.zeros(4, np.float32)}

    def reset(self, seed=None):
        self.steps = 0
        return self._obs()

    def step(self, action):
        self.steps += 1
        return self._obs(), False, self.steps >= 2

    def expert_action(self, obs):
        return np.ones(4, np.float32)

    def close(self):
        self.closed = True


class _Factory:
    max_steps = 2

    def __call__(self, task):
        return _Env(task)


def test_wrapped_env_gives_training_frames_and_keeps_the_rest():
    fac = pickle.loads(pickle.dumps(TrainingFrames(_Factory())))  # the rollout engine pickles it
    assert fac.max_steps == 2
    raw, env = _Env("a"), fac("a")
    o_raw, o = raw.reset(3), env.reset(3)
    np.testing.assert_array_equal(o["image"], training_image(o_raw["image"]))
    np.testing.assert_array_equal(o["state"], o_raw["state"])
    (o, success, done), (o_raw, *_) = env.step(np.zeros(4)), raw.step(np.zeros(4))
    np.testing.assert_array_equal(o["image"], training_image(o_raw["image"]))
    assert (success, done, env.task, env.steps) == (False, False, "a", 1)
    np.testing.assert_array_equal(env.expert_action(o), np.ones(4, np.float32))
    with env:
        pass
    assert env.closed


def test_the_evaluation_of_metaworld_sees_training_frames():
    """The eval stage's factory (closed_loop.build_episodes) gives, for a demo's (task, seed), the
    training pipeline's frame of it; before session 14 it gave the raw render."""
    pytest.importorskip("metaworld")
    from vlaforget.envs.metaworld import MetaWorldEnv, rendering_available

    ok, why = rendering_available()
    if not ok:
        pytest.skip(f"headless rendering unavailable: {why}")
    from vlaforget.eval.closed_loop import build_episodes

    e = {
        "suite": "s",
        "episodes_per_task": 1,
        "tasks": ["drawer-open-v3"],
        "camera": "corner3",
        "render_size": 32,
        "max_steps": 5,
    }
    fac, eps, protocol = build_episodes("metaworld", "s", e)
    assert protocol["image"] == "rlds_jpeg"
    fac = pickle.loads(pickle.dumps(fac))
    with fac("drawer-open-v3") as ev, MetaWorldEnv("drawer-open-v3", 3, render_size=32) as raw:
        o_ev, o_raw = ev.reset(eps[0].seed), raw.reset(eps[0].seed)
        np.testing.assert_array_equal(o_ev["image"], training_image(o_raw["image"]))
        assert not np.array_equal(o_ev["image"], o_raw["image"])
        a = raw.expert_action(o_raw)
        (o_ev, *_), (o_raw, *_) = ev.step(a), raw.step(a)
        np.testing.assert_array_equal(o_ev["image"], training_image(o_raw["image"]))
        np.testing.assert_array_equal(o_ev["env_state"], o_raw["env_state"])
