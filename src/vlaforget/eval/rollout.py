"""Batched closed-loop rollouts: N environments in worker processes, one policy call per control step.

    results = run_episodes(make_env, policy, episodes, num_envs=8)

* `make_env(task) -> env` is a picklable callable (an `EnvFactory`); the env has
  `reset(seed) -> obs`, `step(action) -> (obs, success, done)` and `close()`, with `obs["image"]`
  uint8 [H, W, 3]. `envs.metaworld.MetaWorldFactory` and `envs.libero.LiberoFactory` implement it.
* `policy(images uint8 [B, H, W, 3], instructions list[str]) -> actions [B, A]` is called once per
  control step over every live environment (B ≤ N).
* An `Episode` is (task, instruction, seed); `seed` is the Meta-World episode seed or the LIBERO
  init-state index. An episode is replayed from its seed alone (the envs reset all simulator state),
  so its result does not depend on N, on the worker that ran it or on what ran before — provided the
  policy is deterministic per row.
* `num_envs=0` is the reference loop: the same engine with one worker in this process, so batch-1
  policy calls and episodes one after another (openvla's run_libero_eval.py). Same result format.

Workers start with the `spawn` method by default (safe next to torch/CUDA in the parent), inherit the
environment (MUJOCO_GL, EGL_PLATFORM, LIBERO_CONFIG_PATH) and keep one env per task they last used.
An exception inside an env's step ends that episode as a failure with the message recorded (as the
reference loop does); a worker that dies raises `RolloutError`.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..io import progress

Policy = Callable[[np.ndarray, "list[str]"], np.ndarray]


CLOSE_TIMEOUT_S = 10.0  # workers still alive this long after "close" are terminated


class RolloutError(UserError, RuntimeError):
    """A closed-loop rollout failed (env / worker); the message names the cause."""


@dataclass
class Episode:
    task: str
    instruction: str
    seed: int
    index: int = 0  # index of the episode within its task (videos: the first k per task)
    suite: str = ""
    max_steps: int | None = None  # engine-side cap on policy steps (None: the env decides)
    record: bool = False  # keep frames for a video


@dataclass
class EpisodeResult:
    task: str
    instruction: str
    seed: int
    index: int
    suite: str
    success: bool
    steps: int
    wall_s: float
    error: str | None = None
    video: str | None = None
    final_digest: str = ""  # sha1 of the last image: identical trajectories have identical digests
    # sha1 of the first image: two evaluations of one initial state saw the same pixels iff equal (a
    # GPU driver's renderer and Mesa's draw the same scene differently: report/tables.py refuses to
    # pair such episodes)
    first_digest: str = ""
    frames: list = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("frames")
        return d


class EnvCache:
    """Keeps the envs of the `size` most recently used tasks (building one can take seconds)."""

    def __init__(self, make_env: Callable[[str], Any], size: int = 1):
        self.make_env, self.size = make_env, max(1, int(size))
        self.envs: OrderedDict[str, Any] = OrderedDict()

    def get(self, task: str):
        if task in self.envs:
            self.envs.move_to_end(task)
            return self.envs[task]
        while len(self.envs) >= self.size:
            _, old = self.envs.popitem(last=False)
            _safe_close(old)
        env = self.make_env(task)
        self.envs[task] = env
        return env

    def close(self) -> None:
        while self.envs:
            _safe_close(self.envs.popitem()[1])


def _safe_close(env) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001, S110 - simulator errors end the episode
        pass


# ----------------------------------------------------------------------------- worker


def _worker(conn, make_env, cache_size: int) -> None:
    cache = EnvCache(make_env, cache_size)
    env = None
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                task, seed = arg
                try:
                    env = cache.get(task)
                    obs = env.reset(seed)
                    conn.send(("ok", obs))
                except Exception as e:  # noqa: BLE001 - a task that cannot start: report, keep serving
                    conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            elif cmd == "step":
                try:
                    conn.send(("ok", env.step(arg)))
                except Exception as e:  # noqa: BLE001 - simulator errors end the episode
                    conn.send(("error", f"{type(e).__name__}: {e}"))
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        cache.close()
        conn.close()


class _Remote:
    def __init__(self, ctx, make_env, cache_size: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, make_env, cache_size), daemon=True)
        self.proc.start()
        child.close()

    def send(self, cmd: str, arg: Any = None) -> None:
        self.conn.send((cmd, arg))

    def recv(self):
        try:
            return self.conn.recv()
        except EOFError as e:
            raise RolloutError(
                f"rollout worker (pid {self.proc.pid}) died (exit code "
                f"{self.proc.exitcode}); out of memory or a simulator crash?"
            ) from e

    def request_close(self) -> None:
        try:
            self.conn.send(("close", None))
        except Exception:  # noqa: BLE001, S110 - a dead worker needs no message
            pass

    def join(self, deadline: float) -> None:
        self.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)
        self.conn.close()

    def close(self) -> None:
        self.request_close()
        self.join(time.monotonic() + CLOSE_TIMEOUT_S)


def _close_all(workers) -> None:
    """Ask every worker to stop, then wait for them together (closing envs and EGL contexts takes
    ~0.1 s per worker: one after another, 128 workers cost 15-20 s of wall time)."""
    for w in workers:
        w.request_close()
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for w in workers:
        w.join(deadline)


class _Local:
    """In-process worker (num_envs=0, in_process=True and tests)."""

    def __init__(self, make_env, cache_size: int):
        self.cache = EnvCache(make_env, cache_size)
        self.env = None
        self._reply = None

    def send(self, cmd: str, arg: Any = None) -> None:
        try:
            if cmd == "reset":
                self.env = self.cache.get(arg[0])
                self._reply = ("ok", self.env.reset(arg[1]))
            elif cmd == "step":
                self._reply = ("ok", self.env.step(arg))
        except Exception as e:  # noqa: BLE001 - simulator errors end the episode
            self._reply = ("error", f"{type(e).__name__}: {e}")

    def recv(self):
        return self._reply

    def request_close(self) -> None:
        pass

    def join(self, deadline: float) -> None:
        self.close()

    def close(self) -> None:
        self.cache.close()


# ----------------------------------------------------------------------------- engine


@dataclass
class _Slot:
    ep: Episode
    obs: dict
    t0: float
    steps: int = 0
    frames: list = field(default_factory=list)
    first_digest: str = ""


def _policy_call(policy: Policy, images: np.ndarray, instructions: list[str]) -> np.ndarray:
    actions = np.asarray(policy(images, instructions), dtype=np.float32)
    if actions.ndim != 2 or actions.shape[0] != len(instructions):
        raise RolloutError(
            f"policy returned actions of shape {actions.shape} for a batch of "
            f"{len(instructions)}; expected [B, action_dim]"
        )
    return actions


def run_episodes(
    make_env: Callable[[str], Any],
    policy: Policy,
    episodes: Sequence[Episode],
    num_envs: int = 1,
    *,
    video_dir: str | Path | None = None,
    fps: int = 30,
    start_method: str = "spawn",
    cache_size: int = 1,
    desc: str = "rollouts",
    in_process: bool = False,
    groups: int = 1,
) -> dict:
    """Run `episodes` with `num_envs` parallel envs (0 = the batch-1 sequential reference loop).

    Returns `summarize(...)` of the episode results plus `timing`. Videos of episodes with
    `record=True` go to `video_dir/{task}__{index}__{seed}__{success|fail}.mp4`.
    `in_process=True` steps the envs in this process (still batched; for tests and debugging).
    `groups` > 1 pipelines: the N envs form that many groups whose simulation overlaps the policy
    forward of the others (`_run_batched`); use it where the policy runs on a GPU.
    """
    episodes = list(episodes)
    t_start = time.perf_counter()
    timing = {
        "policy_s": 0.0,
        "env_s": 0.0,
        "policy_calls": 0,
        "env_steps": 0,
        "send_s": 0.0,
        "t_start": t_start,
        "startup_s": 0.0,
        "startup_env_s": 0.0,
        "shutdown_s": 0.0,
    }
    # num_envs <= 0: the reference loop is the same engine with one in-process worker (batch-1 calls)
    n = max(1, min(num_envs, len(episodes)))
    if in_process or num_envs <= 0:
        workers = [_Local(make_env, cache_size) for _ in range(n)]
    else:
        ctx = mp.get_context(start_method)
        workers = [_Remote(ctx, make_env, cache_size) for _ in range(n)]
    try:
        results = _run_batched(workers, policy, episodes, timing, desc, groups)
    finally:
        t = time.perf_counter()
        _close_all(workers)
        timing["shutdown_s"] = time.perf_counter() - t
    mode = "sequential" if num_envs <= 0 else "batched"
    results.sort(key=lambda r: (r.suite, r.task, r.index, r.seed))
    videos = []
    if video_dir is not None:
        from .video import write_video

        for r in results:
            if r.frames:
                name = f"{_safe(r.task)}__{r.index:03d}__s{r.seed}__{'success' if r.success else 'fail'}.mp4"
                r.video = str(write_video(Path(video_dir) / name, r.frames, fps=fps))
                videos.append(r.video)
            r.frames = []
    out = summarize([r.to_json() for r in results])
    wall = time.perf_counter() - t_start
    steps = max(timing["env_steps"], 1)
    out["videos"] = videos
    out["timing"] = {
        "mode": mode,
        "num_envs": n,
        "wall_s": round(wall, 3),
        "env_steps": timing["env_steps"],
        "policy_calls": timing["policy_calls"],
        "policy_s": round(timing["policy_s"], 3),
        "env_s": round(timing["env_s"], 3),
        "env_s_after_startup": round(timing["env_s"] - timing["startup_env_s"], 3),
        "send_s": round(timing["send_s"], 3),
        "ms_per_env_step": round(1000 * wall / steps, 3),
        "startup_s": round(timing["startup_s"], 3),
        "shutdown_s": round(timing["shutdown_s"], 3),
        "ms_per_env_step_after_startup": round(1000 * (wall - timing["startup_s"]) / steps, 3),
        "mean_batch": round(timing["env_steps"] / max(timing["policy_calls"], 1), 3),
    }
    return out


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:80]


def _run_batched(
    workers, policy: Policy, episodes: list[Episode], timing: dict, desc: str, groups: int = 1
) -> list[EpisodeResult]:
    """One batched policy call per control step over the live envs of a group.

    groups = 1: all envs step together (send all actions, wait for every observation, one forward).
    groups = G > 1: the envs are split into G groups taken in turn, so the policy's forward for one
    group runs while the other groups' workers simulate (the workers are separate processes): env
    time hides behind GPU time. Episodes are independent, so each one's trajectory is the same in
    both modes wherever the policy's output for a row does not depend on the batch around it."""
    queue = list(reversed(episodes))
    slots: list[_Slot | None] = [None] * len(workers)
    waiting = [False] * len(workers)  # a "step" was sent and its reply not yet read
    groups = max(1, min(int(groups), len(workers)))
    members = [[i for i in range(len(workers)) if i % groups == g] for g in range(groups)]
    results: list[EpisodeResult] = []
    bar = progress(total=len(episodes), desc=desc)

    def start(idxs: list[int]) -> None:
        """Reset the given free workers onto the next episodes (all sends first, then replies);
        a worker whose episode cannot start takes the next one (a loop: with one worker, a long
        run of failing resets must not recurse once per episode)."""
        while idxs and queue:
            pending = []
            for i in idxs:
                if queue:
                    ep = queue.pop()
                    workers[i].send("reset", (ep.task, ep.seed))
                    pending.append((i, ep, time.perf_counter()))
            t = time.perf_counter()
            for i, ep, t0 in pending:
                status, obs = workers[i].recv()
                if status == "ok":
                    slots[i] = _Slot(
                        ep, obs, t0, frames=[obs["image"]] if ep.record else [], first_digest=_digest(obs)
                    )
                else:
                    results.append(_result(ep, False, 0, t0, error=str(obs).splitlines()[0]))
                    bar.update(1)
                    slots[i] = None
            timing["env_s"] += time.perf_counter() - t
            idxs = [i for i, _, _ in pending if slots[i] is None]

    def collect(idxs: list[int]) -> None:
        """Read the step replies of `idxs`; finished episodes free their worker for the next one."""
        t = time.perf_counter()
        freed = []
        for i in idxs:
            s = slots[i]
            status, reply = workers[i].recv()
            waiting[i] = False
            s.steps += 1
            timing["env_steps"] += 1
            if status != "ok":
                results.append(
                    _result(s.ep, False, s.steps, s.t0, error=reply, frames=s.frames, first=s.first_digest)
                )
                freed.append(i)
                continue
            obs, success, done = reply
            s.obs = obs
            if s.ep.record:
                s.frames.append(obs["image"])
            capped = s.ep.max_steps is not None and s.steps >= s.ep.max_steps
            if success or done or capped:
                results.append(
                    _result(
                        s.ep, bool(success), s.steps, s.t0, frames=s.frames, obs=obs, first=s.first_digest
                    )
                )
                freed.append(i)
        timing["env_s"] += time.perf_counter() - t
        for i in freed:
            slots[i] = None
            bar.update(1)
        if freed:
            start(freed)

    start(list(range(len(workers))))
    timing["startup_s"] = time.perf_counter() - timing["t_start"]
    timing["startup_env_s"] = timing["env_s"]
    while any(s is not None for s in slots):
        for group in members:
            collect([i for i in group if waiting[i]])
            live = [i for i in group if slots[i] is not None]
            if not live:
                continue
            images = np.stack([slots[i].obs["image"] for i in live])
            instructions = [slots[i].ep.instruction for i in live]
            t = time.perf_counter()
            actions = _policy_call(policy, images, instructions)
            timing["policy_s"] += time.perf_counter() - t
            timing["policy_calls"] += 1
            t = time.perf_counter()
            for k, i in enumerate(live):
                workers[i].send("step", actions[k])
                waiting[i] = True
            timing["send_s"] += time.perf_counter() - t
    bar.close()
    return results


def _digest(obs: dict | None) -> str:
    if obs is None:
        return ""
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(obs["image"]).tobytes()).hexdigest()[:16]


def _result(
    ep: Episode,
    success: bool,
    steps: int,
    t0: float,
    error: str | None = None,
    frames: list | None = None,
    obs: dict | None = None,
    first: str = "",
) -> EpisodeResult:
    return EpisodeResult(
        final_digest=_digest(obs),
        first_digest=first,
        task=ep.task,
        instruction=ep.instruction,
        seed=int(ep.seed),
        index=int(ep.index),
        suite=ep.suite,
        success=bool(success),
        steps=int(steps),
        wall_s=round(time.perf_counter() - t0, 4),
        error=error,
        frames=list(frames or []),
    )


# ----------------------------------------------------------------------------- summaries


def summarize(episodes: list[dict]) -> dict:
    """Per-task / per-suite success and mean steps of JSON episode records."""

    def block(eps: list[dict]) -> dict:
        n = len(eps)
        return {
            "success_rate": (sum(e["success"] for e in eps) / n) if n else 0.0,
            "n": n,
            "successes": sum(bool(e["success"]) for e in eps),
            "mean_steps": (sum(e["steps"] for e in eps) / n) if n else 0.0,
        }

    tasks: dict[str, list[dict]] = {}
    suites: dict[str, list[dict]] = {}
    for e in episodes:
        tasks.setdefault(e["task"], []).append(e)
        suites.setdefault(e.get("suite", ""), []).append(e)
    total = block(episodes)
    return {
        "success_rate": total["success_rate"],
        "n_episodes": total["n"],
        "per_task": {t: block(v) for t, v in tasks.items()},
        "per_suite": {s: block(v) for s, v in suites.items()},
        "errors": sum(1 for e in episodes if e.get("error")),
        "episodes": episodes,
    }


def make_episodes(
    tasks: Sequence[str],
    instructions: dict[str, str],
    episodes_per_task: int,
    seed_of: Callable[[str, int], int],
    *,
    suite: str = "",
    videos_per_task: int = 0,
    max_steps: int | None = None,
) -> list[Episode]:
    """tasks × episodes_per_task, task-major (workers then tend to stay on one task)."""
    return [
        Episode(
            task=t,
            instruction=instructions[t],
            seed=int(seed_of(t, i)),
            index=i,
            suite=suite,
            max_steps=max_steps,
            record=i < videos_per_task,
        )
        for t in tasks
        for i in range(episodes_per_task)
    ]
