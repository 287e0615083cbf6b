"""Issue 26.2: the Thermostat's drift estimators -- noise at a fixed student and drift after training.

For every probe batch size, estimator (full: C_T of the whole probe set, the user's; paired: C_T of
the same draw from the teacher's pooled states) and metric (raw / normalized / basis):
  - noise: d over `--draws` probe draws with student = teacher (LoRA B = 0): mean, std;
  - warm-up: one draw per step over the first `--warmup` plain-LoRA training steps (the user's
    measure-only warm-up, measured on θ_i before step i's update): baseline = mean;
  - drift: d over `--draws` draws after each of `--steps` plain-LoRA training steps: mean, std,
    signal-to-noise (mean_t - mean_0) / std_0, and what the user's law gives there
    (delta = max(0, d - base_scale * baseline), gamma = clip(1 / (1 + k delta), gamma_min, 1)).
The drift is that of plain LoRA (the baseline), i.e. what the Thermostat sees before it acts.

Worlds:
  --shape demo    random-init tiny VLA of config/demo.yaml's model.tiny dims (hidden 128, 8 layers),
                  synthetic 64 px samples (CPU, minutes)
  --shape 7b      random-init OpenVLA-7B shape (models.tiny.seven_b_shape_backend; GPU, bf16),
                  synthetic 224 px samples
  --train-config  a train stage config written by `vlaforget stage-config --stage train --key RUN`
                  (e.g. config/demo.yaml's mw_downstream__icsm_hsw_thermostat__full__s42): the
                  pipeline's own teacher, probe.pt, ICSM artifacts and training data

    .venv/bin/python bench/thermostat_noise.py --shape demo --json docs/bench-results/X.json
    python bench/thermostat_noise.py --shape 7b --n-probe 500 --r 128 --lr 5e-4 --grad-ckpt \
        --steps 10,100 --json OUT.json                                                   (GPU)
Recorded in docs/benchmarks.md "Issue 26: the Thermostat's drift estimators".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

COMBOS = [(e, m) for e in ("full", "paired") for m in ("raw", "normalized", "basis")]


def demo_tiny() -> dict:
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "demo.yaml").read_text())
    return dict(cfg["model"]["tiny"])


def synthetic_world(args):
    """(backend, probe samples, train dataset, device, autocast dtype) of a random-init teacher."""
    from vlaforget.bench import SyntheticDataset, make_backend
    from vlaforget.models.tiny import random_tiny_backend

    if args.shape == "7b":
        backend = make_backend("7b", args.layers, "bf16")
        size, adim = 224, 7
    else:
        backend = random_tiny_backend(demo_tiny(), action_dim=4, seed=0)
        size, adim = 64, 4
    train = SyntheticDataset(4096, image_size=size, action_dim=adim, seed=0)
    probe = SyntheticDataset(args.n_probe, image_size=size, action_dim=adim, seed=1)
    backend.set_stats(train.statistics)
    return backend, [probe[i] for i in range(args.n_probe)], train, None


def pipeline_world(args):
    """The same from a train stage config: the pipeline's teacher, probe set and training data."""
    import yaml

    from vlaforget.data.cache import CachedDataset
    from vlaforget.data.probe import load_probe
    from vlaforget.models import load_backend

    sc = yaml.safe_load(Path(args.train_config).read_text())
    probe = load_probe(sc["probe_dir"])
    pds = CachedDataset(probe["dataset"]["cache_dir"], split=probe.get("split", "train"))
    train = CachedDataset(
        sc["dataset"]["cache_dir"], split="train", shots=sc.get("shots"), seed=int(sc["seed"])
    )
    backend = load_backend(sc["model"], stats=train.statistics)
    samples = [pds[int(i)] for i in probe["indices"]]
    return backend, samples, train, probe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["demo", "7b"], default="demo")
    ap.add_argument("--train-config", default=None, help="a train stage config (overrides --shape)")
    ap.add_argument("--layers", type=int, default=None, help="7b: decoder layers (default 32)")
    ap.add_argument("--n-probe", type=int, default=128, help="synthetic probe set size (demo 128, real 500)")
    ap.add_argument("--r", type=int, default=32, help="basis directions (demo icsm.r 32, real 128)")
    ap.add_argument("--probe-batches", default="4,32", help="probe draw sizes (the user's 4; earlier 32/64)")
    ap.add_argument("--draws", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=20, help="measure-only steps (one draw each) -> baseline")
    ap.add_argument("--steps", default="10,30,100", help="measure after these training steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (7b at batch 16)")
    ap.add_argument("--base-scale", type=float, default=0.5)
    ap.add_argument("--k", type=float, default=0.01)
    ap.add_argument("--gamma-min", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from vlaforget.methods.icsm import covariance, layer_groups, representative_layers, svd_directions
    from vlaforget.models.features import pooled_states
    from vlaforget.train.icsm_adapter import IcsmView
    from vlaforget.train.loop import apply_lora
    from vlaforget.train.plugins import ThermostatPlugin

    torch.manual_seed(0)
    t0 = time.perf_counter()
    world = pipeline_world(args) if args.train_config else synthetic_world(args)
    backend, samples, train, probe = world
    cuda = torch.cuda.is_available()
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    L = backend.num_layers
    dev = "cuda" if cuda else "cpu"
    if probe is not None:  # the pipeline's ICSM artifacts and pooled teacher states
        import yaml

        art = IcsmView.load(yaml.safe_load(Path(args.train_config).read_text())["icsm_dir"])
        reps = list(art.rep_layers)
        teacher = {r: probe["pooled"][r].float() for r in reps}
        C_T, basis = art.C_T, art.basis
    else:  # the probe stage's and icsm stage's quantities, computed here (no sensitivity needed)
        reps = representative_layers(layer_groups(L))
        backend.model.eval()
        with torch.no_grad(), autocast():
            teacher, _ = pooled_states(backend, samples, 16, layers=reps)
        teacher = {r: teacher[r].float() for r in reps}
        C_T = {r: covariance(teacher[r]) for r in reps}
        basis = {r: svd_directions(teacher[r], args.r)["U"] for r in reps}
    icsm = SimpleNamespace(
        rep_layers=reps, C_T={r: C_T[r].to(dev) for r in reps}, basis={r: basis[r].to(dev) for r in reps}
    )
    teacher = {r: X.to(dev) for r, X in teacher.items()}
    for p in backend.model.parameters():
        p.requires_grad_(False)
    if args.grad_ckpt:
        backend.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(
        backend,
        {
            "r": args.lora_r,
            "alpha": min(args.lora_r, 16),
            "dropout": 0.0,
            "targets": ["attn", "mlp", "vision", "projector"],
            "layers": "all",
        },
        0,
    )
    ctx = SimpleNamespaceCtx(backend, model, autocast, args.batch)
    pbs = [int(x) for x in args.probe_batches.split(",")]
    # one plug-in per (probe batch, estimator, metric); the same draws for all (one student forward)
    plug = {
        (pb, e, m): ThermostatPlugin(
            ctx,
            {"metric": m, "estimator": e, "probe_batch": pb, "probe_chunk": 16},
            icsm,
            samples,
            0,
            teacher_pooled=teacher,
        )
        for pb in pbs
        for e, m in COMBOS
    }
    gens = {pb: torch.Generator().manual_seed(1000 + pb) for pb in pbs}

    def measure_all(n_draws: int) -> dict:
        out = {k: [] for k in plug}
        for pb in pbs:
            for _ in range(n_draws):
                idx = torch.randperm(len(samples), generator=gens[pb])[:pb].tolist()
                stu = plug[(pb, "full", "raw")].pooled(idx)
                for e, m in COMBOS:
                    out[(pb, e, m)].append(plug[(pb, e, m)].measure(idx, student=stu)[0])
        return out

    res = {"noise": {}, "warmup": {}, "after": {}}
    res["noise"] = measure_all(args.draws)  # student = teacher
    steps = sorted(int(x) for x in args.steps.split(","))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    warm = {k: [] for k in plug}
    losses = []
    for step in range(max(steps)):
        if step < args.warmup:  # the user's warm-up: θ_step, before its update
            for k, v in measure_all(1).items():
                warm[k] += v
        idx = torch.randint(len(train), (args.batch,), generator=g).tolist()
        batch = backend.collate([train[i] for i in idx])
        with autocast():
            out = backend.forward(batch, model=model)
            loss = backend.action_metrics(batch, out.logits)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step + 1 in steps:
            res["after"][step + 1] = measure_all(args.draws)
            print(
                f"step {step + 1}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
            )
    res["warmup"] = warm

    def stats(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std()) if len(xs) > 1 else 0.0, "n": len(xs)}

    table = []
    for k in plug:
        pb, e, m = k
        n0 = stats(res["noise"][k])
        base = stats(warm[k])["mean"] if warm[k] else None
        row = {
            "probe_batch": pb,
            "estimator": e,
            "metric": m,
            "noise_at_teacher": n0,
            "warmup_baseline": base,
            "after": {},
        }
        for s, meas in res["after"].items():
            st = stats(meas[k])
            snr = (st["mean"] - n0["mean"]) / n0["std"] if n0["std"] > 0 else None  # None: no noise (paired)
            delta = max(0.0, st["mean"] - args.base_scale * base) if base is not None else None
            gamma = None if delta is None else max(args.gamma_min, 1.0 / (1.0 + args.k * delta))
            row["after"][str(s)] = {**st, "snr": snr, "user_law_delta": delta, "user_law_gamma": gamma}
        table.append(row)
        aft = " ".join(
            f"{s}:{row['after'][str(s)]['mean']:.4g}±{row['after'][str(s)]['std']:.2g}" for s in steps
        )
        print(f"pb {pb:3d} {e:6s} {m:10s} noise {n0['mean']:.4g}±{n0['std']:.2g}  base {base:.4g}  {aft}")
    summary = {
        "bench": "thermostat_noise",
        "world": args.train_config or f"random-init {args.shape} shape",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "hidden_size": backend.hidden_size,
        "num_layers": L,
        "reps": reps,
        "n_probe": len(samples),
        "draws": args.draws,
        "warmup": args.warmup,
        "train": {
            "steps": steps,
            "batch": args.batch,
            "lr": args.lr,
            "lora_r": args.lora_r,
            "losses": losses,
        },
        "user_law": {"base_scale": args.base_scale, "k": args.k, "gamma_min": args.gamma_min},
        "command": " ".join(sys.argv),
        "wall_s": round(time.perf_counter() - t0, 1),
        "rows": table,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


class SimpleNamespaceCtx:
    """The TrainContext fields the Thermostat plug-in's measurement reads."""

    def __init__(self, backend, model, autocast, batch):
        self.backend, self.model, self.autocast = backend, model, autocast
        self.stage_cfg = {"train": {"batch_size": batch}}
        self.plugins, self.world_size = {}, 1


if __name__ == "__main__":
    sys.exit(main())
