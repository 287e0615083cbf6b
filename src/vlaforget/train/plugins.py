"""Method plug-ins for the one training loop: HSW (gradient surgery), Thermostat (closed-loop β/γ),
CRaFT (retention loss + dual variable + conflict projection).

The loop calls start(step) once before the first optimizer step, then, in order, for each step:
    extra_losses(batch, out)   -> dict of added loss terms (per micro-batch)
    backward(losses, scale)    -> True if the plug-in did the backward pass itself
    every_step(step)           -> after the optimizer step (periodic controllers)
    logs()                     -> scalars for metrics.jsonl / W&B
and state_dict()/load_state_dict() for exact resume. With no plug-in enabled the loop is the
baseline; the math lives in vlaforget.methods (unit-tested there).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainContext:
    backend: Any
    model: torch.nn.Module  # PEFT (and maybe DDP) wrapped
    device: torch.device
    stage_cfg: dict
    trainable: list  # [(name, param)] in a fixed order
    autocast: Any  # callable returning an autocast context
    world_size: int = 1
    plugins: dict = field(default_factory=dict)
    log_step: bool = True  # whether the current step is logged (statistics cost host syncs)
    scaler: Any = None  # torch.amp.GradScaler when the loop scales losses (fp16), else None


class Plugin:
    name = "plugin"

    def extra_losses(self, batch, out) -> dict:
        return {}

    def needs_hidden_states(self) -> bool:
        return False

    def backward(self, losses: dict, scale: float) -> bool:
        return False

    def start(self, step: int) -> None:
        """Once, after resume and before the first optimizer step of this process (e.g. the
        Thermostat's calibration)."""

    def before_step(self) -> None:
        """After all micro-batches' backward (grads unscaled), before the NaN guard and optimizer."""

    def skip_step(self) -> None:
        """The step was skipped by the NaN guard."""

    def every_step(self, step: int) -> None:
        pass

    def logs(self) -> dict:
        return {}

    def dry_logs(self) -> dict:
        """Statistics of a dry-run batch (train.dry_run_batches: no optimizer step, no every_step)."""
        return self.logs()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- HSW


class HSWPlugin(Plugin):
    """Gradient surgery on each hooked decoder layer's OWN parameters.

    For hooked layer l with output h_l (residual stream, before any final norm) and true gradient
    g_l = dL/dh_l, the trainable parameters θ_l of layer l receive J_θl^T S_l(g_l) instead of
    J_θl^T g_l, where S_l(g) = g_n + β g_p + γ g_f (per token, clamped ‖S(g)‖ ≤ ‖g‖; methods.hsw)
    with layer l's group subspaces. The gradient that flows on to the layers below is NOT modified,
    so every parameter sees exactly one surgery, its own layer's group gains, once (no compounding
    through the residual stream: see docs/methods.md §3). Implementation: a tensor hook on h_l
    computes S(g) − g and adds the vector-Jacobian product J_θl^T (S(g) − g) to θ_l's .grad before
    autograd accumulates J_θl^T g there (one extra backward through layer l, to its parameters only).
    """

    name = "hsw"

    def __init__(self, ctx: TrainContext, cfg: dict, icsm):
        from ..methods.hsw import hsw_transform

        self._transform = hsw_transform
        self.ctx = ctx
        self.beta = float(cfg.get("beta", 1.0))
        self.gamma = float(cfg.get("gamma", 1.0))
        self.clamp = cfg.get("clamp", "per_token")
        self.eps = float(cfg.get("eps", 1e-12))
        self.layer_map = icsm.layer_bases(cfg.get("groups", "icsm"), ctx.backend.num_layers,
                                          sensitivity=cfg.get("use_sensitivity_order", True))
        layers = ctx.backend.decoder_layers(ctx.model)
        # layer -> its trainable parameters (LoRA); layers without any have nothing to act on
        self.params = {l: [p for p in layers[l].parameters() if p.requires_grad] for l in self.layer_map}
        bare = sorted(l for l, ps in self.params.items() if not ps)
        if len(bare) == len(self.params):
            from ..errors import TrainingError

            raise TrainingError(f"HSW hooks decoder layers {sorted(self.params)} but none of them has a "
                                "trainable parameter: include them in train.lora.layers / targets")
        # layer -> (U_f [D,rf], U_p [D,rp]) on device, fp32
        self.bases = {l: (uf.to(ctx.device, torch.float32), up.to(ctx.device, torch.float32))
                      for l, (uf, up) in self.layer_map.items() if l not in bare}
        self.skipped_layers = bare
        self._acc = self._zero_acc()
        self._nested = False
        self._handles = []
        for l in self.bases:
            self._handles.append(layers[l].register_forward_hook(self._make_forward_hook(l)))

    @staticmethod
    def _zero_acc():
        return {"g": 0.0, "gprime": 0.0, "gf": 0.0, "gp": 0.0, "gn": 0.0, "calls": 0}

    def _make_forward_hook(self, layer_idx: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not (torch.is_grad_enabled() and hidden.requires_grad):
                return None
            uf, up = self.bases[layer_idx]
            params = self.params[layer_idx]
            want_stats = self.ctx.log_step
            beta, gamma = self.beta, self.gamma

            def grad_hook(g):
                if self._nested:  # our own vector-Jacobian product below also passes this tensor
                    return None
                g2, stats = self._transform(g, uf, up, beta, gamma, clamp=self.clamp, eps=self.eps,
                                            stats=want_stats)
                acc = self._acc
                for k_src, k_dst in (("g_norm", "g"), ("gprime_norm", "gprime"), ("gf_norm", "gf"),
                                     ("gp_norm", "gp"), ("gn_norm", "gn")):
                    if k_src in stats:
                        acc[k_dst] += float(stats[k_src]) ** 2
                acc["calls"] += int(want_stats)
                acc["beta"], acc["gamma"] = beta, gamma  # the gains this gradient got
                if g2 is g:  # beta = gamma = 1: exact identity, nothing to add
                    return None
                self._nested = True
                try:
                    corr = torch.autograd.grad(hidden, params, grad_outputs=g2 - g, retain_graph=True,
                                               allow_unused=True)
                finally:
                    self._nested = False
                for p, c in zip(params, corr):
                    if c is not None:  # autograd adds J^T g to this afterwards: J^T S(g) in total
                        p.grad = c if p.grad is None else p.grad.add_(c)
                return None  # the gradient flowing to the layers below stays the true one

            hidden.register_hook(grad_hook)
            return None

        return hook

    def logs(self) -> dict:
        a = self._acc
        # the gains applied during this step (a Thermostat update after the step shows next step)
        out = {"hsw_beta": a.get("beta", self.beta), "hsw_gamma": a.get("gamma", self.gamma)}
        if a["calls"]:
            out.update(hsw_g_norm=math.sqrt(a["g"]), hsw_gprime_norm=math.sqrt(a["gprime"]),
                       hsw_gf_norm=math.sqrt(a["gf"]), hsw_gp_norm=math.sqrt(a["gp"]),
                       hsw_gn_norm=math.sqrt(a["gn"]))
        self._acc = self._zero_acc()
        return out

    def state_dict(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.gamma = float(state["beta"]), float(state["gamma"])

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------- Thermostat


class ThermostatPlugin(Plugin):
    """Calibrates before the first optimizer step (student = teacher: `warmup_measurements`
    independent probe draws give the noise floor of d), then every K steps: probe mini-batch
    through the student (no grad), pooled instruction states at the representative layers (the
    probe stage's space: layer outputs before any final norm), drift d vs the teacher's C_T,
    control law -> HSW β/γ."""

    name = "thermostat"

    def __init__(self, ctx: TrainContext, cfg: dict, icsm, probe_samples, seed: int,
                 hsw_cfg: dict | None = None):
        from ..methods.thermostat import ControlLaw

        self.ctx = ctx
        self.cfg = cfg
        self.every = int(cfg.get("every", 50))
        self.batch = int(cfg.get("probe_batch", 64))
        self.metric = cfg.get("metric", "basis")
        self.icsm = icsm
        self.samples = probe_samples  # list of sample dicts (image, instruction, action)
        hsw_on = bool(hsw_cfg and hsw_cfg.get("enabled"))
        # the control law starts from (and rests at) the configured HSW gains
        self.law = ControlLaw(cfg, beta0=float(hsw_cfg.get("beta", 1.0)) if hsw_on else None,
                              gamma0=float(hsw_cfg.get("gamma", 1.0)) if hsw_on else None)
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)
        self.last: dict = {}
        self._ct_proj: dict = {}  # rep -> U^T C_T U [r, r]

    def pooled(self, idx: list[int]) -> dict[int, torch.Tensor]:
        """{rep: [n, D]} instruction-pooled student states of probe samples idx (no grad)."""
        from ..models.base import eval_mode
        from ..models.features import pooled_layer_states

        reps = list(self.icsm.rep_layers)
        parts: dict[int, list] = {rep: [] for rep in reps}
        # no-grad chunks no larger than the training micro-batch (thermostat.probe_chunk to change):
        # the probe forward then fits in memory the training step already reserved
        chunk = max(1, int(self.cfg.get("probe_chunk") or self.ctx.stage_cfg["train"]["batch_size"]))
        with torch.no_grad(), eval_mode(self.ctx.model):
            for s in range(0, len(idx), chunk):
                batch = self.ctx.backend.collate([self.samples[i] for i in idx[s : s + chunk]])
                with self.ctx.autocast():
                    p, _ = pooled_layer_states(self.ctx.backend, batch, reps, model=self.ctx.model)
                for rep in reps:
                    parts[rep].append(p[rep].float())
        return {rep: torch.cat(v) for rep, v in parts.items()}

    def measure(self) -> tuple[float, dict]:
        """d on one fresh probe draw (probe_batch samples without replacement), averaged over reps."""
        from ..methods.icsm import covariance
        from ..methods.thermostat import drift, projected_covariance

        n = len(self.samples)
        idx = torch.randperm(n, generator=self.gen)[: min(self.batch, n)].tolist()
        per_layer = {}
        for rep, X in self.pooled(idx).items():
            U = self.icsm.basis[rep].to(X.device)
            if self.metric == "basis":  # r x r inside the ICSM basis: never forms D x D
                if rep not in self._ct_proj:
                    C_T = self.icsm.C_T[rep].to(X.device).double()
                    self._ct_proj[rep] = U.double().T @ C_T @ U.double()
                c_s, c_t = projected_covariance(X, U), self._ct_proj[rep]
            else:
                c_s, c_t = covariance(X), self.icsm.C_T[rep].to(X.device)
            per_layer[rep] = float(drift(c_s, c_t, metric=self.metric, basis=U))
        d = sum(per_layer.values()) / len(per_layer)
        return d, per_layer

    def start(self, step: int) -> None:
        """Before the first optimizer step (the loop calls it once): calibrate unless a resumed
        state already holds the calibration."""
        if self.law.calibrated:
            return
        t0 = time.perf_counter()
        ds = [self.measure()[0] for _ in range(self.law.warmup)]
        self.law.calibrate(ds)
        self.last = {"thermostat_phase": "calibrate", "thermostat_floor": self.law.floor,
                     "thermostat_noise_std": self.law.std, "thermostat_threshold": self.law.threshold,
                     "thermostat_calibration_d": ds, "thermostat_calibration_step": int(step),
                     "thermostat_time_s": time.perf_counter() - t0}

    def every_step(self, step: int) -> None:
        if step % self.every != 0:
            return
        t0 = time.perf_counter()
        d, per_layer = self.measure()
        elapsed = time.perf_counter() - t0
        beta, gamma, phase = self.law.observe(d)
        hsw = self.ctx.plugins.get("hsw")
        if hsw is not None:
            hsw.beta, hsw.gamma = float(beta), float(gamma)
        self.last = {**self.last, "drift_d": d, "thermostat_phase": phase, "thermostat_time_s": elapsed,
                     "thermostat_excess": self.law.last.get("excess"),
                     **{f"drift_d_L{k}": v for k, v in per_layer.items()}}

    def logs(self) -> dict:
        out, self.last = self.last, {}
        return {k: v for k, v in out.items() if v is not None}

    def state_dict(self) -> dict:
        return {"law": self.law.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.law.load_state_dict(state["law"])
        self.gen.set_state(state["gen"])


# ----------------------------------------------------------------------------- CRaFT


class CraftPlugin(Plugin):
    """Retention loss on cached teacher anchors, dual variable λ, conflict-aware projection."""

    name = "craft"

    def __init__(self, ctx: TrainContext, cfg: dict, anchors: dict, anchor_samples: list, seed: int,
                 batch_size: int | None = None):
        self.ctx = ctx
        self.cfg = cfg
        self.eps_budget = float(cfg.get("epsilon", 0.05))
        self.lmbda = float(cfg.get("lambda_init", 0.0)) if cfg.get("dual", True) else float(
            cfg.get("fixed_lambda", 0.1))
        self.lambda_lr = float(cfg.get("lambda_lr", 0.01))
        self.dual = bool(cfg.get("dual", True))
        self.projection = bool(cfg.get("projection", True))
        self.pooling = anchors["pooling"]
        self.layer = int(anchors["layer"])
        self.features = anchors["features"].float()  # [N, D]
        self.samples = anchor_samples
        # anchors per retention step: method.craft.anchor_batch_size (the seeds' craft.anchor_batch_size),
        # independent of the training micro-batch; `batch_size` is only the fallback when unset
        self.batch = int(cfg.get("anchor_batch_size") or batch_size or 8)
        self.overflow = False
        self.gen = torch.Generator().manual_seed(int(seed) + 104729)
        self._logs: dict = {}
        self._acc: dict = {}

    def retention_loss(self) -> torch.Tensor:
        """L_ret = MSE(student feature, cached teacher feature) on a fresh anchor mini-batch."""
        from ..methods.craft import pool_features

        n = len(self.samples)
        idx = torch.randperm(n, generator=self.gen)[: min(self.batch, n)].tolist()
        abatch = self.ctx.backend.collate([self.samples[i] for i in idx])
        # the unwrapped model: this backward is ours, not DDP's (g_ret is all-reduced below)
        model = self.ctx.model.module if hasattr(self.ctx.model, "module") and self.ctx.world_size > 1 \
            else self.ctx.model
        with self.ctx.autocast():  # the anchor layer's states only; the forward stops there
            hs = self.ctx.backend.hidden_states_at(abatch, [self.layer], model=model)[self.layer]
        feat = pool_features(hs.float(), abatch, self.pooling, self.ctx.backend.n_image_tokens)
        target = self.features[idx].to(feat.device)
        return torch.nn.functional.mse_loss(feat, target)

    def before_step(self) -> None:
        """g_act = the step's accumulated action gradient; g_ret from the retention loss; if they
        conflict (dot < 0) project g_act onto g_ret's normal plane; grad = g_act' + λ g_ret."""
        from ..methods.craft import combine, conflict_project

        params = [p for _, p in self.ctx.trainable]
        l_ret = self.retention_loss()
        scaler = self.ctx.scaler  # fp16: the retention backward is loss-scaled like the action one
        if scaler is not None:
            inv = 1.0 / float(scaler.get_scale())
            g_ret = [None if g is None else g * inv
                     for g in torch.autograd.grad(scaler.scale(l_ret), params, allow_unused=True)]
        else:
            g_ret = list(torch.autograd.grad(l_ret, params, allow_unused=True))
        if self.ctx.world_size > 1:
            for g in g_ret:
                if g is not None:
                    torch.distributed.all_reduce(g)
                    g /= self.ctx.world_size
        checks = [torch.isfinite(l_ret.detach()).all()] + [torch.isfinite(g).all() for g in g_ret if g is not None]
        nonfinite = not bool(torch.stack(checks).all())  # one host sync, not one per tensor
        if nonfinite and scaler is not None:
            # an fp16 overflow: a non-finite gradient makes the loop skip the step and lower the scale
            self.overflow = True
        elif nonfinite:  # never let a broken retention term poison the update: action-only step
            g_ret = [None] * len(params)
        g_act = [p.grad for p in params]
        g_act, stats = conflict_project(g_act, g_ret, projection=self.projection)
        for p, g in zip(params, combine(g_act, g_ret, self.lmbda)):
            p.grad = g
        self._acc = {"L_ret": 0.0 if nonfinite else float(l_ret.detach()), "projection": float(stats["projection"]),
                     "grad_dot": stats["grad_dot"], "grad_cos": stats["grad_cos"],
                     "conflict_ratio": stats["conflict_ratio"], "nonfinite": float(nonfinite)}

    def skip_step(self) -> None:
        self._acc = {}

    def dry_logs(self) -> dict:
        return {**self._acc, "lambda": self.lmbda, "epsilon": self.eps_budget}

    def every_step(self, step: int) -> None:
        from ..methods.craft import dual_update

        a, self._acc = self._acc, {}
        before = self.lmbda
        if self.dual and a:
            self.lmbda = float(dual_update(self.lmbda, a["L_ret"], self.eps_budget, self.lambda_lr))
        self._logs = {"L_ret": a.get("L_ret"), "lambda": self.lmbda,
                      "lambda_before": before, "lambda_after": self.lmbda, "epsilon": self.eps_budget,
                      "grad_dot": a.get("grad_dot"), "grad_cos": a.get("grad_cos"),
                      "projection": a.get("projection"), "conflict_ratio": a.get("conflict_ratio"),
                      "retention_nonfinite": a.get("nonfinite"), "retention_mode": "hidden"}

    def logs(self) -> dict:
        out, self._logs = self._logs, {}
        return {k: v for k, v in out.items() if v is not None}

    def state_dict(self) -> dict:
        return {"lambda": self.lmbda, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.lmbda = float(state["lambda"])
        self.gen.set_state(state["gen"])
