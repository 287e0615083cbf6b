"""One rank of a DDP test job (tests/test_ddp.py): `torchrun --standalone --nproc-per-node N
tests/ddp_worker.py SPEC.json` (the launcher train.smk uses), gloo on the CPU.

For each stage config in the spec it runs the real `run_training` and records, per rank, what the
optimizer receives at every step (the gradient after DDP's all-reduce, HSW's surgery and CRaFT's
projection), the controller values the step used (β, γ, the Thermostat's d and law state (warm-up, baseline),
CRaFT's λ), which rank ran the periodic evaluation, and (ranks > 0) every write under the runs'
directory (a sys audit hook). Faults: `kill` = {"rank": r, "step": k}: rank r is killed with
SIGKILL inside the optimizer step k (the job dies, like a worker lost to an OOM kill); `perturb`:
ranks > 0 add a relative 1e-6 to their own drift measurement and retention loss (what nondeterministic
GPU kernels do), so a value computed apart on each rank differs and one broadcast from rank 0 does not.
The same recording runs in-process for the one-process reference (`recorded`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

WRITE_EVENTS = {
    "os.rename",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "shutil.rmtree",
    "os.truncate",
    "shutil.move",
    "os.link",
    "os.symlink",
}


def _writes_under(watch: str, out: list):
    def hook(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
        else:
            writing, path = event in WRITE_EVENTS, args[0] if args else None
        if writing and isinstance(path, (str, os.PathLike)) and str(os.fspath(path)).startswith(watch):
            out.append([event, str(os.fspath(path))])

    return hook


@contextlib.contextmanager
def recorded(rank: int, kill: dict | None = None, perturb: bool = False):
    """Patch the loop so each run_training call appends one record (see module doc) to the list
    this yields; restores everything on exit."""
    from vlaforget.train import loop
    from vlaforget.train import plugins as pl

    runs: list[dict] = []
    saved = {
        "build_plugins": loop.build_plugins,
        "run_training": loop.run_training,
        "step": torch.optim.AdamW.step,
        "measure": pl.ThermostatPlugin.measure,
        "retention_loss": pl.CraftPlugin.retention_loss,
    }
    live: dict = {}

    def build_plugins(ctx, sc, given, train_ds=None):
        plugins = saved["build_plugins"](ctx, sc, given, train_ds=train_ds)
        live["plugins"] = plugins
        runs.append({"run_id": sc["run_id"], "steps": [], "evals": []})
        return plugins

    def periodic_eval(backend, model):
        runs[-1]["evals"].append(
            {"rank": rank, "ddp_wrapped": hasattr(model, "module") and hasattr(model, "reducer")}
        )
        return 0.25 + 0.5 * rank  # a rank > 0 that evaluated would report another score

    def run_training(sc, *a, **k):  # the periodic evaluator the train stage would pass (stages/train.py)
        k.setdefault("evaluator", periodic_eval)
        return saved["run_training"](sc, *a, **k)

    def step(self, *a, **k):
        plugins = live.get("plugins") or {}
        rec = {
            "grads": [
                p.grad.detach().clone() if p.grad is not None else None
                for g in self.param_groups
                for p in g["params"]
            ]
        }
        if "hsw" in plugins:
            rec.update(beta=plugins["hsw"].beta, gamma=plugins["hsw"].gamma)
        if "thermostat" in plugins:
            law = plugins["thermostat"].law
            rec.update(
                d=law.last.get("d"), law_state=law.state_dict(), law_beta=law.beta, law_gamma=law.gamma
            )
        if "craft" in plugins:
            rec.update(lmbda=plugins["craft"].lmbda)
        runs[-1]["steps"].append(rec)
        if kill and rank == int(kill["rank"]) and len(runs[-1]["steps"]) == int(kill["step"]):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return saved["step"](self, *a, **k)

    def measure(self, *a, **k):
        d, per = saved["measure"](self, *a, **k)
        if perturb and rank > 0:
            d, per = d * (1 + 1e-6 * rank), {k: v * (1 + 1e-6 * rank) for k, v in per.items()}
        return d, per

    def retention_loss(self):
        loss = saved["retention_loss"](self)
        return loss * (1 + 1e-6 * rank) if perturb and rank > 0 else loss

    loop.build_plugins, loop.run_training = build_plugins, run_training
    torch.optim.AdamW.step = step
    pl.ThermostatPlugin.measure, pl.CraftPlugin.retention_loss = measure, retention_loss
    try:
        yield runs
    finally:
        loop.build_plugins, loop.run_training = saved["build_plugins"], saved["run_training"]
        torch.optim.AdamW.step = saved["step"]
        pl.ThermostatPlugin.measure = saved["measure"]
        pl.CraftPlugin.retention_loss = saved["retention_loss"]


def main(spec_path: str) -> int:
    from vlaforget.train import loop

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    writes: list = []
    if rank > 0 and spec.get("watch"):
        sys.addaudithook(_writes_under(spec["watch"], writes))
    out = Path(spec["record_dir"])
    # several runs in one job: keep the process group between them (the loop would destroy it)
    loop.cleanup_distributed = lambda d: torch.distributed.barrier() if d.world > 1 else None
    with recorded(rank, kill=spec.get("kill"), perturb=bool(spec.get("perturb"))) as runs:
        for sc in spec["runs"]:
            loop.run_training(sc)
    torch.save(
        {"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "runs": runs, "writes": writes},
        out / f"rank{rank}.pt",
    )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
