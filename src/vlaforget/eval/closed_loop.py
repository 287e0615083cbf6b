"""Stage `eval`: closed-loop success of a run (or the teacher) on one suite.

    vlaforget eval --config {root}/configs/eval/{run}@{suite}.yaml

Loads the backend (the run's LoRA adapter merged in; none for `teacher`), un-normalises actions with
the suite's statistics, and runs tasks × episodes_per_task through the batched rollout engine
(`eval.num_envs` envs in worker processes, one batched forward per control step):

* Meta-World: task list from the config, canonical instruction per task, held-out episode seeds
  `eval.seed + i` (demonstrations use other seeds), cap `eval.max_steps`;
* LIBERO: the suite's tasks and language, init states first_init_state + i (i < episodes_per_task;
  0 unless eval.initial_states is per_seed), openvla's protocol (envs/libero.py).

eval.initial_states per_seed: the block names its training seed (`state_block`) and its first state
(Meta-World `seed`, LIBERO `first_init_state`, study.state_start); the protocol records both.

Writes `out_file` (= `{root}/evals/{run}/{suite}.json`, the completion file) last:
{run, suite, success_rate, n_episodes, per_task: {task: {success_rate, n, successes, mean_steps}},
episodes: [...], videos: [...], timing, provenance}; videos go to `{root}/evals/{run}/videos/{suite}/`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..settings import DEFAULT_MW_MAX_STEPS, EvalSettings
from .rollout import Episode, make_episodes, run_episodes

log = logging.getLogger("vlaforget.eval")


class BackendPolicy:
    """Batched policy over a backend: resize to the model's image size, optional centre crop."""

    def __init__(
        self,
        backend,
        image_size: int | None = None,
        center_crop: bool = False,
        crop_area: float = 0.9,
        model=None,
    ):
        self.backend, self.image_size = backend, image_size
        self.center_crop, self.crop_area = center_crop, crop_area
        self.model = model  # e.g. the PEFT-wrapped training model; None = backend.model

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        from ..envs.libero import center_crop
        from ..imaging import resize_lanczos

        if self.image_size and images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([resize_lanczos(im, self.image_size) for im in images])
        if self.center_crop:
            images = center_crop(images, self.crop_area)
        return images

    def __call__(self, images: np.ndarray, instructions: list[str]) -> np.ndarray:
        imgs = self.preprocess(images)
        if self.model is None:
            return np.asarray(self.backend.predict_actions(imgs, list(instructions)))
        return np.asarray(self.backend.predict_actions(imgs, list(instructions), model=self.model))


def load_stats(ecfg: EvalSettings | dict) -> dict | None:
    """The suite's action statistics (dataset_statistics.json entry), or None (model's own)."""
    e = EvalSettings.of(ecfg)
    path = Path(e.stats_path or "")
    if not e.stats_path or not path.is_file():
        return None
    data = json.loads(path.read_text())
    key = e.unnorm_dataset
    for k in (key, f"{key}_no_noops"):
        if k in data:
            return data[k]
    if len(data) == 1:
        return next(iter(data.values()))
    raise ValueError(
        f"{path} has no statistics for '{key}' (keys: {', '.join(data)}); set "
        f"eval.unnorm_dataset to one of them"
    )


def task_caps(max_steps, tasks) -> dict[str, int]:
    """Per-task episode caps from `eval.metaworld.max_steps`: one integer for every task, or a
    mapping task -> cap with an optional `default` for the tasks it does not name."""
    if isinstance(max_steps, dict):
        unknown = sorted(set(max_steps) - set(tasks) - {"default"})
        missing = [t for t in tasks if t not in max_steps and "default" not in max_steps]
        if missing:
            raise ValueError(
                f"eval.metaworld.max_steps names no cap for {', '.join(missing)}: add those tasks "
                f"or a `default` entry"
            )
        if unknown:
            log.info("eval.metaworld.max_steps: ignoring caps of tasks not in this suite: %s", unknown)
        return {t: int(max_steps.get(t, max_steps.get("default"))) for t in tasks}
    return {t: int(max_steps) for t in tasks}


def world_of(ecfg: EvalSettings | dict) -> str:
    """An eval block's world: Meta-World blocks name their tasks, LIBERO blocks take the suite's."""
    return EvalSettings.of(ecfg).world


def build_episodes(
    world: str,
    suite: str,
    e: EvalSettings | dict,
    episodes_per_task: int | None = None,
    videos_per_task: int | None = None,
) -> tuple[Any, list[Episode], dict]:
    """(env factory, episodes, protocol info) for an eval block (stageconfig.eval_block) of a world."""
    e = EvalSettings.of(e)
    n = int(episodes_per_task if episodes_per_task is not None else e.episodes_per_task)
    k = int(videos_per_task if videos_per_task is not None else e.videos_per_task)
    from ..envs.metaworld import MetaWorldFactory, configure_rendering

    configure_rendering()  # MUJOCO_GL (keeps the user's; else EGL or OSMesa): workers inherit it
    if world == "metaworld":
        from ..data.instructions import canonical_instruction

        seed0 = e.seed
        tasks = list(e.tasks)
        caps = task_caps(DEFAULT_MW_MAX_STEPS if e.max_steps is None else e.max_steps, tasks)
        max_steps = max(caps.values()) if caps else DEFAULT_MW_MAX_STEPS
        instr = {t: canonical_instruction(t, e.instructions) for t in tasks}
        from .frames import TrainingFrames

        # the policy sees each frame as training saw it: RLDS JPEG, decoded as the cache decodes it
        fac = TrainingFrames(
            MetaWorldFactory(camera=e.camera, render_size=e.render_size, max_steps=max_steps)
        )
        eps = make_episodes(tasks, instr, n, lambda t, i: seed0 + i, suite=suite, videos_per_task=k)
        for ep in eps:
            ep.max_steps = caps[ep.task]  # the engine ends the episode at its task's cap
        return (
            fac,
            eps,
            {
                "world": "metaworld",
                "seeds": [seed0, seed0 + n - 1],
                "max_steps": caps if len(set(caps.values())) > 1 else max_steps,
                "camera": e.camera,
                "render_size": e.render_size,
                "image": "rlds_jpeg",  # the policy's frames as in training (eval.frames.training_image)
                **_block_record(e),
            },
        )
    from ..envs import libero as L

    bench = suite.removesuffix("_no_noops")
    L.ensure_libero_config(e.config_path)  # workers inherit LIBERO_CONFIG_PATH
    tasks = L.suite_tasks(bench)
    first = int(e.first_init_state)
    if first + n > L.NUM_INIT_STATES:
        raise ValueError(
            f"eval.episodes_per_task = {n} from init state {first} but LIBERO has {L.NUM_INIT_STATES} "
            "init states per task"
        )
    cap = int(e.max_steps or L.max_steps_for(bench))  # max_steps: override for smoke tests only
    fac = L.LiberoFactory(
        bench,
        config_dir=e.config_path,
        resolution=e.resolution,
        image_size=int(e.image_size),
        wait_steps=L.WAIT_STEPS if e.wait_steps is None else e.wait_steps,
        max_steps=cap,
    )
    tasks = tasks[: e.n_tasks] if e.n_tasks else tasks  # n_tasks: smoke tests only
    names = [t["name"] for t in tasks]
    eps = make_episodes(
        names,
        {t["name"]: t["language"] for t in tasks},
        n,
        lambda t, i: first + i,
        suite=suite,
        videos_per_task=k,
    )
    return (
        fac,
        eps,
        {
            "world": "libero",
            "benchmark": bench,
            "init_states": [first, first + n - 1],
            "max_steps": cap,
            "wait_steps": L.WAIT_STEPS if e.wait_steps is None else e.wait_steps,
            **_block_record(e),
        },
    )


def _block_record(e: EvalSettings) -> dict:
    """The protocol's record of whose initial states these are: nothing for the shared block (its
    eval JSON as before eval.initial_states existed), else the training seed of the block."""
    return {} if e.state_block is None else {"initial_states": "per_seed", "state_block": e.state_block}


def evaluate_model(
    backend,
    ecfg: EvalSettings | dict,
    model=None,
    episodes_per_task: int | None = None,
    num_envs: int | None = None,
    video_dir: str | Path | None = None,
) -> dict:
    """Closed-loop evaluation of an already loaded backend (the train loop's periodic eval).

    ecfg: an eval block (stageconfig.eval_block; the train stage's `periodic_eval`). `model`: the module to
    run (e.g. the PEFT-wrapped training model; eval mode is set by predict_actions). No videos unless
    video_dir. Returns run_episodes' result dict (success_rate, per_task, episodes, timing)."""
    e = EvalSettings.of(ecfg)
    fac, episodes, _ = build_episodes(
        e.world, e.suite, e, episodes_per_task, 0 if video_dir is None else None
    )
    policy = BackendPolicy(backend, image_size=e.image_size, center_crop=e.center_crop, model=model)
    n = e.num_envs if num_envs is None else int(num_envs)
    return run_episodes(
        fac,
        policy,
        episodes,
        num_envs=n,
        video_dir=video_dir,
        desc=f"eval {e.suite}",
        groups=e.pipeline_groups,
    )
