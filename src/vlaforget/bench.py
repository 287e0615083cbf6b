"""`vlaforget bench`: speed and memory measurements recorded in docs/benchmarks.md.

At OpenVLA-7B shape a randomly initialised model measures speed and memory truthfully: the stand-in
(models.tiny.seven_b_shape_backend: Llama-2-7B decoder + DINOv2-L- and SigLIP-so400m-shaped towers
fused as prismatic does, fused projector) or, with --backend openvla and openvla's modelling code in
VLAFORGET_OPENVLA_CODE, OpenVLA-7B's real architecture built on the GPU with random weights
(models.openvla_tiny.full_size_backend). Synthetic samples (random 224 px images, real instruction
text, random actions) stand in for LIBERO data. --memory-cap-gib caps this process's CUDA memory at
a smaller card's (torch.cuda.set_per_process_memory_fraction).

    vlaforget bench icsm  --out DIR            probe + ICSM wall time (500 probes, r 128, 128 samples)
    vlaforget bench train --icsm-dir DIR       step time + peak memory: baseline / method / CRaFT
                                               (--methods ...,peft_reference: plain PEFT LoRA on HF LLaVA)
    (torchrun --standalone --nproc-per-node 2 -m vlaforget.cli bench train ...)  DDP on 2 GPUs
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("vlaforget.bench")

INSTRUCTIONS = [
    "put the black bowl on the plate",
    "open the top drawer of the cabinet",
    "pick up the alphabet soup and place it in the basket",
    "turn on the stove",
    "push the plate to the front of the stove",
    "put the cream cheese in the bowl",
]


class SyntheticDataset:
    """CachedDataset-shaped stand-in: deterministic random samples generated on access (O(1) RAM)."""

    def __init__(
        self, n: int, image_size: int = 224, action_dim: int = 7, seed: int = 0, name: str = "synthetic"
    ):
        from .models.tiny import default_stats

        self.n, self.image_size, self.action_dim, self.seed, self.name = n, image_size, action_dim, seed, name
        self.statistics = default_stats(action_dim)
        self.episodes = [
            {"index": 0, "task": "synthetic", "instruction": INSTRUCTIONS[0], "start": 0, "length": n}
        ]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        return {
            "image": rng.integers(0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8),
            "instruction": INSTRUCTIONS[int(i) % len(INSTRUCTIONS)],
            "action": rng.uniform(-1, 1, self.action_dim).astype(np.float32),
            "state": np.zeros(8, np.float32),
            "env_state": None,
            "task": "synthetic",
            "episode": 0,
            "step": int(i),
        }


def _device() -> str:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)  # under torchrun each rank builds its model on its own GPU
        return f"cuda:{local}"
    return "cpu"


def make_backend(shape: str, layers: int | None = None, precision: str = "bf16", backend: str = "standin"):
    """The benchmark's model. backend "standin": models.tiny's 7B-shape stand-in (shape 7b) or the toy
    (shape tiny); "openvla": OpenVLA-7B's real architecture from openvla's code (VLAFORGET_OPENVLA_CODE)
    at full size, random weights, built on the device (shape 7b only)."""
    from .models.tiny import random_tiny_backend, seven_b_shape_backend

    # weights in the profile's model.dtype: fp16 on V100s (profile_v100x8), bf16 otherwise
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(precision, torch.bfloat16)
    if not _device().startswith("cuda"):
        dtype = torch.float32
    if backend == "openvla":
        from .models.openvla_tiny import full_size_backend

        if shape != "7b":
            raise SystemExit("bench: --backend openvla builds OpenVLA-7B at full size; use --shape 7b")
        return full_size_backend(
            os.environ.get("VLAFORGET_OPENVLA_CODE"), device=_device(), dtype=dtype, layers=layers
        )
    if shape == "7b":
        return seven_b_shape_backend(device=_device(), dtype=dtype, layers=layers)
    return random_tiny_backend(action_dim=7, device=_device())


def apply_memory_cap(cap_gib: float | None) -> dict:
    """Cap this process's CUDA caching allocator at `cap_gib` GiB (a smaller card's usable memory,
    e.g. 23.5 for a 24 GB RTX 4090): allocations past it raise OutOfMemoryError as on that card."""
    if not cap_gib or not torch.cuda.is_available():
        return {}
    dev = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(dev).total_memory
    frac = min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(frac, dev)
    return {"memory_cap_gib": cap_gib, "memory_fraction": frac, "device_total_gib": total / 2**30}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- icsm


def bench_icsm(args) -> dict:
    """Probe forward over n_probe samples + per representative layer SVD + sensitivity, timed; writes
    artifacts in the icsm stage's format so `bench train` can use them."""
    from .io import atomic_torch_save, write_json
    from .methods.icsm import compute_layer, layer_groups, representative_layers
    from .models.features import pooled_states

    torch.manual_seed(0)
    backend = make_backend(args.shape, args.layers, backend=args.backend)
    backend.model.eval()
    for p in backend.model.parameters():
        p.requires_grad_(False)
    ds = SyntheticDataset(args.n_probe)
    samples = [ds[i] for i in range(args.n_probe)]
    L = backend.num_layers
    groups = layer_groups(L)
    reps = representative_layers(groups)
    icfg = {
        "r": args.r,
        "sensitivity_samples": args.sens,
        "direction_batch": args.direction_batch,
    }  # defaults
    _sync()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=_device().startswith("cuda")):
        pooled, empty = pooled_states(backend, samples, args.probe_batch, layers=reps, show_progress=True)
    _sync()
    t_probe = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {"probe_forward_s": round(t_probe, 1)}
    layers_meta = {}
    for rep in reps:
        t1 = time.perf_counter()
        res = compute_layer(backend, pooled[rep].float(), samples[: args.sens], rep, icfg, show_progress=True)
        _sync()
        timings[f"icsm_L{rep}_s"] = round(time.perf_counter() - t1, 1)
        sp = res["split"]
        for name, t in {
            f"U{rep}_f.pt": sp["U_f"],
            f"U{rep}_p.pt": sp["U_p"],
            f"mu{rep}.pt": res["mu"],
            f"C_T{rep}.pt": res["C_T"],
        }.items():
            atomic_torch_save(t.contiguous(), out / name)
        atomic_torch_save(
            {
                "U": res["U"],
                "S": res["S"],
                "std": res["std"],
                "explained": res["explained"],
                "scores": res["scores"],
                "order": sp["order"],
            },
            out / f"basis{rep}.pt",
        )
        layers_meta[str(rep)] = {
            "n_f": sp["n_f"],
            "n_p": sp["n_p"],
            "kl_max": float(res["scores"].max()),
            "kl_median": float(res["scores"].median()),
        }
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    meta = {
        "num_layers": L,
        "hidden_size": backend.hidden_size,
        "groups": groups,
        "rep_layers": reps,
        "r": args.r,
        "fragile_dim": None,
        "plastic_dim": None,
        "n_probe": args.n_probe,
        "n_empty": int(empty.sum()),
        "sensitivity_samples": args.sens,
        "layers": layers_meta,
        "timings": timings,
        "benchmark": True,
        "device": _device_name(),
        "probe_hash": "synthetic",
    }
    write_json(out / "meta.json", meta)
    return {
        "bench": "icsm",
        "shape": args.shape,
        "device": _device_name(),
        **timings,
        "n_probe": args.n_probe,
        "r": args.r,
        "sensitivity_samples": args.sens,
    }


# ----------------------------------------------------------------------------- train


def bench_train(args) -> dict:
    """Step time and peak memory of each method with the real training loop. --methods takes
    variants: a method (baseline, icsm_hsw_thermostat, craft, peft_reference) with modifiers
    `+fused_optimizer` (train.fused_optimizer), `+compile` (train.compile), `+separate` (CRaFT's
    separate retention pass, method.craft.fused_forward false), `+no_input_cast` (train.lora_input_cast false)."""
    results = {}
    rank = int(os.environ.get("RANK", "0"))
    args.cap_info = apply_memory_cap(args.memory_cap_gib)
    methods = args.methods.split(",")
    for variant in methods:  # checked before anything runs
        bad = set(variant.split("+")[1:]) - set(VARIANT_MODS)
        if bad:
            raise SystemExit(
                f"bench train: unknown variant modifier(s) {sorted(bad)} in '{variant}': use {VARIANT_MODS}"
            )
    for variant in methods:
        method, *mods = variant.split("+")  # e.g. baseline+fused_optimizer+compile, craft+separate
        if method == "peft_reference":
            if rank == 0:
                oom = None
                try:
                    results[variant] = bench_peft_reference(args)
                except (
                    torch.cuda.OutOfMemoryError
                ) as e:  # under --memory-cap-gib: recorded, then timed uncapped
                    oom = f"OutOfMemoryError: {str(e)[:300]}"
                if oom is not None:  # outside the except: its traceback (holding the model) is gone
                    log.warning("peft_reference: out of memory under the cap; timing it uncapped")
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    results[variant] = {**bench_peft_reference(args), "uncapped": True, "capped_error": oom}
                    apply_memory_cap(args.memory_cap_gib)
                log.info("%s: %s", variant, results[variant])
                _write_partial(args, results)
            continue
        try:
            res = _bench_variant(args, method, mods, variant, rank)
        except Exception as e:  # a variant that fails (e.g. torch.compile) is recorded, the others still run
            log.exception("%s failed", variant)
            import traceback

            # the failing frames too: an out-of-memory's error text says how much, not where
            res = {
                "error": f"{type(e).__name__}: {str(e)[:500]}",
                "traceback": traceback.format_exc()[-4000:],
            }
            if isinstance(e, torch.cuda.OutOfMemoryError):  # what holds the memory, by block size
                res["memory_summary"] = torch.cuda.memory_summary(abbreviated=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if rank == 0 and res is not None:
            results[variant] = res
            _write_partial(args, results)
    return _summary(args, results)


VARIANT_MODS = ("fused_optimizer", "compile", "separate", "no_input_cast")


def _write_partial(args, results) -> None:
    """The results so far (a run cut short by its time limit keeps what it measured)."""
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        Path(args.json).write_text(json.dumps(_summary(args, results), indent=2))


def _bench_variant(args, method: str, mods: list, variant: str, rank: int) -> dict | None:
    from .methods.craft import anchor_features
    from .study import method_defaults
    from .train.loop import run_training

    torch.manual_seed(0)
    gc.collect()  # the previous method's model (hooks make reference cycles) must be gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    backend = make_backend(args.shape, args.layers, args.precision, args.backend)
    for p in backend.model.parameters():
        p.requires_grad_(False)
    ds = SyntheticDataset(4096)
    mcfg = method_defaults()  # every plug-in block, off
    given = {}
    if method == "icsm_hsw_thermostat" and args.thermostat_law == "user":
        # the method as the study runs it (issue 26): settings.HswSettings / ThermostatSettings'
        # defaults — HSW flowing down with the user's per-tensor clamp, the user's law (a
        # measure-only warm-up measuring every step, then every `every` steps) and the paired
        # estimator on probe_batch samples, whose teacher states come from one frozen forward here
        # (the probe stage's job in the pipeline)
        from .methods.icsm import layer_groups, representative_layers
        from .models.features import pooled_states

        mcfg["hsw"] = {"enabled": True}
        mcfg["thermostat"] = {"enabled": True, "probe_chunk": args.thermostat_chunk}
        if args.thermostat_warmup is not None:
            mcfg["thermostat"]["warmup_steps"] = args.thermostat_warmup
        probes = [SyntheticDataset(args.thermostat_probes, seed=1)[i] for i in range(args.thermostat_probes)]
        backend.set_stats(ds.statistics)
        reps = representative_layers(layer_groups(backend.num_layers))
        adt = torch.float16 if args.precision == "fp16" else torch.bfloat16
        with torch.no_grad(), torch.autocast("cuda", dtype=adt, enabled=_device().startswith("cuda")):
            pooled, _ = pooled_states(backend, probes, 8, layers=reps)
        given["probe_samples"] = probes
        given["probe_pooled"] = {int(r): pooled[r].float().cpu() for r in reps}
    elif method == "icsm_hsw_thermostat":
        # law "calibrated": the measurement the earlier benchmarks timed (docs/benchmarks.md "Issue
        # 16"); keys not named here: settings' defaults; the clamp and eps those benchmarks timed
        mcfg["hsw"] = {"enabled": True, "clamp": "per_token", "eps": 1e-12}
        # the measurement the earlier benchmarks timed (docs/benchmarks.md "Issue 16"): the calibrated
        # law, 64 probes against the whole-probe C_T; the user's law measures 4 probes per step
        mcfg["thermostat"] = {
            "enabled": True,
            "law": "calibrated",
            "estimator": "full",
            "every": args.thermostat_every,
            "probe_batch": 64,
            "warmup_measurements": 2,
            "metric": "basis",
            "gamma_min": 0.0,
            "probe_chunk": args.thermostat_chunk,
        }
        given["probe_samples"] = [SyntheticDataset(500, seed=1)[i] for i in range(500)]
    elif method == "craft":
        mcfg["craft"] = {
            "enabled": True,
            "anchor": "mean_image_tokens",
            "anchor_batch_size": args.anchor_batch,
        }
        asamples = [SyntheticDataset(64, seed=2)[i] for i in range(64)]
        backend.set_stats(ds.statistics)
        adt = torch.float16 if args.precision == "fp16" else torch.bfloat16
        with torch.no_grad(), torch.autocast("cuda", dtype=adt, enabled=_device().startswith("cuda")):
            feats = anchor_features(backend, asamples, -2, 8)
        given["anchors"] = {
            "indices": torch.arange(64),
            "features": feats["mean_image_tokens"],
            "features_by_pooling": feats,
            "layer": -2,
            "pooling": "mean_image_tokens",
        }
        given["anchor_samples"] = asamples
    if method == "craft":
        mcfg["craft"]["fused_forward"] = "separate" not in mods
    tmp = Path(tempfile.mkdtemp(prefix="vlaforget-bench-"))
    sc = {
        "stage": "train",
        "root": str(tmp),
        "run_name": f"bench__{method}",
        "run_id": f"bench-{method}",
        "method_name": method,
        "suite": "synthetic",
        "shots": None,
        "seed": 0,
        "model": {"backend": backend.name, "base": "7b-shape"},
        "dataset": {"name": "synthetic"},
        "method": mcfg,
        "out_dir": str(tmp / "run"),
        "icsm_dir": args.icsm_dir,
        # train keys not named here: settings.TrainSettings' defaults
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "grad_accum": args.accum,
            "lr": 5e-4,
            "precision": args.precision,
            "gradient_checkpointing": args.grad_ckpt,
            "image_aug": False,
            "fused_optimizer": "fused_optimizer" in mods,
            "compile": "compile" in mods,
            "lora_input_cast": "no_input_cast" not in mods,
            "save_steps": args.save_every or 10**9,
            "log_every": 1,
            "num_workers": args.num_workers,
            "eval_every": args.eval_every,
            "lora": {"r": args.lora_r, "alpha": min(args.lora_r, 16)},
        },
    }
    os.environ.setdefault("VLAFORGET_ROOT", str(tmp))
    backend.set_stats(ds.statistics)
    seq_len = int(backend.collate([ds[i] for i in range(4)])["input_ids"].shape[1]) + backend.n_image_tokens
    evals = []
    eval_batch = [SyntheticDataset(args.eval_batch, seed=3)[i] for i in range(args.eval_batch)]

    def evaluator(b, model):  # the periodic evaluation's policy call: one batched greedy forward
        _sync()
        t0 = time.perf_counter()
        b.predict_actions(
            np.stack([x["image"] for x in eval_batch]), [x["instruction"] for x in eval_batch], model=model
        )
        _sync()
        evals.append(time.perf_counter() - t0)
        return 0.0

    ev = evaluator if args.eval_every else None
    if args.profile:
        prof_text = _profiled(
            lambda sc=sc, b=backend, ds=ds, given=given: run_training(
                sc, backend=b, dataset=ds, teacher_inputs=given, evaluator=ev
            )
        )
        if args.json and rank == 0:
            Path(f"{args.json}.profile_{variant}.txt").write_text(prof_text)
    else:
        run_training(sc, backend=backend, dataset=ds, teacher_inputs=given, evaluator=ev)
    res = None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    allocated = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    merge = {}
    if args.export_merge and rank == 0:
        try:  # the training's numbers above stand whatever the merge does
            merge = _export_merge(backend)
        except torch.cuda.OutOfMemoryError as e:
            merge = {"export_merge_error": f"OutOfMemoryError: {str(e)[:300]}"}
    recs = (
        [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    )
    recs = [r for r in recs if "step_time_s" in r]  # the periodic evaluation's records carry a score only
    timed = [r["step_time_s"] for r in recs if r["step"] > args.warmup]
    if rank == 0:
        res = {
            "step_time_s_median": float(np.median(timed)),
            "step_time_s_mean": float(np.mean(timed)),
            "step_times_s": [round(float(t), 4) for t in timed],
            "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in recs),
            "peak_reserved_gib": reserved,
            "seq_len": seq_len,
            "samples_per_s": args.batch * args.accum / float(np.median(timed)),
            "steps_timed": len(timed),
            "final_loss": recs[-1]["train_loss"],
            "peak_allocated_gib_run": allocated,
            "eval_forward_s": [round(t, 3) for t in evals],
            "checkpoints_kept": len(list((tmp / "run" / "checkpoints").rglob("*.pt")))
            if (tmp / "run" / "checkpoints").exists()
            else 0,
            **merge,
            "skipped_steps": recs[-1].get("skipped_steps", 0),
            "loss_scale": recs[-1].get("loss_scale"),
            "thermostat_measurements": sum("drift_d" in r for r in recs),
            **({"thermostat_law": args.thermostat_law} if method == "icsm_hsw_thermostat" else {}),
        }
        ttimes = [r["thermostat_time_s"] for r in recs if "thermostat_time_s" in r]
        if ttimes:
            per = float(np.median(ttimes))
            res["thermostat_time_s_median"] = per
            res["thermostat_every_config"] = args.amortise_every
            # the K-step measurement amortised over K (config thermostat.every), on top of the
            # median of the steps without a measurement
            plain = [
                r["step_time_s"] for r in recs if r["step"] > args.warmup and "thermostat_time_s" not in r
            ]
            res["step_time_s_median_no_measure"] = float(np.median(plain))
            res["step_time_s_amortised"] = float(np.median(plain)) + per / args.amortise_every
        log.info("%s: %s", variant, res)
    del backend
    gc.collect()
    return res if rank == 0 else None


def _export_merge(backend) -> dict:
    """The export stage's merge (PEFT merge_and_unload: W += B A per LoRA layer), timed, with the
    peak memory it reaches on top of the trained model.

    The export stage loads the saved adapter into a fresh base model, where peft < 0.12 (the user's
    0.11.1) creates the LoRA in the base weights' dtype. The trained model here has fp32 LoRA under
    fp16 (train.loop.prepare_model: GradScaler needs fp32 gradients), and peft 0.11.1's merge writes
    `W = W + ΔW`, so an fp32 ΔW turned every merged fp16 weight into fp32: the 7B model grew to ~28
    GiB and ran out of memory under a V100's cap (issue 28 run 3) — a fault of this emulation, not of
    the export stage. So each layer's LoRA is cast to its base weight's dtype first, as the export
    stage's loading does; the merged weights keep their dtype (checked after the merge)."""
    from peft.tuners.lora import LoraLayer

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        n = 0
        for m in backend.model.modules():
            if isinstance(m, LoraLayer):
                base = m.get_base_layer().weight
                dtype = base.dtype
                for p in m.parameters():
                    if p is not base and p.is_floating_point() and p.dtype != dtype:
                        p.data = p.data.to(dtype)
                m.merge()
                if m.get_base_layer().weight.dtype != dtype:
                    raise RuntimeError(
                        f"export merge changed a weight's dtype {dtype} -> {m.get_base_layer().weight.dtype}"
                    )
                n += 1
    _sync()
    out = {"export_merge_s": round(time.perf_counter() - t0, 2), "export_merged_layers": n}
    if torch.cuda.is_available():
        out["export_merge_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["export_merge_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def _summary(args, results: dict) -> dict:
    out = {
        "bench": "train",
        "shape": args.shape,
        "backend": args.backend,
        **getattr(args, "cap_info", {}),
        "device": _device_name(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "precision": args.precision,
        "batch": args.batch,
        "grad_accum": args.accum,
        "grad_ckpt": args.grad_ckpt,
        "lora_r": args.lora_r,
        "steps": args.steps,
        "anchor_batch": args.anchor_batch,
        "num_workers": args.num_workers,
        **_versions(),
        "warmup_excluded": args.warmup,
        "methods": results,
    }
    ok = {m: r for m, r in results.items() if "error" not in r}
    if "baseline" in ok:
        base = ok["baseline"]["step_time_s_median"]
        out["overhead_vs_baseline"] = {
            m: r.get("step_time_s_amortised", r["step_time_s_median"]) / base - 1 for m, r in ok.items()
        }
        out["peak_mem_vs_baseline_gib"] = {
            m: r.get("peak_mem_gib", 0.0) - ok["baseline"]["peak_mem_gib"] for m, r in ok.items()
        }
        if "peft_reference" in ok:
            out["baseline_vs_peft_reference_samples_per_s"] = (
                ok["baseline"]["samples_per_s"] / ok["peft_reference"]["samples_per_s"]
            )
    if "peft_reference" in ok:  # every variant's throughput against the reference (issue 16: >= 1.3)
        out["samples_per_s_vs_peft_reference"] = {
            m: r["samples_per_s"] / ok["peft_reference"]["samples_per_s"]
            for m, r in ok.items()
            if "samples_per_s" in r
        }
    return out


def _profiled(fn) -> str:
    """Run fn under torch.profiler with the CRaFT / Thermostat / forward pieces labelled; the
    labelled rows and the top kernels by self CUDA time, as text."""
    from .methods import craft as craft_mod
    from .models.base import VLABackend
    from .train import plugins

    def label(owner, name):
        f = getattr(owner, name)

        def g(*a, **k):  # synchronised: the label's CPU time is the piece's wall time
            _sync()
            with torch.profiler.record_function(f"@{name}"):
                out = f(*a, **k)
                _sync()
            return out

        setattr(owner, name, g)
        return owner, name, f

    saved = [
        label(plugins.CraftPlugin, "retention_loss"),
        label(plugins.CraftPlugin, "before_step"),
        label(plugins.ThermostatPlugin, "measure"),
        label(craft_mod, "conflict_project"),
        label(craft_mod, "combine"),
        label(VLABackend, "forward"),
        label(VLABackend, "collate"),
    ]
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    try:
        with torch.profiler.profile(activities=acts) as prof:
            fn()
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)
    ev = prof.key_averages()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    labelled = [e for e in ev if e.key.startswith("@")]
    lines = ["labelled (whole run): name, calls, cpu_total_ms, device_total_ms"]
    for e in labelled:
        dev = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
        lines.append(f"{e.key}, {e.count}, {e.cpu_time_total / 1e3:.1f}, {dev / 1e3:.1f}")
    lines.append("")
    lines.append(ev.table(sort_by=key, row_limit=30))
    return "\n".join(lines)


def _versions() -> dict:
    import transformers

    try:
        import peft

        pv = peft.__version__
    except ImportError:
        pv = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": pv}


def llava_reference_model(shape: str, device: str, dtype: torch.dtype):
    """Plain HF LLaVA wiring at OpenVLA-7B shape (Llama-2-7B decoder + SigLIP-so400m tower, MLP
    projector, sdpa attention), random init: the reference the training loop is measured against.

    ONE tower: HF's LlavaForConditionalGeneration takes a single vision_config; the DINOv2 + SigLIP
    fusion exists only in prismatic's code, so with --backend openvla the reference is openvla's own
    model under plain PEFT instead (bench_peft_reference). This one lacks DINOv2-L's 0.3 B parameters
    and its activations, so its samples/s flatter the reference."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from .models.tiny import SEVEN_B_SHAPE

    if shape == "7b":
        vis = SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        )
        txt = LlamaConfig(
            hidden_size=SEVEN_B_SHAPE["hidden"],
            intermediate_size=SEVEN_B_SHAPE["intermediate"],
            num_hidden_layers=SEVEN_B_SHAPE["layers"],
            num_attention_heads=SEVEN_B_SHAPE["heads"],
            num_key_value_heads=SEVEN_B_SHAPE["heads"],
            vocab_size=32064,
            max_position_embeddings=2048,
        )
    else:  # CPU smoke test
        vis = SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
        )
        txt = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=32064,
            max_position_embeddings=2048,
        )
    cfg = LlavaConfig(
        vision_config=vis,
        text_config=txt,
        image_token_index=32001,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model


def bench_peft_reference(args) -> dict:
    """Plain PEFT LoRA fine-tuning of the LLaVA reference (same LoRA targets, r, AdamW, checkpointing,
    bf16 autocast, micro-batch x accum as the loop's run), no vlaforget code in the step."""
    from peft import LoraConfig, get_peft_model

    gc.collect()
    dev = _device()
    on_gpu = dev.startswith("cuda")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    dtype = (torch.float16 if args.precision == "fp16" else torch.bfloat16) if on_gpu else torch.float32
    openvla = getattr(args, "backend", "standin") == "openvla"
    if openvla:  # openvla's own model and finetune.py's recipe (PEFT on every Linear, model(**batch).loss)
        model = make_backend(args.shape, args.layers, args.precision, "openvla").model
    else:
        model = llava_reference_model(args.shape, dev, dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lin = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r,
            lora_alpha=min(args.lora_r, 16),
            lora_dropout=0.0,
            target_modules=lin,
            init_lora_weights="gaussian",
            bias="none",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    b, n_img = args.batch, 256
    text = 30  # ~ the loop's prompt + 7 action tokens + </s> on LIBERO-like instructions
    g = torch.Generator().manual_seed(0)
    # LLaVA: one placeholder id per patch in input_ids; openvla inserts the patches after <s> itself
    ids = torch.randint(3, 31999, (b, 1 + (0 if openvla else n_img) + text), generator=g)
    if not openvla:
        ids[:, 1 : 1 + n_img] = 32001
    channels = 6 if openvla else 3  # openvla: the two towers' normalisations stacked
    labels = torch.full_like(ids, -100)
    labels[:, -8:] = ids[:, -8:]
    batch = {
        "input_ids": ids.to(dev),
        "attention_mask": torch.ones_like(ids).to(dev),
        "labels": labels.to(dev),
    }
    times = []
    for _step in range(args.steps):
        _sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(args.accum):
            pix = torch.rand(b, channels, 224, 224, generator=g).to(dev, dtype)
            with torch.autocast("cuda", dtype=dtype, enabled=on_gpu):
                loss = model(**batch, pixel_values=pix).loss / args.accum
            loss.backward()
        opt.step()
        _sync()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    res = {
        "step_time_s_median": float(np.median(timed)),
        "step_time_s_mean": float(np.mean(timed)),
        "peak_mem_gib": 0.0,
        "samples_per_s": b * args.accum / float(np.median(timed)),
        "steps_timed": len(timed),
        "seq_len": int(ids.shape[1]) + (n_img if openvla else 0),
        "final_loss": float(loss.detach()) * args.accum,
        "model": "openvla (prismatic remote code)" if openvla else "HF LlavaForConditionalGeneration",
    }
    if on_gpu:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    del model, opt, params
    gc.collect()
    return res


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def add_args(p):
    sub = p.add_subparsers(dest="what", required=True)
    pi = sub.add_parser("icsm")
    pi.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    pi.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    pi.add_argument("--n-probe", type=int, default=500)
    pi.add_argument("--probe-batch", type=int, default=16)
    pi.add_argument("--r", type=int, default=128)
    pi.add_argument("--sens", type=int, default=128)
    pi.add_argument("--direction-batch", type=int, default=16)
    pi.add_argument("--out", required=True)
    pi.add_argument("--backend", choices=["standin", "openvla"], default="standin")
    pt = sub.add_parser("train")
    pt.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    pt.add_argument("--layers", type=int, default=None)
    pt.add_argument("--methods", default="baseline,icsm_hsw_thermostat,craft")
    pt.add_argument("--icsm-dir", default=None)
    pt.add_argument("--precision", default="bf16")
    pt.add_argument("--batch", type=int, default=2)
    pt.add_argument("--accum", type=int, default=8)
    pt.add_argument("--steps", type=int, default=12)
    pt.add_argument("--warmup", type=int, default=3)
    pt.add_argument("--thermostat-every", type=int, default=5, help="measure this often in the benchmark")
    pt.add_argument("--amortise-every", type=int, default=50, help="thermostat.every to amortise over")
    pt.add_argument(
        "--thermostat-law",
        choices=["user", "calibrated"],
        default="user",
        help="the method's Thermostat: user = the study's default (measure-only warm-up, paired "
        "estimator on thermostat.probe_batch samples); calibrated = the issue-16 measurement "
        "(64 probes every --thermostat-every steps)",
    )
    pt.add_argument(
        "--thermostat-warmup", type=int, default=None, help="law user: thermostat.warmup_steps (default 100)"
    )
    pt.add_argument(
        "--thermostat-probes",
        type=int,
        default=64,
        help="law user: probe samples the paired estimator draws from",
    )
    pt.add_argument("--lora-r", type=int, default=32)
    pt.add_argument("--grad-ckpt", action="store_true")
    pt.add_argument("--anchor-batch", type=int, default=8, help="CRaFT method.craft.anchor_batch_size")
    pt.add_argument("--num-workers", type=int, default=0, help="train.num_workers (DataLoader workers)")
    pt.add_argument(
        "--thermostat-chunk", type=int, default=None, help="thermostat.probe_chunk (default: the micro-batch)"
    )
    pt.add_argument("--profile", action="store_true", help="torch.profiler tables next to --json")
    pt.add_argument(
        "--backend",
        choices=["standin", "openvla"],
        default="standin",
        help="standin: models.tiny's 7B-shape stand-in; openvla: OpenVLA-7B's real architecture "
        "from VLAFORGET_OPENVLA_CODE, random weights, built on the GPU",
    )
    pt.add_argument(
        "--memory-cap-gib",
        type=float,
        default=None,
        help="cap CUDA memory at this many GiB (torch.cuda.set_per_process_memory_fraction): "
        "23.5 = a 24 GB RTX 4090's usable memory, 31.2 = a 32 GB V100's",
    )
    pt.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="train.eval_every: a batched greedy policy call (the periodic evaluation's forward)",
    )
    pt.add_argument(
        "--eval-batch", type=int, default=8, help="observations per periodic-eval call (num_envs)"
    )
    pt.add_argument("--save-every", type=int, default=0, help="train.save_steps (0: only at the end)")
    pt.add_argument(
        "--export-merge",
        action="store_true",
        help="after training, merge the LoRA into the weights as the export stage does (timed)",
    )
    for q in (pi, pt):
        q.add_argument("--json", default=None, help="also write the result here")


def main(args) -> int:
    res = bench_icsm(args) if args.what == "icsm" else bench_train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        text = json.dumps(res, indent=2)
        print(text)
        if args.json:
            Path(args.json).write_text(text)
    return 0
