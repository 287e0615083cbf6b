"""Meta-World v3 (metaworld 3.1.1) as a small, deterministic, headless-rendering environment.

`MetaWorldEnv(task, seed)` is one task; `reset()` always replays the episode of `(task, seed)`:
object and goal positions are drawn from a generator seeded with `seed`, and MuJoCo's state
(including the solver warm start) is cleared, so the same pair gives the same episode in any
process, whatever ran before. Images come from a MuJoCo offscreen renderer with shadows and
reflections off (the cost of CPU rendering is per frame, and those two passes dominate it), rotated
180° for the corner cameras, which Meta-World mounts upside down.

Headless rendering needs an OpenGL backend chosen before MuJoCo is imported: `configure_rendering()`
(called on import of this module) keeps a user's MUJOCO_GL, else picks EGL (surfaceless, Debian
package libegl-mesa0, or a GPU driver's EGL) and falls back to OSMesa (Debian libosmesa6).
"""

from __future__ import annotations

import atexit
import ctypes.util
import glob
import os
import sys
import warnings
import weakref
from typing import Any

import numpy as np

from ..errors import UserError

CORNER_CAMERAS = ("corner", "corner2", "corner3", "corner4")
CAMERAS = CORNER_CAMERAS + ("topview", "behindGripper", "gripperPOV")
STATE_DIM = 4  # hand xyz + gripper opening
ENV_STATE_DIM = 39  # Meta-World observation: hand(3) gripper(1) obj1(7) obj2(7) previous(18) goal(3)
ACTION_DIM = 4  # dx dy dz gripper, in [-1, 1]

RENDER_FIX = (
    "install an OpenGL backend for headless rendering: `apt-get install libegl-mesa0 "
    "libgl1-mesa-dri` (EGL, preferred) or `apt-get install libosmesa6` and set "
    "MUJOCO_GL=osmesa; on a GPU machine MUJOCO_GL=egl uses the driver's EGL"
)


class RenderingUnavailable(UserError, RuntimeError):
    """No working headless OpenGL backend; the message says which package to install."""


def _egl_vendor_present() -> bool:
    if not ctypes.util.find_library("EGL"):
        return False
    dirs = ["/usr/share/glvnd/egl_vendor.d", "/etc/glvnd/egl_vendor.d"]
    return any(glob.glob(os.path.join(d, "*.json")) for d in dirs)


def configure_rendering() -> str:
    """Choose MuJoCo's headless GL backend (env MUJOCO_GL wins).

    Best called before `import mujoco`. If MuJoCo was already imported without MUJOCO_GL (it then
    picked GLFW, which needs a display) and PyOpenGL is not loaded yet, switch its context class.
    """
    gl = os.environ.get("MUJOCO_GL", "").strip().lower()
    late = "mujoco" in sys.modules
    if gl:
        late = False  # the user's choice, already in effect
    else:
        if _egl_vendor_present():
            gl = "egl"
        elif ctypes.util.find_library("OSMesa"):
            gl = "osmesa"
        else:
            gl = "egl"  # fails at first render with RenderingUnavailable naming the packages
        os.environ["MUJOCO_GL"] = gl
    if gl == "egl":
        os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    if gl in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)
    if late and "OpenGL" not in sys.modules:
        import importlib

        from mujoco import gl_context

        gl_context.GLContext = importlib.import_module(f"mujoco.{gl}").GLContext
    return gl


configure_rendering()

# The scripted policies warn on every step whose raw response exceeds [-1, 1]; we clip anyway.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")


_LIVE: weakref.WeakSet = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_all() -> None:
    # Free GL contexts while EGL is still loaded (their __del__ at interpreter exit raises).
    for env in list(_LIVE):
        try:
            env.close()
        except Exception:  # noqa: BLE001, S110 (best effort at interpreter exit)
            pass


def _shrink_reset_space(env, scale: float) -> None:
    """Scale the task's object/goal reset ranges about their centres by `scale` (0 = always the
    centre). Only the embedded benchmark's difficulty changes; the physics and experts do not."""
    from gymnasium.spaces import Box

    space = env._random_reset_space
    mid = (space.low + space.high) / 2.0
    half = (space.high - space.low) / 2.0 * scale
    env._random_reset_space = Box(mid - half, mid + half, dtype=np.float64)


def env_action(action) -> np.ndarray:
    """Model action -> Meta-World command: clipped to [-1, 1], otherwise as is (the cache keeps
    Meta-World's own convention, gripper effort -1 = open, +1 = close; data/transforms.py)."""
    a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
    if a.shape != (ACTION_DIM,):
        raise ValueError(
            f"Meta-World actions are {ACTION_DIM}-D [dx, dy, dz, gripper], got shape {np.shape(action)}"
        )
    return a


class MetaWorldEnv:
    """One Meta-World v3 task with a scripted expert and a 180°-corrected camera image.

    obs = {"image": uint8 [H, W, 3], "state": f32 [4] (hand xyz, gripper), "env_state": f32 [39]}.
    `step(action)` -> (obs, success, done); done = success or `max_steps` steps taken.
    """

    def __init__(
        self,
        task: str,
        seed: int,
        camera: str = "corner3",
        render_size: int = 64,
        max_steps: int = 150,
        render: bool = True,
        antialias: bool = False,
        randomization: float = 1.0,
    ):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(
                f"unknown Meta-World task '{task}'. Known v3 tasks: {', '.join(sorted(ALL_V3_ENVIRONMENTS))}"
            )
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera '{camera}'; Meta-World cameras: {', '.join(CAMERAS)}")
        self.task, self.seed, self.camera = task, int(seed), camera
        self.render_size, self.max_steps = int(render_size), int(max_steps)
        self.antialias = bool(antialias)
        env = ALL_V3_ENVIRONMENTS[task]()
        # The MT setting: goal visible in the observation (the scripted experts read it), positions
        # drawn from env.np_random on each reset (we reseed it per episode) instead of a fixed task.
        if env._partially_observable:
            env._partially_observable = False
            env.__dict__.pop("sawyer_observation_space", None)  # cached_property: recompute
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = 10**9  # we cap episodes ourselves (Meta-World raises past its cap)
        self.randomization = float(randomization)
        if not 0.0 <= self.randomization <= 1.0:
            raise ValueError(
                f"randomization must be in [0, 1] (1 = Meta-World's ranges), got {randomization}"
            )
        if self.randomization != 1.0:
            _shrink_reset_space(env, self.randomization)
        self._env = env
        self._policy = ENV_POLICY_MAP[task]()
        self._renderer = None
        if render:
            self._renderer = self._make_renderer()
        self.steps = 0
        self._raw_obs: np.ndarray | None = None

    # ------------------------------------------------------------------ rendering

    def _make_renderer(self):
        import mujoco

        model = self._env.model
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.render_size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.render_size)
        if not self.antialias:  # 4x MSAA costs ~35 % of a software-rendered frame
            model.vis.quality.offsamples = 0
        try:
            renderer = mujoco.Renderer(model, self.render_size, self.render_size)
        except Exception as e:  # EGL/OSMesa missing or broken
            raise RenderingUnavailable(
                f"MuJoCo cannot render headless with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                f"({type(e).__name__}: {e}). Fix: {RENDER_FIX}. MUJOCO_GL must be set before "
                f"mujoco is first imported (import vlaforget.envs.metaworld first, or export it)."
            ) from e
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        global _ATEXIT_REGISTERED
        if not _ATEXIT_REGISTERED:  # registered after MuJoCo's EGL hooks, so it runs before them
            atexit.register(_close_all)
            _ATEXIT_REGISTERED = True
        _LIVE.add(self)
        return renderer

    def render(self) -> np.ndarray:
        """Camera image of the current state, uint8 [H, W, 3], upright."""
        if self._renderer is None:
            return np.zeros((self.render_size, self.render_size, 3), np.uint8)
        self._renderer.update_scene(self._env.data, camera=self.camera)
        img = self._renderer.render()
        if self.camera in CORNER_CAMERAS:
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img, dtype=np.uint8)

    # ------------------------------------------------------------------ episode

    def _obs(self, raw: np.ndarray) -> dict[str, Any]:
        self._raw_obs = raw
        return {
            "image": self.render(),
            "state": raw[:STATE_DIM].astype(np.float32),
            "env_state": raw.astype(np.float32),
        }

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start the episode of (task, seed); `seed` replaces the constructor's seed if given."""
        import mujoco

        if seed is not None:
            self.seed = int(seed)
        env = self._env
        mujoco.mj_resetData(env.model, env.data)  # clears the warm start: episodes independent
        env.seed(self.seed)
        raw, _ = env.reset()
        self.steps = 0
        return self._obs(raw)

    def step(self, action) -> tuple[dict[str, Any], bool, bool]:
        if self._raw_obs is None:
            raise RuntimeError("call reset() before step()")
        a = env_action(action)
        raw, _reward, _term, _trunc, info = self._env.step(a)
        self.steps += 1
        success = bool(info.get("success", 0.0))
        done = success or self.steps >= self.max_steps
        return self._obs(raw), success, done

    def expert_action(self, obs: dict[str, Any]) -> np.ndarray:
        """The scripted Meta-World policy's action for `obs`, clipped to [-1, 1], f32 [4]."""
        a = self._policy.get_action(np.asarray(obs["env_state"], dtype=np.float64))
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None

    def __enter__(self) -> MetaWorldEnv:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 (a destructor must not raise)
            pass


class MetaWorldFactory:
    """Picklable env factory for the rollout engine (eval/rollout.py): task name → `MetaWorldEnv`
    for one camera / size / cap (like `envs.libero.LiberoFactory`)."""

    def __init__(
        self, camera: str = "corner3", render_size: int = 64, max_steps: int = 150, randomization: float = 1.0
    ):
        self.camera, self.render_size, self.max_steps = camera, int(render_size), int(max_steps)
        self.randomization = float(randomization)

    def __call__(self, task: str) -> MetaWorldEnv:
        return MetaWorldEnv(
            task,
            seed=0,
            camera=self.camera,
            render_size=self.render_size,
            max_steps=self.max_steps,
            randomization=self.randomization,
        )


def rendering_available(camera: str = "corner3", size: int = 16) -> tuple[bool, str]:
    """(True, backend) if a Meta-World frame renders here, else (False, reason and fix)."""
    try:
        with MetaWorldEnv("reach-v3", seed=0, camera=camera, render_size=size) as env:
            img = env.reset()["image"]
        if img.max() == 0:
            return False, "rendered an all-black frame"
        return True, os.environ.get("MUJOCO_GL", "")
    except Exception as e:  # noqa: BLE001 (any failure means: no rendering here)
        return False, f"{type(e).__name__}: {e}"
