"""LIBERO as openvla evaluates it (experiments/robot/libero/run_libero_eval.py + libero_utils.py).

Protocol (docs/evaluation.md):
* suites and caps on policy steps: libero_spatial 220, libero_object 280, libero_goal 300,
  libero_10 520, libero_90 400 (below the 1000-step horizon, past which robosuite raises);
* per task: `OffScreenRenderEnv(bddl_file_name, camera_heights=256, camera_widths=256)`, `env.seed(0)`;
  an episode k = `env.reset()`, `env.set_init_state(init_states[k])` (50 fixed init states per task),
  then 10 wait steps sending `[0,0,0,0,0,0,-1]` (objects settle; `done` ignored);
* policy image: `agentview_image[::-1, ::-1]` → JPEG round trip → resize to 224 (lanczos3, antialias);
  the optional 0.9-area centre crop is applied on the policy side (`center_crop`);
* policy action → env: gripper `2a − 1`, `sign`, `× −1` (the RLDS loader maps 0 = close, 1 = open;
  LIBERO wants −1 = open, +1 = close);
* success = the env's `done`; an exception inside `step` ends the episode as a failure.

One deviation, for episode independence (results must not depend on which worker ran what before):
`env.seed(0)` is called before every reset (openvla seeds once per task env, so its first episode per
task matches exactly). The image path gives openvla's `resize_image` without TensorFlow (which cannot
share a process with MuJoCo's EGL): vlaforget.imaging's JPEG (the pixels of tf.image.encode_jpeg,
decoded as tf.io.decode_image decodes) and lanczos3 resize (TensorFlow's kernel in NumPy). On real
LIBERO renders 25 of 3.6 million values differ from openvla's, by 1 (docs/benchmarks.md "LIBERO frames
as openvla makes them"); before session 15, PIL's decoder and Lanczos differed on 66 % by up to 14.

The pure functions below need neither LIBERO nor a simulator; `LiberoEnv` needs LIBERO (install it
with `python -m vlaforget.envs.libero_setup`, docs/evaluation.md).
"""

from __future__ import annotations  # noqa: I001 (order kept: sorting changes the code hash)

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import jpeg_roundtrip, resize_lanczos
from ..errors import UserError

SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
HORIZON = 1000
NUM_INIT_STATES = 50
WAIT_STEPS = 10
WAIT_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
CONFIG_KEYS = ("benchmark_root", "bddl_files", "init_states", "datasets", "assets")
INSTALL_HINT = "install it with `python -m vlaforget.envs.libero_setup` (see docs/evaluation.md)"


class LiberoUnavailable(UserError, RuntimeError):
    """LIBERO (or its assets) is not installed where this job runs; the message says how to install it."""


class LiberoConfigError(UserError, RuntimeError):
    """A LIBERO setting does not fit the installed suites; the message names the key."""


# ----------------------------------------------------------------------------- pure protocol


def max_steps_for(suite: str) -> int:
    """openvla's cap on policy steps for a suite (the 10 wait steps come on top)."""
    base = suite.removesuffix("_no_noops")
    if base not in SUITE_MAX_STEPS:
        raise ValueError(f"unknown LIBERO suite '{suite}'; known: {', '.join(SUITE_MAX_STEPS)}")
    return SUITE_MAX_STEPS[base]


def wait_actions(n: int = WAIT_STEPS) -> list[list[float]]:
    """The no-op actions sent while objects settle after set_init_state (gripper open)."""
    return [list(WAIT_ACTION) for _ in range(n)]


def preprocess_image(agentview: np.ndarray, size: int = 224, jpeg: bool = True) -> np.ndarray:
    """agentview_image → the policy's image: rotate 180°, JPEG round trip, Lanczos resize."""
    img = np.ascontiguousarray(np.asarray(agentview, dtype=np.uint8)[::-1, ::-1])
    if jpeg:
        img = jpeg_roundtrip(img)
    return resize_lanczos(img, size)


def center_crop(img: np.ndarray, area: float = 0.9) -> np.ndarray:
    """openvla's test-time crop: centre crop of `area` × the image area, bilinear resize back.

    Reproduces tf.image.crop_and_resize with the box [(1−s)/2, (1−s)/2, (1+s)/2, (1+s)/2], s = √area:
    output pixel i samples the input at y = y1·(H−1) + i·(y2−y1)·(H−1)/(H−1) (align-corners bilinear).
    Accepts [H, W, C] or [B, H, W, C] uint8; returns uint8 of the same shape.
    """
    a = np.asarray(img)
    batched = a.ndim == 4
    x = a if batched else a[None]
    _, h, w, _ = x.shape
    s = float(np.clip(np.sqrt(area), 0.0, 1.0))
    lo, hi = (1.0 - s) / 2.0, (1.0 + s) / 2.0

    def coords(n: int):
        c = lo * (n - 1) + np.arange(n) * (hi - lo) * (n - 1) / max(n - 1, 1)
        i0 = np.clip(np.floor(c).astype(int), 0, n - 1)
        i1 = np.clip(i0 + 1, 0, n - 1)
        return i0, i1, (c - i0).astype(np.float32)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    xf = x.astype(np.float32) / 255.0
    top = xf[:, y0][:, :, x0] * (1 - fx)[None, None, :, None] + xf[:, y0][:, :, x1] * fx[None, None, :, None]
    bot = xf[:, y1][:, :, x0] * (1 - fx)[None, None, :, None] + xf[:, y1][:, :, x1] * fx[None, None, :, None]
    out = top * (1 - fy)[None, :, None, None] + bot * fy[None, :, None, None]
    # tf.image.convert_image_dtype(float → uint8, saturate=True) scales by 255.5 then truncates
    out = np.clip(out, 0.0, 1.0)
    out = np.clip(np.floor(out * 255.5), 0, 255).astype(np.uint8)
    return out if batched else out[0]


def convert_gripper(action) -> np.ndarray:
    """Model action (gripper in [0, 1], 1 = open) → LIBERO action (gripper −1 = open, +1 = close).

    normalize_gripper_action(binarize=True): g = sign(2g − 1); invert_gripper_action: g = −g.
    """
    a = np.array(action, dtype=np.float64, copy=True).reshape(-1)
    a[-1] = -np.sign(2.0 * a[-1] - 1.0)
    return a


def quat2axisangle(quat) -> np.ndarray:
    """robosuite's quaternion (x, y, z, w) → axis-angle, as openvla builds the 8-D state."""
    q = np.array(quat, dtype=np.float64, copy=True)
    q[3] = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - q[3] * q[3])
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * np.arccos(q[3]) / den


def state_from_obs(obs: dict) -> np.ndarray:
    return np.concatenate(
        [obs["robot0_eef_pos"], quat2axisangle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]]
    ).astype(np.float32)


# ----------------------------------------------------------------------------- config + import


def libero_package_dir() -> Path:
    """`<site-packages>/libero/libero` without importing it (importing may block on input())."""
    import importlib.util

    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoUnavailable(f"LIBERO is not importable in this Python ({sys.executable}); {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "libero"


def install_tag(pkg_dir: Path) -> str:
    """12 hex digits naming one LIBERO installation (the package folder's resolved path)."""
    import hashlib

    return hashlib.sha256(str(Path(pkg_dir).resolve()).encode()).hexdigest()[:12]


def default_config_dir() -> Path:
    """`$LIBERO_CONFIG_PATH`, else `{root}/libero/<install_tag>`: one generated config per installation.

    A data root outlives the environments that use it (a second checkout, a rebuilt venv, CI's next
    clone): a single `{root}/libero/config.yaml` would keep pointing at the first installation's
    bddl_files and fail every later one (seen in CI: a rehearsal root reused by another clone).
    """
    env = os.environ.get("LIBERO_CONFIG_PATH")
    if env:
        return Path(env)
    from ..paths import resolve_root

    return resolve_root() / "libero" / install_tag(libero_package_dir())


def libero_config_dict(pkg_dir: Path, datasets: Path | None = None) -> dict[str, str]:
    return {
        "benchmark_root": str(pkg_dir),
        "bddl_files": str(pkg_dir / "bddl_files"),
        "init_states": str(pkg_dir / "init_files"),
        "datasets": str(datasets or pkg_dir.parent / "datasets"),
        "assets": str(pkg_dir / "assets"),
    }


def check_libero_config(config_dir: str | Path) -> dict:
    """Read `config_dir/config.yaml`; LiberoConfigError naming LIBERO_CONFIG_PATH and missing keys."""
    import yaml

    path = Path(config_dir) / "config.yaml"
    if not path.is_file():
        raise LiberoConfigError(
            f"no LIBERO config at {path} (LIBERO_CONFIG_PATH={os.environ.get('LIBERO_CONFIG_PATH')!r}); "
            f"without one `import libero` blocks on input(). Create it with "
            f"`python -c 'from vlaforget.envs.libero import ensure_libero_config; ensure_libero_config(\"{config_dir}\")'` "
            f"or write the keys {', '.join(CONFIG_KEYS)} yourself."
        )
    cfg = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in CONFIG_KEYS if not cfg.get(k)]
    if missing:
        raise LiberoConfigError(
            f"LIBERO config {path} (LIBERO_CONFIG_PATH) lacks the keys "
            f"{', '.join(missing)}; it needs {', '.join(CONFIG_KEYS)} "
            f"(bddl_files and init_states: the libero package's bddl_files/ and init_files/)."
        )
    for k in ("bddl_files", "init_states"):
        if not Path(cfg[k]).is_dir():
            raise LiberoConfigError(
                f"LIBERO config {path}: {k} = {cfg[k]} is not a directory (written for another LIBERO "
                f"installation?); point it at "
                f"{libero_package_dir() / ('bddl_files' if k == 'bddl_files' else 'init_files')}, or delete "
                f"{path} and it is written again for this one"
            )
    return cfg


def ensure_libero_config(config_dir: str | Path | None = None) -> Path:
    """Write config.yaml for the installed package if there is none; export LIBERO_CONFIG_PATH.

    An existing file is never overwritten (only checked). Returns the config file path.
    """
    import yaml

    from ..io import atomic_write_text

    cdir = Path(config_dir) if config_dir else default_config_dir()
    path = cdir / "config.yaml"
    if not path.exists():
        atomic_write_text(path, yaml.safe_dump(libero_config_dict(libero_package_dir())))
    check_libero_config(cdir)
    os.environ["LIBERO_CONFIG_PATH"] = str(cdir)
    return path


def import_libero(config_dir: str | Path | None = None):
    """(benchmark module, OffScreenRenderEnv, get_libero_path), config ensured first."""
    libero_package_dir()  # LiberoUnavailable if missing
    assets = libero_package_dir() / "assets"
    if not assets.is_dir():
        raise LiberoUnavailable(
            f"LIBERO scene assets missing at {assets} (the package would try a hub download); {INSTALL_HINT}"
        )
    ensure_libero_config(config_dir)
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise LiberoUnavailable(f"LIBERO failed to import ({e}); {INSTALL_HINT}") from e
    return benchmark, OffScreenRenderEnv, get_libero_path


def suite_tasks(suite: str, config_dir: str | Path | None = None) -> list[dict]:
    """[{id, name, language}] of a suite's tasks, in the suite's order."""
    benchmark, _, _ = import_libero(config_dir)
    s = benchmark.get_benchmark_dict()[suite]()
    return [
        {"id": i, "name": s.get_task(i).name, "language": s.get_task(i).language} for i in range(s.n_tasks)
    ]


# ----------------------------------------------------------------------------- env


class LiberoEnv:
    """One LIBERO task as openvla runs it, with the engine's interface.

    `reset(k)` → obs of init state k after the wait steps; `step(action)` takes the model's action
    (gripper in [0, 1]) and returns (obs, success, done), done = success or `max_steps` policy steps.
    obs = {"image": uint8 [image_size, image_size, 3] (preprocessed), "state": f32 [8]}.
    """

    def __init__(
        self,
        suite: str,
        task: int | str,
        config_dir: str | Path | None = None,
        *,
        resolution: int = 256,
        image_size: int = 224,
        wait_steps: int = WAIT_STEPS,
        max_steps: int | None = None,
        jpeg: bool = True,
        gripper_from_model: bool = True,
    ):
        benchmark, OffScreenRenderEnv, get_libero_path = import_libero(config_dir)
        self.suite = suite
        bsuite = benchmark.get_benchmark_dict()[suite]()
        names = [bsuite.get_task(i).name for i in range(bsuite.n_tasks)]
        if isinstance(task, str):
            if task not in names:
                raise ValueError(f"task '{task}' is not in {suite}; its tasks: {', '.join(names)}")
            task = names.index(task)
        self.task_id = int(task)
        t = bsuite.get_task(self.task_id)
        self.task, self.instruction = t.name, t.language
        self.init_states = bsuite.get_task_init_states(self.task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        self._env = OffScreenRenderEnv(
            bddl_file_name=bddl, camera_heights=resolution, camera_widths=resolution
        )
        self._env.seed(0)
        self.image_size, self.wait_steps, self.jpeg = int(image_size), int(wait_steps), jpeg
        self.max_steps = min(int(max_steps or max_steps_for(suite)), HORIZON - self.wait_steps)
        self.gripper_from_model = gripper_from_model
        self.steps = 0
        self.raw_obs: dict | None = None

    def _obs(self, raw: dict) -> dict[str, Any]:
        self.raw_obs = raw
        return {
            "image": preprocess_image(raw["agentview_image"], self.image_size, self.jpeg),
            "state": state_from_obs(raw),
        }

    def reset(self, seed: int = 0) -> dict[str, Any]:
        k = int(seed)
        if not 0 <= k < len(self.init_states):
            raise ValueError(
                f"LIBERO init-state index {k} out of range: {self.task} has "
                f"{len(self.init_states)} (episodes_per_task ≤ {len(self.init_states)})"
            )
        self._env.seed(0)
        self._env.reset()
        raw = self._env.set_init_state(self.init_states[k])
        for a in wait_actions(self.wait_steps):
            raw, _r, _done, _info = self._env.step(a)
        self.steps = 0
        return self._obs(raw)

    def step(self, action) -> tuple[dict[str, Any], bool, bool]:
        a = convert_gripper(action) if self.gripper_from_model else np.asarray(action, dtype=np.float64)
        raw, _r, done, _info = self._env.step(a.tolist())
        self.steps += 1
        success = bool(done)
        return self._obs(raw), success, success or self.steps >= self.max_steps

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            try:
                self._env.close()
            finally:
                self._env = None


class LiberoFactory:
    """Picklable env factory for the rollout engine: task name (or id) → LiberoEnv."""

    def __init__(
        self,
        suite: str,
        config_dir: str | None = None,
        resolution: int = 256,
        image_size: int = 224,
        wait_steps: int = WAIT_STEPS,
        max_steps: int | None = None,
    ):
        self.suite, self.config_dir = suite, config_dir
        self.kw = {
            "resolution": resolution,
            "image_size": image_size,
            "wait_steps": wait_steps,
            "max_steps": max_steps,
        }

    def __call__(self, task: str) -> LiberoEnv:
        return LiberoEnv(self.suite, task, self.config_dir, **self.kw)
