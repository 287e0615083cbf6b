"""The one training loop: baseline LoRA, ICSM + HSW + Thermostat, CRaFT and every ablation.

Read top to bottom from _train: _setup_run (distributed, data, model + LoRA, plug-ins, optimizer),
_resume, _start_run, then per optimizer step _micro_batches (forward → loss → backward) → _guard
(NaN / overflow) → _optimizer_step (step → controllers) → _log_step → _checkpoint_and_eval, and
_finish (final adapter). Methods only plug in (train/plugins/<name>.py, loaded by name, talking to the
loop through the Plugin protocol's hooks alone); with none enabled this is plain LoRA fine-tuning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError
from ..io import (
    DirLock,
    atomic_write_text,
    config_id,
    progress,
    provenance,
    replace_dir,
    seed_everything,
    sha256_file,
    write_json,
)
from ..paths import apply_job_env
from ..settings import LoraSettings, MethodSettings, TrainSettings
from . import checkpoint as ckpt
from . import init_adapter
from . import plugins as plugin_registry
from .distributed import DistInfo, all_reduce_flat, cleanup_distributed, init_distributed, on_main, unwrap
from .plugins import TrainContext, forward_micro
from .schedule import warmup_schedule
from .speed import check_compile, compile_layers, make_optimizer, skip_lora_input_cast

log = logging.getLogger("vlaforget.train")


# ----------------------------------------------------------------------------- data order


class StepSampler:
    """Deterministic, resumable sample order: a seeded permutation per epoch; position = (epoch, i)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return perm[self.rank :: self.world]  # each rank its own shard

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self._perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make_perm()
            take = min(k - len(out), len(self._perm) - self.pos)
            out.extend(int(i) for i in self._perm[self.pos : self.pos + take])
            self.pos += take
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._perm = self._make_perm()


# ----------------------------------------------------------------------------- helpers


def make_schedule(optimizer, tcfg: TrainSettings | dict, start: int = 0):
    """train.lr_schedule over max_steps with train.warmup_steps, decaying to train.min_lr (its floor
    as a fraction of train.lr); start: the step it continues from (train.init_step)."""
    ts = TrainSettings.of(tcfg)
    floor = (ts.min_lr or 0.0) / ts.lr if ts.lr else 0.0
    return warmup_schedule(optimizer, ts.max_steps, ts.warmup_steps, ts.lr_schedule, floor=floor, start=start)


def autocast_factory(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise TrainingError(
                "train.precision is bf16 but this GPU has no bf16 support (e.g. V100): "
                "use precision: fp16 (profiles/v100x8 sets it)"
            )
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp16":  # CPU fp16 autocast: slow, but the same loss-scaling path as on a V100
        log.warning("train.precision fp16 on the CPU: correct but slow; use fp32 (or bf16) on CPU")
        return lambda: torch.autocast("cpu", dtype=torch.float16)
    raise TrainingError(f"train.precision '{precision}': choose bf16, fp16 or fp32")


def make_scaler(tcfg: TrainSettings | dict, device: torch.device):
    """fp16 loss scaling (torch.amp.GradScaler): on for precision fp16 unless train.loss_scaling is
    false; train.loss_scaling true also scales bf16/fp32 losses (tests). None when off."""
    ts = TrainSettings.of(tcfg)
    on = ts.precision == "fp16" if ts.loss_scaling is None else bool(ts.loss_scaling)
    if not on:
        return None
    return torch.amp.GradScaler(device.type, init_scale=ts.loss_scale_init)


def apply_lora(backend, lcfg: LoraSettings | dict, seed: int):
    from peft import LoraConfig, get_peft_model

    lora = LoraSettings.of(lcfg)
    torch.manual_seed(seed)  # LoRA init is seeded by the run seed
    targets = backend.lora_targets(list(lora.targets), lora.layers)
    conf = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        init_lora_weights="gaussian",
        bias="none",
    )
    model = get_peft_model(backend.model, conf)
    for n, p in model.named_parameters():  # only LoRA trains
        p.requires_grad_("lora_" in n)
    return model


def prepare_model(backend, ts: TrainSettings, seed: int):
    """The trainable model: `train.gradient_checkpointing` on every tower (the backend decides which
    modules: decoder layers, vision blocks, projector), then LoRA."""
    if ts.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    model = apply_lora(backend, ts.lora, seed)
    # fp16 weights (the V100 profile): peft < 0.12 (the user's 0.11.1) creates the LoRA in the base
    # layer's fp16, and GradScaler refuses to unscale fp16 gradients ("Attempting to unscale FP16
    # gradients"); fp32 LoRA weights, as peft >= 0.12 makes them itself (autocast_adapter_dtype).
    # bf16 LoRA stays bf16 on peft 0.11.1, as in openvla's finetune.py.
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float16:
            p.data = p.data.float()
    return model


def init_from_adapter(model, adapter_dir) -> None:
    """A chain stage (LIBERO's lifelong protocol): start the run's LoRA from the previous stage's
    trained adapter, as LIBERO's sequential learner keeps training the same network on the next task
    (fresh optimizer and schedule). The adapter must have this run's LoRA shape (r, targets)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise TrainingError(
            f"init_adapter {adapter_dir} holds no PEFT adapter (adapter_config.json "
            "missing): train the previous stage of the chain first"
        )
    have = json.loads(cfg_file.read_text())
    want = model.peft_config["default"]
    have_t, want_t = sorted(have.get("target_modules") or []), sorted(want.target_modules)
    if int(have.get("r", -1)) != int(want.r) or have_t != want_t:
        raise TrainingError(
            f"init_adapter {adapter_dir}: LoRA r={have.get('r')} on {len(have_t)} modules, "
            f"this run wants r={want.r} on {len(want_t)}: a chain keeps train.lora the "
            "same over its stages"
        )
    res = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir), device="cpu"))
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    if missing:
        raise TrainingError(
            f"init_adapter {adapter_dir}: {len(missing)} LoRA weights missing (e.g. {missing[0]})"
        )
    log.info("chain: LoRA initialised from %s", adapter_dir)


def _f(t) -> float | None:
    return None if t is None else float(t)


# ----------------------------------------------------------------------------- main


def run_training(
    sc: dict,
    stop_after: int | None = None,
    backend=None,
    dataset=None,
    teacher_inputs: dict | None = None,
    dry_run_batches: int = 0,
    evaluator: Callable[[Any, Any], float] | None = None,
) -> dict:
    """Train one run from its stage config (see _train), owning its run directory meanwhile: a second
    driver, or an orphaned trainer of a killed one, is refused with the holder's host and pid; the
    kernel drops the lock when this process ends, however it ends.

    evaluator(backend, model) -> success rate: the periodic evaluation every train.eval_every steps
    (early stopping reads it). The train stage builds it from eval/ (stages/train.py); this package
    does not import eval/. Required when train.eval_every is set."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    out_dir = Path(sc["out_dir"])
    locks = [DirLock(out_dir / ".lock", f"run directory {out_dir}")] if main_rank else []
    if main_rank and sc.get("ckpt_dir"):  # checkpoints shared by the configs of one run id (config._place)
        locks.append(DirLock(Path(sc["ckpt_dir"]) / ".lock", f"checkpoint directory {sc['ckpt_dir']}"))
    held = []
    try:
        for lock in locks:
            held.append(lock.acquire())
        return _train(
            sc,
            stop_after=stop_after,
            backend=backend,
            dataset=dataset,
            teacher_inputs=teacher_inputs,
            dry_run_batches=dry_run_batches,
            evaluator=evaluator,
        )
    finally:
        for lock in held:
            lock.release()


def _train(
    sc: dict,
    stop_after: int | None = None,
    backend=None,
    dataset=None,
    teacher_inputs: dict | None = None,
    dry_run_batches: int = 0,
    evaluator: Callable[[Any, Any], float] | None = None,
) -> dict:
    """Train one run from its stage config.

    stop_after (tests): stop as if killed after that step. backend / dataset (benchmarks): use these
    instead of loading the base model and the dataset cache named in the config; teacher_inputs
    (benchmarks): {"probe_samples": [...], "probe_pooled": {rep: [N, D]} (Thermostat estimator paired),
    "anchors": {...}, "anchor_samples": [...]} instead of the
    probe / anchor files. dry_run_batches = n > 0: preflight -- n steps' batches through forward and
    every backward pass (CRaFT's retention gradient, HSW's surgery) with no optimizer step, then stop:
    writes dry_run.json in out_dir and no checkpoint, metrics or adapter.

    The steps, in order: _setup_run (distributed, data, model + LoRA, plug-ins, optimizer) ->
    _resume -> _start_run (outputs, logger, plug-ins' start, batches) -> per optimizer step:
    _micro_batches (forward + backward) -> _guard (NaN / overflow: skip or roll back) ->
    _optimizer_step -> _log_step -> _checkpoint_and_eval -> _finish (final adapter + done.json)."""
    run = _setup_run(
        sc,
        backend=backend,
        dataset=dataset,
        teacher_inputs=teacher_inputs,
        dry_run_batches=dry_run_batches,
        evaluator=evaluator,
    )
    _resume(run)
    _start_run(run)
    max_steps = run.ts.max_steps
    while run.step < max_steps:
        log_step = (run.step + 1) % run.ts.log_every == 0 or run.step + 1 in (1, max_steps)
        run.ctx.log_step = log_step  # plug-ins gather (host-syncing) statistics only on logged steps
        sums = _micro_batches(run)
        grad_norm_t = _guard(run, sums)
        if grad_norm_t is None:  # skipped (non-finite or fp16 overflow; maybe rolled back): redo
            continue
        if run.dry:  # preflight: every backward ran, no update
            if _dry_batch(run, sums, grad_norm_t):
                break
            continue
        _optimizer_step(run)
        if log_step:
            _log_step(run, sums, grad_norm_t)
        if run.bar:
            run.bar.update(1)
        if _checkpoint_and_eval(run):  # early stopping
            break
        if stop_after is not None and run.step >= stop_after:
            run.source.close()
            if run.bar:
                run.bar.close()
            run.logger.close()
            return {"stopped_at": run.step}
    run.source.close()
    if run.bar:
        run.bar.close()
    return _finish_dry_run(run) if run.dry else _finish(run)


@dataclass
class _Run:
    """One training run between its steps: what _setup_run builds, the progress a checkpoint keeps
    (step, skipped, rollbacks, best_eval, bad_evals, via extra) and this process's bookkeeping."""

    sc: dict
    ts: TrainSettings
    out_dir: Path
    ckpt_dir: Path
    dist: DistInfo
    device: torch.device
    ds: Any
    stats: dict
    backend: Any
    model: Any
    trainable: list
    ctx: TrainContext
    plugins: dict
    optimizer: Any
    scheduler: Any
    scaler: Any
    sampler: StepSampler
    aug_gen: torch.Generator
    t_start: float
    dry: int
    evaluator: Any
    init_info: dict | None = None
    trainer_state: dict | None = None
    init_step: int = 0
    step: int = 0
    skipped: int = 0
    overflows: int = 0
    rollbacks: int = 0
    best_eval: float = -1.0
    bad_evals: int = 0
    bad_in_a_row: int = 0
    extra: dict = field(default_factory=dict)
    segs: list = field(default_factory=list)
    seg_file: Path | None = None
    logger: Any = None
    source: Any = None
    bar: Any = None
    kill_at: int | None = None
    dry_recs: list = field(default_factory=list)
    t_log: float = 0.0
    steps_since_log: int = 0

    def objs(self) -> dict:
        """What a checkpoint saves / restores."""
        return dict(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            sampler=self.sampler,
            plugins=self.plugins,
            aug_gen=self.aug_gen,
        )

    def save_checkpoint(self) -> None:
        ckpt.save(
            self.ckpt_dir,
            self.step,
            skipped=self.skipped,
            **self.objs(),
            extra={
                "rollbacks": self.rollbacks,
                "max_steps": int(self.sc["train"]["max_steps"]),
                "best_eval": self.best_eval,
                "bad_evals": self.bad_evals,
            },
        )  # early stopping resumes too

    def record_segment(self) -> None:
        if self.dist.is_main:
            self.segs[-1].update(end=time.time(), to_step=self.step)
            write_json(self.seg_file, self.segs)


def _setup_run(
    sc: dict,
    backend=None,
    dataset=None,
    teacher_inputs: dict | None = None,
    dry_run_batches: int = 0,
    evaluator=None,
) -> _Run:
    """Settings checked, distributed + seeds, data, model + LoRA (+ train.init_adapter, DDP), method
    plug-ins, optimizer, schedule, loss scaling, sample order."""
    from ..data.cache import CachedDataset
    from ..models import load_backend

    ts = TrainSettings.of(sc["train"])  # checked before anything is loaded
    ms = MethodSettings.of(sc.get("method") or {})  # the plug-in blocks too, enabled or not
    check_compile(ts, ms, (sc.get("model") or {}).get("backend"))
    if ts.eval_every and evaluator is None:
        raise TrainingError(
            f"train.eval_every = {ts.eval_every} but no periodic evaluator was given: "
            "run_training(..., evaluator=) (the train stage builds it: vlaforget.stages.train), or set train.eval_every: 0"
        )
    t_start = time.time()
    root = Path(sc["root"])
    apply_job_env(root)
    tcfg = sc["train"]
    out_dir = Path(sc["out_dir"])
    ckpt_dir = Path(sc["ckpt_dir"]) if sc.get("ckpt_dir") else out_dir / "checkpoints" / sc["run_id"]
    dist: DistInfo = init_distributed()
    device = dist.device
    seed_everything(int(sc["seed"]))
    torch.set_num_threads(int(os.environ.get("VLAFORGET_THREADS", torch.get_num_threads())))

    # --- data: the suite's train split (n-shot subset if asked); statistics travel with the run
    ds = (
        dataset
        if dataset is not None
        else CachedDataset(
            sc["dataset"]["cache_dir"], split="train", shots=sc.get("shots"), seed=int(sc["seed"])
        )
    )
    if len(ds) == 0:
        raise TrainingError(
            f"dataset {sc['dataset']['name']} has no training samples "
            f"(shots={sc.get('shots')}): check the cache at {sc['dataset']['cache_dir']}"
        )
    stats = {sc["dataset"]["name"]: ds.statistics}

    # --- model + LoRA (+ gradient checkpointing, DDP)
    if backend is None:
        backend = load_backend(sc["model"], device=device, stats=ds.statistics)
    else:
        backend.set_stats(ds.statistics)
    model = prepare_model(backend, ts, int(sc["seed"]))
    # train.init_adapter: the user's adapter into this LoRA before step 1 (a different base model or
    # LoRA shape is refused); the schedule then continues from init_step (train/init_adapter.py)
    init_info, trainer_state, init_step = None, None, 0
    if ts.init_adapter:
        init_info = init_adapter.check_and_load(model, ts.init_adapter, sc["model"])
        trainer_state = init_adapter.read_trainer_state(ts.init_adapter)
        init_step = init_adapter.init_step_of(ts, ts.init_adapter, trainer_state)
        if init_step >= ts.max_steps:
            raise TrainingError(
                f"train.init_step {init_step} (the adapter's step) is not below train.max_steps "
                f"{ts.max_steps}: raise max_steps to the step the run should end at"
            )
        init_info["init_step"] = init_step
    elif ts.init_step:
        raise TrainingError(
            f"train.init_step {ts.init_step} without train.init_adapter: name the adapter it "
            "belongs to, or set init_step to null"
        )
    skip_lora_input_cast(model, tcfg)  # train.lora_input_cast false
    compile_layers(backend, model, tcfg.get("compile"))  # train.compile (off by default)
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dist.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    autocast = autocast_factory(ts.precision, device)
    ctx = TrainContext(
        backend=backend,
        model=model,
        device=device,
        stage_cfg=sc,
        trainable=trainable,
        autocast=autocast,
        world_size=dist.world,
        rank=dist.rank,
    )

    # --- method plug-ins (all off = baseline)
    plugins = build_plugins(ctx, sc, teacher_inputs or {}, train_ds=ds)
    ctx.plugins = plugins

    # --- optimizer, schedule, loss scaling
    optimizer = make_optimizer([p for _, p in trainable], tcfg)  # train.fused_optimizer
    scheduler = make_schedule(optimizer, ts, start=init_step)
    scaler = make_scaler(ts, device)  # CRaFT scales its retention backward with the same scaler
    ctx.scaler = scaler
    sampler = StepSampler(len(ds), int(sc["seed"]), dist.rank, dist.world)
    # augmentation draws from a per-micro-batch generator (train/batches.py); this one stays in the
    # checkpoint format only
    aug_gen = torch.Generator().manual_seed(int(sc["seed"]) + 31)
    return _Run(
        sc=sc,
        ts=ts,
        out_dir=out_dir,
        ckpt_dir=ckpt_dir,
        dist=dist,
        device=device,
        ds=ds,
        stats=stats,
        backend=backend,
        model=model,
        trainable=trainable,
        ctx=ctx,
        plugins=plugins,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        sampler=sampler,
        aug_gen=aug_gen,
        t_start=t_start,
        dry=int(dry_run_batches or 0),
        evaluator=evaluator,
        init_info=init_info,
        trainer_state=trainer_state,
        init_step=init_step,
        step=init_step,
    )


def _resume(run: _Run) -> None:
    """Resume exactly where an interrupted run stopped (a run whose max_steps was raised has the same
    run id, stageconfig.run_id_of: it continues from the checkpoint of its old target; one lowered resumes
    from the newest checkpoint at or before it), or start from train.init_adapter's optimizer state.
    Opens this process's run segment."""
    sc, tcfg, ts = run.sc, run.sc["train"], run.ts
    state_path, state = ckpt.load_latest(run.ckpt_dir, max_step=int(tcfg["max_steps"]))
    if state is not None:
        run.step, run.skipped = ckpt.restore(state_path, **run.objs(), state=state)
        run.extra = dict(state.get("extra") or {})
        target = run.extra.get("max_steps")
        if target is not None and int(target) != int(tcfg["max_steps"]):
            log.info(
                "resuming %s from step %d (%s): max_steps %s -> %s, continuing to the new target",
                sc["run_id"],
                run.step,
                state_path,
                target,
                tcfg["max_steps"],
            )
        else:
            log.info("resuming %s from step %d (%s)", sc["run_id"], run.step, state_path)
    elif run.trainer_state is not None:  # a fresh start from the user's adapter: its AdamW moments
        run.init_info["optimizer_states_restored"] = init_adapter.restore_optimizer(
            run.optimizer, [p for _, p in run.trainable], run.trainer_state, ts.init_adapter
        )
    del state
    run.trainer_state = None
    run.rollbacks = int(run.extra.get("rollbacks", 0))
    # every run segment (start .. last sign of life), kills included: done.json's wall time sums them
    run.seg_file = run.ckpt_dir / "segments.json"
    run.segs = _read_segments(run.seg_file) if run.dist.is_main else []
    run.segs.append({"start": run.t_start, "end": time.time(), "from_step": run.step, "to_step": run.step})


def _start_run(run: _Run) -> None:
    """The run directory's inputs (statistics, config), the logger, the plug-ins' start (Thermostat:
    calibration), a chain stage's starting adapter, the batch source and the progress bar."""
    sc, ts, step = run.sc, run.ts, run.step
    if run.dist.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.out_dir / "dataset_statistics.json", run.stats)
        atomic_write_text(run.out_dir / "config.yaml", json.dumps(sc, indent=2, sort_keys=True) + "\n")
    run.logger = RunLogger(
        run.out_dir, sc, enabled=run.dist.is_main and not run.dry, resume=step > 0, resume_step=step
    )
    if run.init_info and step == run.init_step:
        log.info("starting at step %d from %s: %s", step, run.init_info["dir"], json.dumps(run.init_info))
    for p in run.plugins.values():
        p.start(step)  # before the first optimizer step (Thermostat: calibration, student = teacher)
    if sc.get("init_adapter") and step == 0:  # a chain stage, not resumed: after the calibration
        init_from_adapter(run.model.module if hasattr(run.model, "module") else run.model, sc["init_adapter"])
    # samples -> host batches in DataLoader workers (train.num_workers), pinned, prefetched
    from .batches import BatchSource

    run.source = BatchSource(
        run.ds,
        run.backend,
        run.sampler,
        ts.batch_size,
        int(sc["seed"]),
        ts.image_aug,
        num_workers=ts.num_workers,
        device=run.device,
    )
    run.bar = (
        progress(total=ts.max_steps, initial=step, desc=f"train {sc['run_name']}")
        if run.dist.is_main
        else None
    )
    run.best_eval, run.bad_evals = float(run.extra.get("best_eval", -1.0)), int(run.extra.get("bad_evals", 0))
    run.kill_at = int(os.environ.get("VLAFORGET_FAULT_KILL_AT_STEP", "0")) or None
    run.t_log, run.steps_since_log = time.perf_counter(), 0


def _micro_batches(run: _Run) -> dict[str, torch.Tensor]:
    """One optimizer step's train.grad_accum micro-batches: forward (a plug-in may run it), action
    metrics, backward (a plug-in may run it); returns the step's mean metrics (over ranks too)."""
    accum, plugins, model, scaler = run.ts.grad_accum, run.plugins, run.model, run.scaler
    run.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = run.source.next()
        sync = contextlib.nullcontext() if (run.dist.world == 1 or micro == accum - 1) else model.no_sync()
        with sync:
            with run.ctx.autocast():
                out = forward_micro(plugins, run.backend, batch, model, last=micro == accum - 1)
                metrics = run.backend.action_metrics(batch, out.logits)
            # a plug-in may run the backward itself (CRaFT fused: L_act / accum + L_ret, one pass)
            losses = {"act": metrics["loss"]}
            if not any([p.backward(losses, 1.0 / accum) for p in plugins.values()]):
                loss = losses["act"] / accum
                (scaler.scale(loss) if scaler else loss).backward()
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            sums[k] = sums[k] + v / accum if k in sums else v / accum
        del out, losses
    if run.dist.world > 1:  # the global batch's loss / accuracy / L1 (mean over ranks): logged, NaN guard
        sums = dict(zip(sums, all_reduce_flat(list(sums.values()), average=True)))
    return sums


def _guard(run: _Run, sums: dict) -> torch.Tensor | None:
    """Unscale, the plug-ins' before_step, then the NaN/Inf guard: the gradient norm when the step
    may be taken; None when it is skipped (fp16 overflow: scale backed off; non-finite: counted,
    after too many in a row rolled back once or stopped)."""
    scaler, optimizer, plugins = run.scaler, run.optimizer, run.plugins
    if scaler:
        scaler.unscale_(optimizer)
    for p in plugins.values():
        p.before_step()  # e.g. CRaFT: retention gradient, conflict projection, λ-weighted sum
    # NaN/Inf guard with one host sync: a non-finite loss gives non-finite gradients
    grads = [p.grad for _, p in run.trainable if p.grad is not None]
    norms = torch.stack([g.detach().float().norm() for g in grads]) if grads else torch.zeros(1)
    grad_norm_t = norms.norm()
    fin = torch.stack(
        [torch.isfinite(sums["loss"].to(grad_norm_t.device)), torch.isfinite(grad_norm_t)]
    ).tolist()
    loss_ok = fin[0]  # one host sync for both checks
    overflowed = any([p.overflowed() for p in plugins.values()])  # a plug-in's own backward (CRaFT's)
    step_ok = loss_ok and fin[1] and not overflowed
    if not step_ok and scaler is not None and loss_ok:
        # fp16 overflow of the scaled gradients (action or CRaFT retention backward): skip the
        # step, halve the scale (GradScaler's backoff), count it; not an error while it recovers
        run.overflows += 1
        run.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        scaler.update(float(scaler.get_scale()) * scaler.get_backoff_factor())
        for p in plugins.values():
            p.skip_step()
        log.info(
            "step %d: fp16 gradient overflow, step skipped, loss scale -> %g (%d overflows)",
            run.step + 1,
            scaler.get_scale(),
            run.overflows,
        )
        if scaler.get_scale() < 1e-4:
            raise TrainingError(
                f"fp16 loss scale fell to {scaler.get_scale():g} after {run.overflows} "
                "overflow steps: the gradients are non-finite at any scale; lower "
                "train.lr or use precision bf16/fp32"
            )
        return None
    if not step_ok:
        run.skipped += 1
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.update()
        for p in plugins.values():
            p.skip_step()
        run.bad_in_a_row += 1
        log.warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row, %d so far)",
            run.step + 1,
            run.bad_in_a_row,
            run.skipped,
        )
        if run.bad_in_a_row >= run.ts.max_bad_steps or run.skipped - run.overflows > max(
            10, run.ts.max_steps // 10
        ):
            if run.dry:
                raise TrainingError(
                    f"dry run: {run.bad_in_a_row} batches in a row had a non-finite loss or "
                    "gradient: lower train.lr, use precision bf16/fp32, or check the "
                    "data statistics"
                )
            run.step, run.skipped, run.bad_in_a_row = _roll_back_or_stop(
                run.ckpt_dir,
                run.sc,
                run.step,
                run.skipped,
                run.bad_in_a_row,
                run.rollbacks,
                run.logger,
                run.objs(),
            )
            run.rollbacks += 1
        return None
    run.bad_in_a_row = 0
    return grad_norm_t


def _dry_batch(run: _Run, sums: dict, grad_norm_t: torch.Tensor) -> bool:
    """A preflight batch (train.dry_run_batches): its record, no update. True when the last."""
    run.dry_recs.append(
        {
            "batch": len(run.dry_recs) + 1,
            "train_loss": _f(sums.get("loss")),
            "grad_norm": float(grad_norm_t),
            **{k: v for p in run.plugins.values() for k, v in p.dry_logs().items()},
        }
    )
    for p in run.plugins.values():
        p.skip_step()
    run.optimizer.zero_grad(set_to_none=True)
    return len(run.dry_recs) >= run.dry


def _optimizer_step(run: _Run) -> None:
    """Clip (train.max_grad_norm), step (through the loss scaler), schedule, the plug-ins' every_step."""
    if run.ts.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for _, p in run.trainable], run.ts.max_grad_norm)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    run.steps_since_log += 1
    for p in run.plugins.values():
        p.every_step(run.step)


def _log_step(run: _Run, sums: dict, grad_norm_t: torch.Tensor) -> None:
    """A logged step's record: the loop's fields, then each plug-in's logs() and annotate()."""
    scaler, device = run.scaler, run.device
    rec = {
        "step": run.step,
        "train_loss": _f(sums.get("loss")),
        "action_accuracy": _f(sums.get("accuracy")),
        "l1_loss": _f(sums.get("l1")),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm_t),
        "skipped_steps": run.skipped,
        "epoch": run.sampler.epoch,
    }
    if scaler is not None:
        rec["loss_scale"] = float(scaler.get_scale())
        rec["overflow_steps"] = run.overflows
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    rec["step_time_s"] = (time.perf_counter() - run.t_log) / max(1, run.steps_since_log)
    for p in run.plugins.values():
        rec.update(p.logs())
    for p in run.plugins.values():
        p.annotate(rec)  # e.g. CRaFT: L_act
    run.logger.log(rec)
    run.record_segment()
    run.t_log, run.steps_since_log = time.perf_counter(), 0
    if run.bar:
        run.bar.set_postfix(loss=f"{rec['train_loss']:.3f}", acc=f"{rec['action_accuracy']:.2f}")


def _checkpoint_and_eval(run: _Run) -> bool:
    """Checkpoint every save_steps and at the target (a raised max_steps continues from there); the
    periodic evaluation every eval_every with early stopping. True: stop early."""
    ts, step = run.ts, run.step
    if (step % ts.save_steps == 0 or step == ts.max_steps) and run.dist.is_main:
        run.save_checkpoint()
    if run.kill_at == step:  # fault injection (tests/test_faults.py): a real kill -9 at a chosen step
        os.kill(os.getpid(), 9)
    if ts.eval_every and step % ts.eval_every == 0 and step < ts.max_steps:
        # rank 0 evaluates the bare model (no DDP collective), every rank gets its score
        with _rng_isolated():  # evaluating changes no later step (config.periodic_eval_matters)
            score = on_main(lambda: [float(run.evaluator(run.backend, unwrap(run.model)))])[0]
        run.logger.log({"step": step, "eval_success_rate": score})
        if score > run.best_eval + ts.early_stopping_min_delta:
            run.best_eval, run.bad_evals = score, 0
        else:
            run.bad_evals += 1
        if ts.early_stopping_patience and run.bad_evals >= ts.early_stopping_patience:
            log.info("early stopping at step %d: no improvement in %d evaluations", step, run.bad_evals)
            return True
    return False


def _finish_dry_run(run: _Run) -> dict:
    """dry_run.json (main rank), then the plug-ins closed."""
    dry_recs = run.dry_recs
    res = {"dry_run_batches": len(dry_recs), "batches": dry_recs, "run_id": run.sc["run_id"]}
    if run.dist.is_main:
        write_json(run.out_dir / "dry_run.json", res)
        for r in dry_recs:
            log.info("dry run %d/%d: %s", r["batch"], run.dry, json.dumps(r)[:400])
    for p in run.plugins.values():
        p.close()
    cleanup_distributed(run.dist)
    return res


def _finish(run: _Run) -> dict:
    """The final adapter + completion record (written last), then the logger and plug-ins closed."""
    sc, out_dir, segs = run.sc, run.out_dir, run.segs
    result = {}
    if run.dist.is_main:
        check_loss_improved(run.logger, run.ts, sc)
        # built in a temp dir and renamed into place: a kill never leaves a half-written final/, and
        # a previous final/ (with its done.json) stays until the new one is complete
        final = out_dir / "final"
        for stale in out_dir.glob(".final.*-*"):  # left by a killed attempt (we hold the run's lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir / f".final.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        unwrapped = run.model.module if hasattr(run.model, "module") else run.model
        unwrapped.save_pretrained(str(tmp))
        write_json(tmp / "dataset_statistics.json", run.stats)
        files = sorted(p.name for p in tmp.iterdir())
        result = {
            "run_id": sc["run_id"],
            "config_id": config_id(sc),
            "run_name": sc["run_name"],
            "method": sc["method_name"],
            "steps": run.step,
            "skipped_steps": run.skipped,
            "rollbacks": run.rollbacks,
            "init_adapter": run.init_info,
            "final_metrics": run.logger.last,
            "world_size": run.dist.world,
            "adapter_files": files,
            "adapter_sha256": {f: sha256_file(tmp / f) for f in files},
            **provenance(),
        }
        run.record_segment()
        result.update(
            wall_time_s=round(sum(g["end"] - g["start"] for g in segs), 1),
            segments=len(segs),
            last_segment_s=round(time.time() - run.t_start, 1),
        )
        write_json(tmp / "done.json", result)
        replace_dir(tmp, final)
    run.logger.close()
    for p in run.plugins.values():
        p.close()
    cleanup_distributed(run.dist)
    return result


@contextlib.contextmanager
def _rng_isolated():
    """Put back every RNG the training steps draw from (torch CPU/CUDA, numpy, random) afterwards."""
    import random

    states = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _read_segments(path: Path) -> list[dict]:
    try:
        segs = json.loads(Path(path).read_text())
        return [g for g in segs if isinstance(g, dict) and {"start", "end"} <= set(g)]
    except (OSError, ValueError, TypeError):
        return []


def _roll_back_or_stop(ckpt_dir, sc, step, skipped, bad_in_a_row, rollbacks, logger, objs):
    """After too many bad steps: roll back once to the last good checkpoint (lr x rollback_lr_factor),
    or stop with what to change. Returns the restored (step, skipped, 0)."""
    ts = TrainSettings.of(sc["train"])
    lr = ts.lr
    what = (
        f"{bad_in_a_row} consecutive steps (at step {step + 1}) had a non-finite loss or gradient"
        f" ({skipped} skipped in total)"
    )
    fix = (
        f"lower train.lr (now {lr:g}; try {lr / 10:g}), set train.max_grad_norm (e.g. 1.0), use "
        f"precision bf16 or fp32 instead of fp16, or check the dataset statistics of {sc['dataset']['name']}"
    )
    if rollbacks >= 1:
        raise TrainingError(f"{what}, again after rolling back once: the run is stopped. {fix}")
    path, state = ckpt.load_latest(ckpt_dir, max_step=step)
    if state is None:
        raise TrainingError(
            f"{what} and there is no earlier checkpoint to roll back to (first one at "
            f"step {ts.save_steps}): the run is stopped. {fix}"
        )
    new_step, new_skipped = ckpt.restore(path, state=state, **objs)
    factor = ts.rollback_lr_factor
    for g in objs["optimizer"].param_groups:
        g["lr"] *= factor
    sched = objs["scheduler"]
    sched.base_lrs = [b * factor for b in sched.base_lrs]
    log.warning(
        "%s: rolled back to the checkpoint of step %d (%s) with the learning rate x %g; a second "
        "failure stops the run",
        what,
        new_step,
        path,
        factor,
    )
    logger.truncate(new_step)
    logger.log({"step": new_step, "rollback_from_step": step, "rollback_lr_factor": factor})
    return new_step, new_skipped, 0


LOSS_MIN_REL_DROP = 0.02  # a finished run's loss must end at least 2 % below its start (check_loss_improved)


def check_loss_improved(logger, tcfg: TrainSettings | dict, sc: dict) -> None:
    """Refuse to mark done a run whose loss ended no lower than it started (a diverged or stuck
    run: e.g. lr far too high gives a flat loss at chance without any NaN)."""
    ts = TrainSettings.of(tcfg)
    min_steps = ts.loss_check_min_steps
    losses = [r["train_loss"] for r in logger.records if isinstance(r.get("train_loss"), (int, float))]
    if ts.max_steps < min_steps or len(losses) < 2:
        return
    # mean of the first k logged against the mean of the last k (k <= 3, the halves never overlap):
    # one noisy early or late batch neither fails a short run that learned nor passes a stuck one
    k = max(1, min(3, len(losses) // 2))
    head, tail = losses[:k], losses[-k:]
    start, end = sum(head) / k, sum(tail) / k
    # "improved" = at least LOSS_MIN_REL_DROP below the start: a run stuck at chance (lr far too
    # high: the loss drops a hair on the first update, then sits flat) is not improved
    if not end < start * (1.0 - LOSS_MIN_REL_DROP):
        raise TrainingError(
            f"run {sc['run_name']}: the training loss did not improve by {LOSS_MIN_REL_DROP:.0%} (mean of the "
            f"first {k} logged {start:.4f}, of the last {k} logged {end:.4f}); it is not marked done. Usually train.lr is far too "
            f"high (now {ts.lr:g}) or too low, or the data do not match the model: lower / "
            f"raise train.lr and rerun (the checkpoints of this run id are kept; delete "
            f"{sc.get('ckpt_dir') or Path(sc['out_dir']) / 'checkpoints' / sc['run_id']} to start over), or set "
            f"train.loss_check_min_steps above max_steps to skip this check"
        )


def build_plugins(ctx: TrainContext, sc: dict, given: dict, train_ds=None) -> dict:
    """The enabled method plug-ins, each built by its own module (train/plugins/<name>.py), which
    checks before the first step that its inputs fit the run (the probe is not in the run's
    training data train_ds; the CRaFT anchor cache matches the model and the run)."""
    plugins: dict = {}
    shared: dict = {}  # what several plug-ins read (the ICSM artifacts), loaded once
    for name in plugin_registry.enabled(sc["method"]):
        try:
            mod = plugin_registry.load(name)
        except ModuleNotFoundError as e:
            if e.name != plugin_registry.module_name(name):
                raise
            raise TrainingError(
                f"method '{sc['method_name']}' enables '{name}', which is no training "
                f"plug-in (no module train/plugins/{name}.py)"
            ) from e
        plugins[name] = mod.build(ctx, sc, given, train_ds, shared)
    return plugins


class RunLogger:
    """metrics.jsonl (machine), train_progress.log (human), W&B (optional, offline by default)."""

    def __init__(self, out_dir: Path, sc: dict, enabled: bool, resume: bool, resume_step: int = 0):
        self.enabled = enabled
        self.last: dict = {}
        self.records: list[dict] = []
        self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = (out_dir / "metrics.jsonl", out_dir / "train_progress.log")
        if resume:
            self.records = cut_logs(*self.paths, resume_step)  # steps after the checkpoint were redone
        self.last = self.records[-1] if self.records else {}
        mode = "a" if resume else "w"
        self.jsonl = open(self.paths[0], mode)
        self.human = open(self.paths[1], mode)
        ts = TrainSettings.of(sc["train"])
        self.max_steps = ts.max_steps
        if ts.use_wandb:
            import wandb

            self.wandb = wandb.init(
                project=ts.wandb_project,
                name=sc["run_id"],
                id=sc["run_id"],
                resume="allow",
                config=sc,
                mode=ts.wandb_mode,
                dir=os.environ.get("WANDB_DIR"),
            )

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        rec = {k: v for k, v in rec.items() if v is not None}
        self.last = rec
        self.records.append(rec)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        line = format_progress(rec, self.max_steps)
        self.human.write(line + "\n")
        self.human.flush()
        log.info("%s", line)  # the same line on the console
        if self.wandb:
            self.wandb.log(wandb_record(rec), step=rec["step"])

    def truncate(self, step: int) -> None:
        """Forget what was logged after `step` (a rollback)."""
        if not self.enabled:
            return
        self.jsonl.close()
        self.human.close()
        self.records = cut_logs(*self.paths, step)
        self.jsonl, self.human = open(self.paths[0], "a"), open(self.paths[1], "a")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.human.close()
            if self.wandb:
                self.wandb.finish()


# W&B keys of the seeds' tools (craft_training_eval_guide.md section 3): metrics.jsonl field -> key
WANDB_KEYS = {
    "train_loss": "VLA Train/Loss",
    "l1_loss": "VLA Train/Curr Action L1 Loss",
    "action_accuracy": "VLA Train/Action Accuracy",
    "grad_norm": "VLA Train/Gradient Norm",
    "lr": "VLA Train/Learning Rate",
    "L_ret": "CRaFT/Retention Loss",
    "retention_nonfinite": "CRaFT/Retention NonFinite",
    "lambda": "CRaFT/Lambda",
    "lambda_before": "CRaFT/Lambda Before",
    "lambda_after": "CRaFT/Lambda After",
    "conflict_ratio": "CRaFT/Conflict Ratio",
    "epsilon": "CRaFT/Epsilon",
    "grad_dot": "CRaFT/Grad Dot",
    "grad_cos": "CRaFT/Grad Cos",
    "projection": "CRaFT/Projection",
}


def wandb_record(rec: dict) -> dict:
    """The numeric fields of a metrics.jsonl record under their W&B keys (`VLA Train/...`,
    `CRaFT/...`; the method's fields, e.g. drift_d, hsw_beta, keep their own names)."""
    out = {}
    for k, v in rec.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            if isinstance(v, bool):
                out[WANDB_KEYS.get(k, k)] = float(v)
            continue
        out[WANDB_KEYS.get(k, k)] = v
    return out


_STEP_RE = __import__("re").compile(r"^Step (\d+)/")


def cut_logs(jsonl: Path, human: Path, step: int) -> list[dict]:
    """Cut metrics.jsonl and train_progress.log back to `step` (records after it, and a torn last
    line, dropped); returns the kept metrics records."""
    kept, lines = [], []
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                kept.append(rec)
                lines.append(line)
        atomic_write_text(jsonl, "".join(x + "\n" for x in lines))
    if human.exists():
        out = []
        for line in human.read_text().splitlines(keepends=True):
            m = _STEP_RE.match(line)
            if line.endswith("\n") and (m is None or int(m.group(1)) <= step):
                out.append(line)
        atomic_write_text(human, "".join(out))
    return kept


def format_progress(rec: dict, max_steps: int) -> str:
    """The console / train_progress.log line of the seeds' tools:
    `Step s/N | Loss: x | Ret: L_ret/ε | λ: before->after | Conflict: p% | GradNorm: g | LR: lr`
    (CRaFT fields only for CRaFT runs), then the other fields (accuracy, L1, drift, HSW gains)."""

    def num(k):
        return isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool)

    parts = [f"Step {rec['step']}/{max_steps}"]
    if num("train_loss"):
        parts.append(f"Loss: {rec['train_loss']:.4f}")
    if num("L_ret"):
        parts.append(
            f"Ret: {rec['L_ret']:.4f}/{rec['epsilon']:.4f}" if num("epsilon") else f"Ret: {rec['L_ret']:.4f}"
        )
    if num("lambda_before") and num("lambda_after"):
        parts.append(f"λ: {rec['lambda_before']:.3f}->{rec['lambda_after']:.3f}")
    if num("conflict_ratio"):
        parts.append(f"Conflict: {rec['conflict_ratio']:.2%}")
    if num("grad_norm"):
        parts.append(f"GradNorm: {rec['grad_norm']:.3f}")
    if num("lr"):
        parts.append(f"LR: {rec['lr']:.2e}")
    fmt = [
        ("action_accuracy", "Acc", "{:.3f}"),
        ("l1_loss", "L1", "{:.4f}"),
        ("drift_d", "d", "{:.4f}"),
        ("hsw_beta", "β", "{:.3f}"),
        ("hsw_gamma", "γ", "{:.3f}"),
        ("hsw_g_norm", "‖g‖", "{:.3e}"),
        ("hsw_gprime_norm", "‖g'‖", "{:.3e}"),
    ]
    for key, label, f in fmt:
        if num(key):
            parts.append(f"{label}: {f.format(rec[key])}")
    if rec.get("skipped_steps"):
        parts.append(f"Skipped: {rec['skipped_steps']}")
    if "eval_success_rate" in rec:
        parts.append(f"EvalSuccess: {rec['eval_success_rate']:.3f}")
    return " | ".join(parts)
