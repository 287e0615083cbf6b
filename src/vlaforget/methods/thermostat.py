"""Thermostat: closed-loop control of the HSW gains (beta, gamma) from representation drift.

A measurement pools the student's instruction states of a probe mini-batch at the representative
layers, forms C_S (`covariance`) and calls `drift(C_S, C_T, metric, basis)` (averaged over layers);
C_T is the full probe set's (estimator `full`, the user's) or that of the same draw from the teacher's
stored states (`paired`: d = 0 when student = teacher). Two control laws turn d into (beta, gamma):

- `UserLaw` (thermostat.law: user, default): the user's research/thermostat/thermostat.py
  (eggplantsalt/icms): a measure-only warm-up of `warmup_steps` training steps (d every step, gains
  held) gives the baseline = mean warm-up d; then every `every` steps
  delta = max(0, d - base_scale * baseline), beta = beta_max / (1 + k_beta * delta), gamma likewise,
  clamped.
- `ControlLaw` (thermostat.law: calibrated): calibration before the first optimizer step on
  independent draws with student = teacher (`ControlLaw.calibrate`), then excess over the noise band.

Formulas: docs/methods.md section 4.
"""

from __future__ import annotations

import math

import torch

from ..settings import ThermostatSettings
from .icsm import covariance

__all__ = [
    "ESTIMATORS",
    "LAWS",
    "METRICS",
    "ControlLaw",
    "UserLaw",
    "covariance",
    "drift",
    "make_law",
    "projected_covariance",
]

METRICS = ("basis", "normalized", "raw")
ESTIMATORS = ("full", "paired")
LAWS = ("user", "calibrated")


def drift(
    C_S: torch.Tensor,
    C_T: torch.Tensor,
    metric: str = "basis",
    basis: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> float:
    """Distance between student and teacher covariances [D,D].

    raw        = ||C_S - C_T||_F
    normalized = ||C_S - C_T||_F / ||C_T||_F
    basis      = ||U^T (C_S - C_T) U||_F / ||U^T C_T U||_F with U [D,r] the ICSM basis (r x r: the
                 part of the drift inside the instruction subspace; far less noisy than D x D when C_S
                 comes from <= 64 samples). Computed in float64.
    """
    if metric not in METRICS:
        raise ValueError(f"thermostat metric must be one of {METRICS}, got {metric!r}")
    S, T = C_S.double(), C_T.to(C_S.device).double()
    if metric == "raw":
        return float((S - T).norm())
    if metric == "normalized":
        return float((S - T).norm() / (T.norm() + eps))
    if basis is None:
        raise ValueError("thermostat metric 'basis' needs the ICSM basis (IcsmArtifacts.layers[rep].U)")
    r = basis.shape[1]
    U = basis.to(S.device).double()
    Sb = S if S.shape == (r, r) else U.T @ S @ U  # already projected (projected_covariance) or [D,D]
    Tb = T if T.shape == (r, r) else U.T @ T @ U
    return float((Sb - Tb).norm() / (Tb.norm() + eps))


def projected_covariance(
    X: torch.Tensor, basis: torch.Tensor, mu: torch.Tensor | None = None
) -> torch.Tensor:
    """U^T C U [r,r] straight from pooled states X [N,D] (= covariance(X @ U)): never forms the D x D
    matrix. drift(..., metric='basis', basis=U) accepts it (and a projected C_T) in place of C."""
    U = basis.to(X.device).double()
    Xp = X.double() @ U
    return covariance(Xp, None if mu is None else mu.to(X.device).double() @ U)


class ControlLaw:
    """thermostat.law: calibrated -- maps drift measurements d to HSW gains (beta, gamma).

    Calibration (`calibrate(ds)`, before the first optimizer step, student = teacher): ds are d on
    independent probe draws, so they measure sampling noise only; they set the noise floor
    f = mean(ds) and s = std(ds) (unbiased; 0 for one draw). Control, for each later d:
        excess   = max(0, d - (f + threshold_sigmas * s)) / (f + eps)
        gamma*   = clip(gamma0 - gain * excess,     gamma_min, gamma_max)
        beta*    = clip(beta0  - gain * excess / 2, beta_min,  beta_max)     (beta_min > 0)
        gamma   <- smoothing * gamma + (1 - smoothing) * gamma*     (same for beta; smoothing=0: no EMA)
    beta0 / gamma0 are the configured HSW gains (hsw.beta / hsw.gamma; beta_max / gamma_max when no
    HSW is configured): the gains start there and d within the noise band keeps them there; a larger
    d gives a smaller (or equal) target gamma and beta, and beta never reaches 0.
    """

    def __init__(
        self,
        cfg: ThermostatSettings | dict,
        beta0: float | None = None,
        gamma0: float | None = None,
        eps: float = 1e-12,
    ):
        cfg = ThermostatSettings.of(cfg)
        self.warmup = cfg.warmup_measurements
        self.k = cfg.threshold_sigmas
        self.gain = cfg.gain
        self.gamma_min, self.gamma_max = cfg.gamma_min, cfg.gamma_max
        self.beta_min, self.beta_max = cfg.beta_min, cfg.beta_max
        self.smoothing = cfg.smoothing
        self.eps = eps
        if self.warmup < 1:
            raise ValueError(
                f"thermostat.warmup_measurements must be >= 1 (calibration draws), got {self.warmup}"
            )
        if self.beta_min <= 0:
            raise ValueError(f"thermostat.beta_min must be > 0 (beta never reaches 0), got {self.beta_min}")
        if self.beta_min > self.beta_max or self.gamma_min > self.gamma_max:
            raise ValueError("thermostat: need beta_min <= beta_max and gamma_min <= gamma_max")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"thermostat.smoothing must be in [0, 1], got {self.smoothing}")
        self.beta0 = float(self.beta_max if beta0 is None else beta0)
        self.gamma0 = float(self.gamma_max if gamma0 is None else gamma0)
        if not self.beta_min <= self.beta0 <= self.beta_max:
            raise ValueError(
                f"hsw.beta = {self.beta0} is outside [thermostat.beta_min, beta_max] = "
                f"[{self.beta_min}, {self.beta_max}]: the control law starts from hsw.beta"
            )
        if not self.gamma_min <= self.gamma0 <= self.gamma_max:
            raise ValueError(
                f"hsw.gamma = {self.gamma0} is outside [thermostat.gamma_min, gamma_max] = "
                f"[{self.gamma_min}, {self.gamma_max}]: the control law starts from hsw.gamma"
            )
        self.beta, self.gamma = self.beta0, self.gamma0
        self.calibration: list[float] = []
        self.floor: float | None = None
        self.std: float | None = None
        self.n_obs = 0
        self.last = {"d": None, "excess": None, "phase": "calibrate"}

    @property
    def calibrated(self) -> bool:
        return self.floor is not None

    @property
    def threshold(self) -> float | None:
        return None if self.floor is None else self.floor + self.k * self.std

    def calibrate(self, ds) -> None:
        """Set the noise floor from drift values on independent probe draws (student = teacher)."""
        ds = [float(d) for d in ds]
        if not ds or not all(math.isfinite(d) for d in ds):
            raise ValueError(f"thermostat calibration needs finite drift values, got {ds}")
        t = torch.tensor(ds, dtype=torch.float64)
        self.calibration = ds
        self.floor = float(t.mean())
        self.std = float(t.std(unbiased=True)) if t.numel() > 1 else 0.0
        self.last = {"d": ds[-1], "excess": None, "phase": "calibrate"}

    def targets(self, d: float) -> tuple[float, float, float]:
        """(beta*, gamma*, excess) for a drift d (needs calibration)."""
        if self.floor is None:
            raise RuntimeError("ControlLaw.targets before calibration: call calibrate() first")
        excess = max(0.0, d - self.threshold) / (self.floor + self.eps)
        g = min(self.gamma_max, max(self.gamma_min, self.gamma0 - self.gain * excess))
        b = min(self.beta_max, max(self.beta_min, self.beta0 - self.gain * excess / 2.0))
        return b, g, excess

    def observe(self, d: float) -> tuple[float, float, str]:
        """Feed one drift measurement (after calibration); returns (beta, gamma, 'control')."""
        d = float(d)
        if not math.isfinite(d):
            raise ValueError(f"thermostat: non-finite drift {d}")
        if self.floor is None:
            raise RuntimeError(
                "ControlLaw.observe before calibration: the Thermostat calibrates "
                "before the first optimizer step (calibrate(ds))"
            )
        self.n_obs += 1
        b, g, excess = self.targets(d)
        s = self.smoothing
        self.beta = s * self.beta + (1 - s) * b
        self.gamma = s * self.gamma + (1 - s) * g
        self.beta = max(self.beta, self.beta_min)
        self.last = {"d": d, "excess": excess, "phase": "control"}
        return self.beta, self.gamma, "control"

    def state_dict(self) -> dict:
        return {
            "law": "calibrated",
            "beta": self.beta,
            "gamma": self.gamma,
            "beta0": self.beta0,
            "gamma0": self.gamma0,
            "calibration": list(self.calibration),
            "floor": self.floor,
            "std": self.std,
            "n_obs": self.n_obs,
            "last": dict(self.last),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("law", "calibrated") != "calibrated":
            raise ValueError(
                f"thermostat: checkpoint holds the {sd['law']!r} law's state, this run uses "
                "thermostat.law: calibrated"
            )
        self.beta, self.gamma = float(sd["beta"]), float(sd["gamma"])
        self.beta0 = float(sd.get("beta0", self.beta0))
        self.gamma0 = float(sd.get("gamma0", self.gamma0))
        self.calibration = [float(x) for x in sd["calibration"]]
        self.floor = None if sd["floor"] is None else float(sd["floor"])
        self.std = None if sd["std"] is None else float(sd["std"])
        self.n_obs = int(sd["n_obs"])
        self.last = dict(sd.get("last") or {})


class UserLaw:
    """thermostat.law: user (default) -- the user's control law, research/thermostat/thermostat.py of
    eggplantsalt/icms (`Thermostat.maybe_update` + `ThermostatState`), step for step.

    `due(step)` says whether 0-based training step `step` is measured: every step below
    `warmup_steps` (phase warmup), then steps that are multiples of `every` (phase control).
    `observe(step, d)`:
        warmup : history += [d]; baseline = mean(history); beta, gamma held (at beta0 / gamma0)
        control: baseline fixed (= the first control d if there was no warm-up)
                 delta = max(0, d - base_scale * baseline)
                 beta  = clip(beta_max  / (1 + k_beta  * delta), beta_min,  beta_max)
                 gamma = clip(gamma_max / (1 + k_gamma * delta), gamma_min, gamma_max)
    beta0 / gamma0 = hsw.beta / hsw.gamma (the user's hsw_beta / hsw_gamma), the gains until the
    first control update.
    """

    def __init__(
        self, cfg: ThermostatSettings | dict, beta0: float | None = None, gamma0: float | None = None
    ):
        cfg = ThermostatSettings.of(cfg)
        self.warmup_steps, self.every = int(cfg.warmup_steps), int(cfg.every)
        self.base_scale, self.k_beta, self.k_gamma = (
            float(cfg.base_scale),
            float(cfg.k_beta),
            float(cfg.k_gamma),
        )
        self.gamma_min, self.gamma_max = cfg.gamma_min, cfg.gamma_max
        self.beta_min, self.beta_max = cfg.beta_min, cfg.beta_max
        if self.warmup_steps < 0 or self.every < 1:
            raise ValueError(
                f"thermostat: need warmup_steps >= 0 and every >= 1, got {self.warmup_steps}, {self.every}"
            )
        if min(self.base_scale, self.k_beta, self.k_gamma) < 0:
            raise ValueError("thermostat: base_scale, k_beta and k_gamma must be >= 0")
        if self.beta_min <= 0:
            raise ValueError(f"thermostat.beta_min must be > 0 (beta never reaches 0), got {self.beta_min}")
        if self.beta_min > self.beta_max or self.gamma_min > self.gamma_max:
            raise ValueError("thermostat: need beta_min <= beta_max and gamma_min <= gamma_max")
        self.beta0 = float(self.beta_max if beta0 is None else beta0)
        self.gamma0 = float(self.gamma_max if gamma0 is None else gamma0)
        self.beta, self.gamma = self.beta0, self.gamma0
        self.history: list[list] = []  # [[step, d], ...] of the warm-up
        self.baseline: float | None = None
        self.n_obs = 0
        self.last: dict = {"d": None, "phase": None, "delta": None, "step": None}

    def phase(self, step: int) -> str | None:
        """'warmup', 'control' or None (no measurement) for 0-based training step `step`."""
        if step < self.warmup_steps:
            return "warmup"
        return "control" if step % self.every == 0 else None

    def due(self, step: int) -> bool:
        return self.phase(step) is not None

    def targets(self, d: float, baseline: float) -> tuple[float, float, float]:
        """(beta, gamma, delta) for a drift d against a baseline."""
        delta = max(0.0, d - self.base_scale * baseline)
        b = self.beta_max / (1.0 + self.k_beta * delta)
        g = self.gamma_max / (1.0 + self.k_gamma * delta)
        b = max(self.beta_min, min(self.beta_max, b))
        g = max(self.gamma_min, min(self.gamma_max, g))
        return b, g, delta

    def observe(self, step: int, d: float) -> tuple[float, float, str]:
        """Feed the drift measured at 0-based step `step`; returns (beta, gamma, phase)."""
        d = float(d)
        if not math.isfinite(d):
            raise ValueError(f"thermostat: non-finite drift {d}")
        phase = self.phase(step)
        if phase is None:
            raise ValueError(
                f"thermostat: step {step} is not a measurement step (warmup_steps "
                f"{self.warmup_steps}, every {self.every})"
            )
        self.n_obs += 1
        if phase == "warmup":
            self.history.append([int(step), d])
            self.baseline = sum(x for _, x in self.history) / len(self.history)
            self.last = {"d": d, "phase": phase, "delta": None, "step": int(step)}
            return self.beta, self.gamma, phase
        if self.baseline is None:  # no warm-up (warmup_steps 0): the user's `drift_baseline or d`
            self.baseline = d
        self.beta, self.gamma, delta = self.targets(d, self.baseline)
        self.last = {"d": d, "phase": phase, "delta": delta, "step": int(step)}
        return self.beta, self.gamma, phase

    def state_dict(self) -> dict:
        return {
            "law": "user",
            "beta": self.beta,
            "gamma": self.gamma,
            "beta0": self.beta0,
            "gamma0": self.gamma0,
            "history": [list(x) for x in self.history],
            "baseline": self.baseline,
            "n_obs": self.n_obs,
            "last": dict(self.last),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("law") != "user":
            raise ValueError(
                f"thermostat: checkpoint holds the {sd.get('law', 'calibrated')!r} law's state, "
                "this run uses thermostat.law: user"
            )
        self.beta, self.gamma = float(sd["beta"]), float(sd["gamma"])
        self.beta0, self.gamma0 = float(sd["beta0"]), float(sd["gamma0"])
        self.history = [[int(s), float(x)] for s, x in sd["history"]]
        self.baseline = None if sd["baseline"] is None else float(sd["baseline"])
        self.n_obs = int(sd["n_obs"])
        self.last = dict(sd.get("last") or {})


def make_law(cfg: ThermostatSettings | dict, beta0: float | None = None, gamma0: float | None = None):
    """The control law thermostat.law names: UserLaw ('user') or ControlLaw ('calibrated')."""
    cfg = ThermostatSettings.of(cfg)
    if cfg.law not in LAWS:
        raise ValueError(f"thermostat.law must be one of {LAWS}, got {cfg.law!r}")
    return (UserLaw if cfg.law == "user" else ControlLaw)(cfg, beta0=beta0, gamma0=gamma0)
