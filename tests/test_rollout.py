"""Rollout engine: batched == sequential per episode seed, for a fake env and the real Meta-World env."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlaforget.eval.rollout import Episode, make_episodes, run_episodes, summarize


class FakeEnv:
    """Walk from 0 towards a seeded target in [1, 12]; the image encodes (seed, position)."""

    def __init__(self, task: str, cap: int = 8):
        self.task, self.cap = task, cap

    def _obs(self):
        img = np.zeros((4, 4, 3), np.uint8)
        img[..., 0] = self.pos
        img[..., 1] = self.target
        return {"image": img}

    def reset(self, seed):
        self.target = int(np.random.default_rng(seed).integers(1, 13))
        self.pos, self.steps = 0, 0
        return self._obs()

    def step(self, action):
        if self.task == "boom" and self.steps == 2:
            raise RuntimeError("simulator exploded")
        self.pos += round(float(action[0]))
        self.steps += 1
        success = self.pos == self.target
        return self._obs(), success, success or self.steps >= self.cap

    def close(self):
        pass


class FakeFactory:
    def __call__(self, task):
        return FakeEnv(task)


def step_policy(images, instructions):
    """+1 per step ('walk') or +2 ('run'); deterministic per row."""
    assert images.dtype == np.uint8 and images.ndim == 4 and len(instructions) == len(images)
    speed = np.array([2.0 if "run" in s else 1.0 for s in instructions], np.float32)
    return np.stack([speed, np.zeros_like(speed)], 1)


def expected(seed: int, speed: int, cap: int = 8) -> tuple[bool, int]:
    target = int(np.random.default_rng(seed).integers(1, 13))
    for t in range(1, cap + 1):
        if t * speed == target:
            return True, t
    return False, cap


def fake_episodes():
    instr = {"a": "walk", "b": "run"}
    return make_episodes(
        ["a", "b"], instr, 5, lambda t, i: 100 * (t == "b") + i, suite="fake", videos_per_task=1
    )


def strip(res):
    return [
        (e["task"], e["seed"], e["success"], e["steps"], e["first_digest"], e["final_digest"])
        for e in res["episodes"]
    ]


def test_fake_env_batched_equals_sequential_and_truth(tmp_path):
    eps = fake_episodes()
    seq = run_episodes(FakeFactory(), step_policy, eps, num_envs=0)
    for e in seq["episodes"]:
        assert (e["success"], e["steps"]) == expected(e["seed"], 2 if e["task"] == "b" else 1)
    for n in (1, 3, 10):
        for groups in (1, 2, 3):  # pipelined groups: same episodes, same trajectories
            bat = run_episodes(FakeFactory(), step_policy, eps, num_envs=n, in_process=True, groups=groups)
            assert strip(bat) == strip(seq), (n, groups)
            assert bat["timing"]["num_envs"] == min(n, len(eps))
            assert bat["timing"]["env_steps"] == sum(e["steps"] for e in seq["episodes"])
    # real worker processes (spawn) + videos of the first episode of each task
    proc = run_episodes(FakeFactory(), step_policy, eps, num_envs=3, video_dir=tmp_path / "v")
    assert strip(proc) == strip(seq)
    piped = run_episodes(FakeFactory(), step_policy, eps, num_envs=4, groups=2)
    assert strip(piped) == strip(seq)
    assert piped["timing"]["policy_calls"] > proc["timing"]["policy_calls"]  # half-size batches
    assert proc["timing"]["mean_batch"] > 1.0
    assert len(proc["videos"]) == 2 and all(p.endswith(".mp4") for p in proc["videos"])
    from vlaforget.eval.video import read_video

    ep0 = next(e for e in proc["episodes"] if e["video"])
    frames = read_video(ep0["video"])
    assert frames.shape[0] == ep0["steps"] + 1  # reset frame + one per step


def test_env_error_ends_episode_as_failure():
    eps = [Episode("boom", "walk", 3), Episode("a", "walk", 3)]
    for n in (0, 2):
        res = run_episodes(FakeFactory(), step_policy, eps, num_envs=n, in_process=True)
        boom = next(e for e in res["episodes"] if e["task"] == "boom")
        assert not boom["success"] and "exploded" in boom["error"] and boom["steps"] == 3
        assert res["errors"] == 1


class NoSuchTaskFactory(FakeFactory):
    def __call__(self, task):
        if task == "x":
            raise ValueError("no such task")
        return super().__call__(task)


def test_failing_resets_sequential_equals_batched():
    """An episode whose env cannot start is a failure with the message; the worker takes the next
    one. With one worker a long run of them is a loop, not one recursion per episode."""
    eps = [Episode("x", "walk", i) for i in range(3)] + [Episode("a", "run", 7), Episode("x", "walk", 9)]
    seq = run_episodes(NoSuchTaskFactory(), step_policy, eps, num_envs=0)
    assert [(e["task"], e["steps"], e["error"]) for e in seq["episodes"]][:1] == [("a", 6, None)]
    assert seq["errors"] == 4 and all(e["error"] == "ValueError: no such task" for e in seq["episodes"][1:])
    for n in (1, 2):
        bat = run_episodes(NoSuchTaskFactory(), step_policy, eps, num_envs=n, in_process=True)
        assert strip(bat) == strip(seq) and bat["errors"] == 4
    many = [Episode("x", "walk", i) for i in range(1500)] + [Episode("a", "walk", 3)]
    for n in (0, 1):
        res = run_episodes(NoSuchTaskFactory(), step_policy, many, num_envs=n, in_process=True)
        assert res["errors"] == 1500 and res["n_episodes"] == 1501


def test_sequential_is_one_batch1_worker():
    """num_envs=0 runs the batched engine with one in-process worker: one policy call per env step,
    batch 1, and the same per-episode outcomes as any N."""
    eps = fake_episodes()
    seq = run_episodes(FakeFactory(), step_policy, eps, num_envs=0)
    t = seq["timing"]
    assert (t["mode"], t["num_envs"], t["mean_batch"]) == ("sequential", 1, 1.0)
    assert t["policy_calls"] == t["env_steps"] == sum(e["steps"] for e in seq["episodes"])
    assert strip(seq) == strip(run_episodes(FakeFactory(), step_policy, eps, num_envs=1, in_process=True))


def test_bad_policy_shape_raises():
    def bad(images, instructions):
        return np.zeros((len(instructions) + 1, 2))

    with pytest.raises(RuntimeError, match="shape"):
        run_episodes(FakeFactory(), bad, fake_episodes()[:2], num_envs=2, in_process=True)


def test_summarize_counts():
    eps = [
        {"task": "a", "suite": "s", "success": True, "steps": 4},
        {"task": "a", "suite": "s", "success": False, "steps": 10},
        {"task": "b", "suite": "s", "success": True, "steps": 2},
    ]
    s = summarize(eps)
    assert s["success_rate"] == pytest.approx(2 / 3) and s["n_episodes"] == 3
    assert s["per_task"]["a"] == {"success_rate": 0.5, "n": 2, "successes": 1, "mean_steps": 7.0}
    assert s["per_suite"]["s"]["n"] == 3


def image_policy(images, instructions):
    """Deterministic per row, depends on the image: pushes the arm around."""
    m = images.reshape(len(images), -1, 3).astype(np.float32).mean(1) / 255.0  # [B, 3]
    return np.concatenate([np.sin(7 * m), np.cos(5 * m[:, :1])], 1).astype(np.float32)


def test_metaworld_n1_equals_n2():
    from vlaforget.envs.metaworld import MetaWorldFactory, rendering_available  # MUJOCO_GL before mujoco

    pytest.importorskip("metaworld")

    ok, why = rendering_available(size=16)
    if not ok:
        pytest.skip(f"no headless rendering: {why}")
    fac = MetaWorldFactory(camera="corner3", render_size=32, max_steps=6)
    eps = make_episodes(
        ["reach-v3", "drawer-close-v3"],
        {"reach-v3": "reach", "drawer-close-v3": "close"},
        2,
        lambda t, i: 500 + i,
    )
    one = run_episodes(fac, image_policy, eps, num_envs=1, in_process=True)  # this process
    two = run_episodes(fac, image_policy, eps, num_envs=2)  # two spawned workers
    assert strip(one) == strip(two)
    assert all(e["steps"] <= 6 and e["final_digest"] for e in one["episodes"])
    # different seeds of one task give different trajectories
    reach = [e["final_digest"] for e in one["episodes"] if e["task"] == "reach-v3"]
    assert reach[0] != reach[1]


def test_eval_stage_tiny_metaworld(tmp_root, demo_config):
    """Stage `eval` end to end: random-init tiny backend, 2 tasks x 1 episode, 2 worker envs."""
    import argparse
    import json

    import yaml

    from vlaforget.config import deep_merge
    from vlaforget.envs.metaworld import rendering_available
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.stageconfig import stage_config
    from vlaforget.stages import eval as eval_stage

    ok, why = rendering_available(size=16)
    if not ok:
        pytest.skip(f"no headless rendering: {why}")
    cfg = deep_merge(
        demo_config,
        {
            "eval": {
                "num_envs": 2,
                "episodes_per_task": 1,
                "videos_per_task": 1,
                "metaworld": {"max_steps": 3, "seed": 7},
            }
        },
    )
    sc = stage_config(cfg, "eval", "teacher@mw_downstream")
    random_tiny_backend({"image_size": 64}, action_dim=4, seed=0).save(Path(sc["model"]["path"]))
    path = tmp_root / "configs" / "eval.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sc))
    assert eval_stage.main(argparse.Namespace(config=str(path), device="cpu", num_envs=None, threads=1)) == 0
    out = json.loads(Path(sc["out_file"]).read_text())
    assert out["run"] == "teacher" and out["suite"] == "mw_downstream" and out["n_episodes"] == 2
    assert set(out["per_task"]) == set(sc["eval"]["tasks"])
    assert all(e["steps"] <= 3 and e["seed"] == 7 for e in out["episodes"])
    assert out["timing"]["mean_batch"] == 2.0 and len(out["videos"]) == 2
    assert all(
        v.startswith(str(Path(sc["out_file"]).parent / "videos")) for v in out["videos"]
    )  # per config id


def test_evaluate_model_periodic(demo_config):
    """The train loop's periodic eval: an in-memory backend, the train stage's eval block."""
    from vlaforget.config import deep_merge
    from vlaforget.envs.metaworld import rendering_available
    from vlaforget.eval.closed_loop import evaluate_model
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.stageconfig import eval_block

    ok, why = rendering_available(size=16)
    if not ok:
        pytest.skip(f"no headless rendering: {why}")
    cfg = deep_merge(demo_config, {"eval": {"metaworld": {"max_steps": 2, "seed": 3}}})
    blk = eval_block(cfg, "mw_downstream")
    b = random_tiny_backend({"image_size": 64}, action_dim=4, seed=0)
    res = evaluate_model(b, blk, model=b.model, episodes_per_task=1, num_envs=0)
    assert res["n_episodes"] == len(blk["tasks"]) and res["timing"]["mode"] == "sequential"
    assert all(e["steps"] == 2 for e in res["episodes"]) and res["videos"] == []


def test_per_task_caps(demo_config):
    """eval.metaworld.max_steps: one cap for all tasks, or task -> cap with a default."""
    from vlaforget.eval.closed_loop import build_episodes, task_caps
    from vlaforget.stageconfig import eval_block

    tasks = ["drawer-close-v3", "button-press-v3"]
    assert task_caps(50, tasks) == {"drawer-close-v3": 50, "button-press-v3": 50}
    assert task_caps({"button-press-v3": 9, "default": 40}, tasks) == {
        "drawer-close-v3": 40,
        "button-press-v3": 9,
    }
    with pytest.raises(ValueError, match="drawer-close-v3.*default"):
        task_caps({"button-press-v3": 9}, tasks)

    e = eval_block(demo_config, "mw_downstream")
    caps = demo_config["eval"]["metaworld"]["max_steps"]
    fac, eps, info = build_episodes("metaworld", "mw_downstream", e)
    assert {ep.task: ep.max_steps for ep in eps} == {t: caps[t] for t in e["tasks"]}
    assert fac.max_steps == max(caps[t] for t in e["tasks"])  # the env's own cap never cuts first
    assert info["max_steps"] == {t: caps[t] for t in e["tasks"]}


def test_per_task_caps_end_episodes():
    """The engine ends each episode at its own cap (batched and sequential alike)."""
    eps = fake_episodes()
    for ep in eps:
        ep.max_steps = 2 if ep.task == "a" else None
    for n in (0, 2):
        res = run_episodes(FakeFactory(), step_policy, eps, num_envs=n)
        for e in res["episodes"]:
            ok, t = expected(e["seed"], 1 if e["task"] == "a" else 2)
            if e["task"] == "a":
                assert e["steps"] == min(t, 2) and e["success"] == (ok and t <= 2)
            else:
                assert (e["success"], e["steps"]) == (ok, t)


class SlowCloseEnv(FakeEnv):
    def close(self):
        import time

        time.sleep(60)  # a simulator that hangs on close


class SlowCloseFactory:
    def __call__(self, task):
        return SlowCloseEnv(task)


def test_workers_are_closed_together_and_hung_ones_terminated(monkeypatch):
    """Shutdown asks every worker first, then waits on one shared deadline: workers whose env hangs
    in close() are terminated, the results come back, and no worker process is left."""
    import vlaforget.eval.rollout as R

    monkeypatch.setattr(R, "CLOSE_TIMEOUT_S", 1.0)
    made = []
    real_remote = R._Remote

    def remote(*a, **k):
        w = real_remote(*a, **k)
        made.append(w)
        return w

    monkeypatch.setattr(R, "_Remote", remote)
    # one task: a worker switching tasks would close its env mid-run (EnvCache) and hang there
    eps = make_episodes(["a"], {"a": "walk"}, 6, lambda t, i: i)
    res = run_episodes(SlowCloseFactory(), step_policy, eps, num_envs=3)
    assert strip(res) == strip(run_episodes(FakeFactory(), step_policy, eps, num_envs=0))
    assert len(made) == 3 and not any(w.proc.is_alive() for w in made)
    # one shared 1 s deadline for all three, not 1 s each (plus terminate/join slack)
    assert 0.9 <= res["timing"]["shutdown_s"] < 2.9


def test_first_digest_is_the_reset_image():
    """Each episode records the sha1 of its first image (report/tables.check_first_frames compares
    evaluations with it): the reset image of its seed, in every engine mode."""
    import hashlib

    eps = fake_episodes()
    for kw in ({"num_envs": 0}, {"num_envs": 3, "in_process": True}, {"num_envs": 2}):
        res = run_episodes(FakeFactory(), step_policy, eps, **kw)
        for e in res["episodes"]:
            img = FakeEnv(e["task"]).reset(e["seed"])["image"]
            assert e["first_digest"] == hashlib.sha1(img.tobytes()).hexdigest()[:16], kw
            assert e["first_digest"] != e["final_digest"]  # every fake episode moves
