"""The frames the policy sees in a closed-loop evaluation of the embedded world: as training saw them.

The demonstrations' writer stores each rendered frame as JPEG (PIL, quality 95: `imaging.encode_jpeg`)
and the cache stage decodes it with TensorFlow (`tf.io.decode_jpeg`, default DCT: libjpeg-turbo's
INTEGER_FAST), so the policy is trained on JPEG frames. `training_image` makes a freshly rendered frame
that same frame, bit for bit, without TensorFlow (`imaging.jpeg_roundtrip`: simplejpeg's `fastdct` is
the same decoder; PIL's INTEGER_ACCURATE decoder is up to ~10 levels off), and `TrainingFrames` wraps
an env factory so every `obs["image"]` is one. Issue 27, session 14: before, the evaluation fed raw
renders, 98.6 % of whose pixels differ from the training frame of the same state (5.7 % by more than
16 levels). The wrapper is the evaluation's; the round trip is vlaforget.imaging's, shared with the
demonstrations' writer and the LIBERO policy image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..imaging import jpeg_roundtrip


def training_image(image: np.ndarray, quality: int = 95) -> np.ndarray:
    """A rendered uint8 [H, W, 3] frame -> the frame training saw for it (RLDS JPEG, the cache's decoder)."""
    return jpeg_roundtrip(image, quality)


class _FramesEnv:
    """An env whose observations carry `training_image(obs["image"])`; everything else is the env's."""

    def __init__(self, env):
        self._env = env

    @staticmethod
    def _obs(obs: dict[str, Any]) -> dict[str, Any]:
        return {**obs, "image": training_image(obs["image"])}

    def reset(self, *a, **k):
        return self._obs(self._env.reset(*a, **k))

    def step(self, action):
        obs, success, done = self._env.step(action)
        return self._obs(obs), success, done

    def close(self) -> None:
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):  # task, seed, max_steps, expert_action, ...
        return getattr(self._env, name)


class TrainingFrames:
    """Picklable factory wrapper (the rollout engine pickles factories into workers): `factory(task)`'s
    env, with the frames training saw."""

    def __init__(self, factory):
        self.factory = factory

    def __call__(self, task: str) -> _FramesEnv:
        return _FramesEnv(self.factory(task))

    def __getattr__(self, name):  # camera, render_size, max_steps, ...
        if name == "factory":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.factory, name)
