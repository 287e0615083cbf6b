"""Thermostat plug-in: closed-loop beta/gamma from the probe drift (methods.thermostat)."""

from __future__ import annotations

import time

import torch

from ...settings import HswSettings, ThermostatSettings
from ..distributed import on_main, unwrap
from . import Plugin, TrainContext

# ----------------------------------------------------------------------------- Thermostat


class ThermostatPlugin(Plugin):
    """Probe mini-batch through the student (no grad), pooled instruction states at the
    representative layers (the probe stage's space: layer outputs before any final norm), drift d
    against C_T (estimator `full`: the whole probe set's; `paired`: the same draw's, from the
    teacher's pooled states in probe.pt), control law -> HSW β/γ (posted to the loop's `ctx.gains`,
    which the hsw plug-in adopts before its next use).

    law user (default), the user's timing (vla-scripts/finetune.py of eggplantsalt/icms): the
    0-based step i = number of optimizer steps done is measured after its backward and before its
    optimizer step (`before_step`: the student is θ_i) when i < warmup_steps (measure only) or
    i % every == 0 (control); the law is fed once the step is taken (`every_step`), so new gains
    apply from step i + 1's backward. A step the NaN guard skips drops its measurement (it is
    measured again when redone).
    law calibrated: `start` calibrates before the first optimizer step (student = teacher:
    `warmup_measurements` independent draws), then `every_step` measures after every K-th step."""

    name = "thermostat"

    def __init__(
        self,
        ctx: TrainContext,
        cfg: ThermostatSettings | dict,
        icsm,
        probe_samples,
        seed: int,
        hsw_cfg: HswSettings | dict | None = None,
        teacher_pooled: dict | None = None,
    ):
        from ...methods.thermostat import ESTIMATORS, make_law

        cfg = ThermostatSettings.of(cfg)
        hsw = HswSettings.of(hsw_cfg) if hsw_cfg else None
        self.ctx = ctx
        self.cfg = cfg
        self.every = cfg.every
        self.batch = cfg.probe_batch
        self.metric = cfg.metric
        self.estimator = cfg.estimator
        self.icsm = icsm
        self.samples = probe_samples  # list of sample dicts (image, instruction, action)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"thermostat.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        # paired: the teacher's pooled states of the same probe samples, row k = samples[k]
        self.teacher = None
        if self.estimator == "paired":
            if teacher_pooled is None:
                raise ValueError(
                    "thermostat.estimator paired needs the teacher's pooled probe states "
                    "(probe.pt 'pooled'; given['probe_pooled'] with given probe samples)"
                )
            missing = [r for r in icsm.rep_layers if r not in teacher_pooled]
            if missing:
                raise ValueError(
                    f"thermostat.estimator paired: probe.pt has no pooled states of layers {missing}"
                )
            self.teacher = {int(r): teacher_pooled[r].float() for r in icsm.rep_layers}
            bad = [r for r, X in self.teacher.items() if X.shape[0] != len(probe_samples)]
            if bad:
                raise ValueError(
                    f"thermostat.estimator paired: {len(probe_samples)} probe samples but the "
                    f"teacher's pooled states of layers {bad} have another count"
                )
        hsw_on = bool(hsw and hsw.enabled)
        # the law starts from the configured HSW gains (the user's hsw_beta / hsw_gamma)
        self.law = make_law(cfg, beta0=hsw.beta if hsw_on else None, gamma0=hsw.gamma if hsw_on else None)
        self.user = cfg.law == "user"
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)
        self.step = 0  # optimizer steps done = the 0-based index of the step under way
        self.pending: tuple | None = None  # (step, d, per_layer, seconds) measured in before_step
        self.warmup_log: list = []  # [[step, d], ...] warm-up measurements since the last logs()
        self.last: dict = {}
        self._ct_proj: dict = {}  # rep -> U^T C_T U [r, r]

    def pooled(self, idx: list[int]) -> dict[int, torch.Tensor]:
        """{rep: [n, D]} instruction-pooled student states of probe samples idx (no grad)."""
        from ...models.base import eval_mode
        from ...models.features import pooled_layer_states

        reps = list(self.icsm.rep_layers)
        parts: dict[int, list] = {rep: [] for rep in reps}
        # no-grad chunks no larger than the training micro-batch (thermostat.probe_chunk to change):
        # the probe forward then fits in memory the training step already reserved
        chunk = max(1, int(self.cfg.probe_chunk or self.ctx.stage_cfg["train"]["batch_size"]))
        model = unwrap(self.ctx.model)  # rank 0 alone measures (shared_measure): no DDP forward
        with torch.no_grad(), eval_mode(model):
            for s in range(0, len(idx), chunk):
                batch = self.ctx.backend.collate([self.samples[i] for i in idx[s : s + chunk]])
                with self.ctx.autocast():
                    p, _ = pooled_layer_states(self.ctx.backend, batch, reps, model=model)
                for rep in reps:
                    parts[rep].append(p[rep].float())
        return {rep: torch.cat(v) for rep, v in parts.items()}

    def draw(self) -> list[int]:
        """A fresh probe draw: probe_batch samples without replacement."""
        n = len(self.samples)
        return torch.randperm(n, generator=self.gen)[: min(self.batch, n)].tolist()

    def measure(self, idx: list[int] | None = None, student: dict | None = None) -> tuple[float, dict]:
        """d on the probe draw idx (a fresh one if None), averaged over reps; this process only.
        `student` ({rep: [n, D]}) replaces the student's forward (benchmarks, tests)."""
        from ...methods.thermostat import drift

        idx = self.draw() if idx is None else idx
        per_layer = {}
        for rep, X in (self.pooled(idx) if student is None else student).items():
            c_s, c_t, U = self.covariances(rep, X, idx)
            per_layer[rep] = float(drift(c_s, c_t, metric=self.metric, basis=U))
        d = sum(per_layer.values()) / len(per_layer)
        return d, per_layer

    def covariances(self, rep: int, X: torch.Tensor, idx: list[int]):
        """(C_S, C_T, U) of rep for student states X of draw idx: [D, D] (raw, normalized) or
        U^T C U [r, r] (basis: never forms D x D); C_T the full probe set's or the draw's (paired).
        A draw's covariance is centred on its own mean with 1/n, as the user's
        `_compute_covariance` (the whole probe set's C_T: ICSM's, 1/(N-1))."""
        from ...methods.icsm import covariance
        from ...methods.thermostat import projected_covariance

        U = self.icsm.basis[rep].to(X.device)
        T = None if self.teacher is None else self.teacher[rep][torch.as_tensor(idx)].to(X.device)
        if self.metric == "basis":
            c_s = projected_covariance(X, U, X.mean(0))
            if T is not None:
                return c_s, projected_covariance(T, U, T.mean(0)), U
            if rep not in self._ct_proj:
                C_T = self.icsm.C_T[rep].to(X.device).double()
                self._ct_proj[rep] = U.double().T @ C_T @ U.double()
            return c_s, self._ct_proj[rep], U
        c_s = covariance(X, X.mean(0), dtype=torch.float64)
        if T is not None:
            return c_s, covariance(T, T.mean(0), dtype=torch.float64), U
        return c_s, self.icsm.C_T[rep].to(X.device), U

    def shared_measure(self) -> tuple[float, dict]:
        """measure() under DDP: every rank draws (the generator stays equal everywhere), rank 0
        measures on the bare model and broadcasts d and the per-layer values, so the control law
        gets the same input, hence gives the same β and γ, on every rank. One process: measure()."""
        idx = self.draw()
        if getattr(self.ctx, "world_size", 1) == 1:
            return self.measure(idx)
        reps = [int(r) for r in self.icsm.rep_layers]

        def local():
            d, per = self.measure(idx)
            return [d] + [per[r] for r in reps]

        vals = on_main(local, 1 + len(reps))
        return vals[0], dict(zip(reps, vals[1:]))

    def _post_gains(self) -> None:
        gains = getattr(self.ctx, "gains", None)
        if gains is not None:
            gains.post(self.law.beta, self.law.gamma)

    def start(self, step: int) -> None:
        """Once, after a resume and before the first optimizer step of this process. law user: only
        the step counter (the warm-up happens during training). law calibrated: calibrate unless a
        resumed state already holds the calibration."""
        self.step = int(step)
        self.pending = None
        if self.user or self.law.calibrated:
            return
        t0 = time.perf_counter()
        ds = [self.shared_measure()[0] for _ in range(self.law.warmup)]
        self.law.calibrate(ds)
        self.last = {
            "thermostat_phase": "calibrate",
            "thermostat_floor": self.law.floor,
            "thermostat_noise_std": self.law.std,
            "thermostat_threshold": self.law.threshold,
            "thermostat_calibration_d": ds,
            "thermostat_calibration_step": int(step),
            "thermostat_time_s": time.perf_counter() - t0,
        }

    def before_step(self) -> None:
        """law user: measure θ_i after step i's backward, before its optimizer step (the user's
        finetune.py), when step i is a warm-up or control step."""
        if not self.user or not self.law.due(self.step):
            return
        t0 = time.perf_counter()
        d, per_layer = self.shared_measure()
        self.pending = (self.step, d, per_layer, time.perf_counter() - t0)

    def skip_step(self) -> None:
        self.pending = None  # the step was not taken: its measurement is dropped, the redo measures again

    def every_step(self, step: int) -> None:
        self.step = int(step)
        if self.user:
            if self.pending is None:
                return
            i, d, per_layer, elapsed = self.pending
            self.pending = None
        elif step % self.every == 0:
            t0 = time.perf_counter()
            d, per_layer = self.shared_measure()
            elapsed, i = time.perf_counter() - t0, step
        else:
            return
        beta, gamma, phase = self.law.observe(i, d) if self.user else self.law.observe(d)
        self._post_gains()
        rec = {
            "drift_d": d,
            "thermostat_phase": phase,
            "thermostat_time_s": elapsed,
            "thermostat_step": int(i),
            "thermostat_beta": float(beta),
            "thermostat_gamma": float(gamma),
            **{f"drift_d_L{k}": v for k, v in per_layer.items()},
        }
        if self.user:
            rec.update(thermostat_baseline=self.law.baseline, thermostat_delta=self.law.last.get("delta"))
            if phase == "warmup":
                self.warmup_log.append([int(i), d])
                rec["thermostat_warmup_d"] = list(self.warmup_log)
                rec["thermostat_warmup_n"] = len(self.law.history)
        else:
            rec["thermostat_excess"] = self.law.last.get("excess")
        self.last = {**self.last, **rec}

    def logs(self) -> dict:
        out, self.last, self.warmup_log = self.last, {}, []
        return {k: v for k, v in out.items() if v is not None}

    def state_dict(self) -> dict:
        # warmup_log: warm-up measurements not yet in a logged record (log_every > 1)
        return {
            "law": self.law.state_dict(),
            "gen": self.gen.get_state(),
            "warmup_log": [list(x) for x in self.warmup_log],
        }

    def load_state_dict(self, state: dict) -> None:
        self.law.load_state_dict(state["law"])
        self.gen.set_state(state["gen"])
        self.warmup_log = [list(x) for x in state.get("warmup_log", [])]


def build(ctx: TrainContext, sc: dict, given: dict, train_ds, shared: dict) -> ThermostatPlugin:
    from ..icsm_adapter import icsm_for_run

    mcfg = sc["method"]
    icsm, probe = icsm_for_run(sc, given, train_ds, shared)
    if "probe_samples" in given:
        samples = given["probe_samples"]
    else:
        from ...data.cache import CachedDataset
        from ...data.probe import load_probe

        probe = probe if probe is not None else load_probe(sc["probe_dir"])
        pds = CachedDataset(probe["dataset"]["cache_dir"], split=probe.get("split", "train"))
        samples = [pds[int(i)] for i in probe["indices"]]
    # the teacher's pooled states of the same samples, in the same order (estimator paired)
    pooled = given.get("probe_pooled") if "probe_samples" in given else (probe or {}).get("pooled")
    return ThermostatPlugin(
        ctx,
        ThermostatSettings.of(mcfg["thermostat"]),
        icsm,
        samples,
        int(sc["seed"]),
        hsw_cfg=HswSettings.of(mcfg["hsw"]),
        teacher_pooled=pooled,
    )
