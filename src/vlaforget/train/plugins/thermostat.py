"""Thermostat plug-in: closed-loop beta/gamma from the probe drift (methods.thermostat)."""

from __future__ import annotations

import time

import torch

from ...settings import HswSettings, ThermostatSettings
from ..distributed import on_main, unwrap
from . import Plugin, TrainContext

# ----------------------------------------------------------------------------- Thermostat


class ThermostatPlugin(Plugin):
    """Calibrates before the first optimizer step (student = teacher: `warmup_measurements`
    independent probe draws give the noise floor of d), then every K steps: probe mini-batch
    through the student (no grad), pooled instruction states at the representative layers (the
    probe stage's space: layer outputs before any final norm), drift d vs the teacher's C_T,
    control law -> HSW β/γ."""

    name = "thermostat"

    def __init__(self, ctx: TrainContext, cfg: ThermostatSettings | dict, icsm, probe_samples, seed: int,
                 hsw_cfg: HswSettings | dict | None = None):
        from ...methods.thermostat import ControlLaw

        cfg = ThermostatSettings.of(cfg)
        hsw = HswSettings.of(hsw_cfg) if hsw_cfg else None
        self.ctx = ctx
        self.cfg = cfg
        self.every = cfg.every
        self.batch = cfg.probe_batch
        self.metric = cfg.metric
        self.icsm = icsm
        self.samples = probe_samples  # list of sample dicts (image, instruction, action)
        hsw_on = bool(hsw and hsw.enabled)
        # the control law starts from (and rests at) the configured HSW gains
        self.law = ControlLaw(cfg, beta0=hsw.beta if hsw_on else None, gamma0=hsw.gamma if hsw_on else None)
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)
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

    def measure(self, idx: list[int] | None = None) -> tuple[float, dict]:
        """d on the probe draw idx (a fresh one if None), averaged over reps; this process only."""
        from ...methods.icsm import covariance
        from ...methods.thermostat import drift, projected_covariance

        idx = self.draw() if idx is None else idx
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

    def start(self, step: int) -> None:
        """Before the first optimizer step (the loop calls it once): calibrate unless a resumed
        state already holds the calibration."""
        if self.law.calibrated:
            return
        t0 = time.perf_counter()
        ds = [self.shared_measure()[0] for _ in range(self.law.warmup)]
        self.law.calibrate(ds)
        self.last = {"thermostat_phase": "calibrate", "thermostat_floor": self.law.floor,
                     "thermostat_noise_std": self.law.std, "thermostat_threshold": self.law.threshold,
                     "thermostat_calibration_d": ds, "thermostat_calibration_step": int(step),
                     "thermostat_time_s": time.perf_counter() - t0}

    def every_step(self, step: int) -> None:
        if step % self.every != 0:
            return
        t0 = time.perf_counter()
        d, per_layer = self.shared_measure()
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
    return ThermostatPlugin(ctx, ThermostatSettings.of(mcfg["thermostat"]), icsm, samples, int(sc["seed"]),
                            hsw_cfg=HswSettings.of(mcfg["hsw"]))
