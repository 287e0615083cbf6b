"""Thermostat: closed-loop control of the HSW gains (beta, gamma) from representation drift.

Before the first optimizer step the plug-in calibrates (`ControlLaw.calibrate`: d on independent
probe draws while student = teacher); then every K steps the train loop pools the student's instruction states of a probe mini-batch at the
representative layers, forms C_S (`covariance`) and calls `drift(C_S, C_T, metric, basis)`
(averaged over layers); `ControlLaw.observe(d)` turns d into (beta, gamma). Formulas: docs/methods.md.
"""

from __future__ import annotations

import math

import torch

from ..settings import ThermostatSettings
from .icsm import covariance

__all__ = ["METRICS", "ControlLaw", "covariance", "drift", "projected_covariance"]

METRICS = ("basis", "normalized", "raw")


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
    """Maps drift measurements d to HSW gains (beta, gamma).

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
        self, cfg: ThermostatSettings | dict, beta0: float | None = None, gamma0: float | None = None,
        eps: float = 1e-12
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
            raise ValueError(f"thermostat.warmup_measurements must be >= 1 (calibration draws), got {self.warmup}")
        if self.beta_min <= 0:
            raise ValueError(f"thermostat.beta_min must be > 0 (beta never reaches 0), got {self.beta_min}")
        if self.beta_min > self.beta_max or self.gamma_min > self.gamma_max:
            raise ValueError("thermostat: need beta_min <= beta_max and gamma_min <= gamma_max")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"thermostat.smoothing must be in [0, 1], got {self.smoothing}")
        self.beta0 = float(self.beta_max if beta0 is None else beta0)
        self.gamma0 = float(self.gamma_max if gamma0 is None else gamma0)
        if not self.beta_min <= self.beta0 <= self.beta_max:
            raise ValueError(f"hsw.beta = {self.beta0} is outside [thermostat.beta_min, beta_max] = "
                             f"[{self.beta_min}, {self.beta_max}]: the control law starts from hsw.beta")
        if not self.gamma_min <= self.gamma0 <= self.gamma_max:
            raise ValueError(f"hsw.gamma = {self.gamma0} is outside [thermostat.gamma_min, gamma_max] = "
                             f"[{self.gamma_min}, {self.gamma_max}]: the control law starts from hsw.gamma")
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
            raise RuntimeError("ControlLaw.observe before calibration: the Thermostat calibrates "
                               "before the first optimizer step (calibrate(ds))")
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
        self.beta, self.gamma = float(sd["beta"]), float(sd["gamma"])
        self.beta0 = float(sd.get("beta0", self.beta0))
        self.gamma0 = float(sd.get("gamma0", self.gamma0))
        self.calibration = [float(x) for x in sd["calibration"]]
        self.floor = None if sd["floor"] is None else float(sd["floor"])
        self.std = None if sd["std"] is None else float(sd["std"])
        self.n_obs = int(sd["n_obs"])
        self.last = dict(sd.get("last") or {})
