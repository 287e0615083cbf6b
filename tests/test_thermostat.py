"""Thermostat: covariance, drift metrics, the user's control law (warm-up, delta, clamps, state) and
the calibrated law (calibration, monotonicity, beta floor, state)."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlaforget.methods.thermostat import (
    ControlLaw,
    UserLaw,
    covariance,
    drift,
    make_law,
    projected_covariance,
)

CFG = {
    "law": "calibrated",
    "warmup_measurements": 3,
    "threshold_sigmas": 2.0,
    "gain": 1.0,
    "gamma_min": 0.0,
    "gamma_max": 1.0,
    "beta_min": 0.2,
    "beta_max": 1.0,
    "smoothing": 0.0,
}


def test_covariance_matches_torch_cov():
    X = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(covariance(X), torch.cov(X.T), atol=1e-5)
    mu = torch.zeros(5)
    assert torch.allclose(covariance(X, mu), X.T @ X / 40, atol=1e-5)


def test_drift_metrics():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(8, 8, generator=g)
    C_T = A @ A.T
    assert drift(C_T, C_T, "raw") == 0.0
    C_S = 2 * C_T
    assert abs(drift(C_S, C_T, "raw") - float(C_T.norm())) < 1e-3
    assert abs(drift(C_S, C_T, "normalized") - 1.0) < 1e-6
    U, _ = torch.linalg.qr(torch.randn(8, 3, generator=g))
    assert abs(drift(C_S, C_T, "basis", U) - 1.0) < 1e-6
    # a change orthogonal to the basis is invisible to the basis metric, not to the others
    v = torch.randn(8, generator=g)
    v = v - U @ (U.T @ v)
    C_S2 = C_T + torch.outer(v, v)
    assert drift(C_S2, C_T, "basis", U) < 1e-6 and drift(C_S2, C_T, "normalized") > 1e-3
    # invariant to rotating the basis columns
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    C_S3 = C_T + 0.3 * torch.outer(U[:, 0], U[:, 1] + U[:, 0])
    assert abs(drift(C_S3, C_T, "basis", U) - drift(C_S3, C_T, "basis", U @ Q)) < 1e-6
    with pytest.raises(ValueError, match="basis"):
        drift(C_S, C_T, "basis")


def test_projected_covariance_equals_full_path():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(30, 10, generator=g), 1.5 * torch.randn(20, 10, generator=g)
    U, _ = torch.linalg.qr(torch.randn(10, 4, generator=g))
    assert torch.allclose(projected_covariance(X, U), U.T @ covariance(X) @ U, atol=1e-5)
    full = drift(covariance(Y), covariance(X), "basis", U)
    fast = drift(projected_covariance(Y, U), projected_covariance(X, U), "basis", U)
    assert abs(full - fast) < 1e-5
    mu = X.mean(0)
    assert torch.allclose(projected_covariance(Y, U, mu), U.T @ covariance(Y, mu) @ U, atol=1e-5)


def _calibrated(cfg=CFG, **kw):
    law = ControlLaw(cfg, **kw)
    assert not law.calibrated
    law.calibrate([1.0, 1.2, 0.8])
    assert (law.beta, law.gamma) == (kw.get("beta0", 1.0), kw.get("gamma0", 1.0))
    assert law.floor == pytest.approx(1.0) and law.std == pytest.approx(0.2)
    return law


def test_observe_before_calibration_is_an_error():
    """Issue 14.3: no measurement during training counts as calibration (the old law treated the
    first observations, taken while LoRA already trained, as the noise floor)."""
    with pytest.raises(RuntimeError, match="calibrat"):
        ControlLaw(CFG).observe(1.0)


def test_control_starts_and_rests_at_configured_gains():
    """Issue 14.3: the law starts from hsw.beta / hsw.gamma and keeps them inside the noise band
    (the old law started from, and moved towards, beta_max / gamma_max)."""
    law = _calibrated(beta0=0.8, gamma0=0.5)
    b, g, phase = law.observe(1.35)  # inside the noise band
    assert phase == "control" and (b, g) == (pytest.approx(0.8), pytest.approx(0.5))
    b, g, _ = law.observe(1.9)  # excess 0.5: gamma* = 0.5 - 0.5 = 0, beta* = 0.8 - 0.25
    assert g == pytest.approx(0.0) and b == pytest.approx(0.55)
    with pytest.raises(ValueError, match="hsw.gamma"):
        ControlLaw(dict(CFG, gamma_max=0.4), gamma0=0.5)


def test_calibration_then_noise_band_keeps_max_gains():
    law = _calibrated()
    b, g, phase = law.observe(1.35)  # below floor + 2 sigma = 1.4
    assert phase == "control" and (b, g) == (1.0, 1.0)


def test_monotone_in_drift_and_beta_floor():
    gammas, betas = [], []
    for d in (1.0, 1.5, 1.8, 2.5, 5.0, 50.0):
        law = _calibrated()
        b, g, _ = law.observe(d)
        gammas.append(g)
        betas.append(b)
    assert all(x >= y for x, y in itertools.pairwise(gammas)) and gammas[0] > gammas[-1]
    assert all(x >= y for x, y in itertools.pairwise(betas)) and betas[0] > betas[-1]
    assert gammas[-1] == 0.0 and betas[-1] == pytest.approx(0.2)  # clipped; beta never 0
    law = _calibrated()
    b, g, _ = law.observe(1.9)  # excess = (1.9 - 1.4) / 1.0 = 0.5
    assert g == pytest.approx(0.5) and b == pytest.approx(0.75)


def test_smoothing_and_state_dict_roundtrip():
    law = _calibrated(dict(CFG, smoothing=0.5))
    b, g, _ = law.observe(1.9)  # targets 0.75 / 0.5, half-way from 1.0
    assert g == pytest.approx(0.75) and b == pytest.approx(0.875)
    sd = law.state_dict()
    law2 = ControlLaw(dict(CFG, smoothing=0.5))
    law2.load_state_dict(sd)
    assert law2.calibrated and law2.floor == law.floor
    assert law2.observe(3.0) == law.observe(3.0)


def test_invalid_config():
    with pytest.raises(ValueError, match="beta_min"):
        ControlLaw(dict(CFG, beta_min=0.0))
    with pytest.raises(ValueError):
        ControlLaw(CFG).observe(float("nan"))


# ----------------------------------------------------------------------------- the user's law
# eggplantsalt/icms configs/method_icsm_hsw_thermostat.yaml
USER = {
    "law": "user",
    "every": 50,
    "warmup_steps": 100,
    "base_scale": 0.5,
    "k_beta": 0.01,
    "k_gamma": 0.01,
    "beta_min": 0.2,
    "beta_max": 1.0,
    "gamma_min": 0.1,
    "gamma_max": 1.0,
}


def test_user_law_is_the_default_with_the_users_constants():
    from vlaforget.settings import ThermostatSettings

    s = ThermostatSettings.of({})
    assert (s.law, s.every, s.warmup_steps, s.base_scale, s.k_beta, s.k_gamma) == (
        "user",
        50,
        100,
        0.5,
        0.01,
        0.01,
    )
    assert (s.beta_min, s.beta_max, s.gamma_min, s.gamma_max, s.probe_batch) == (0.2, 1.0, 0.1, 1.0, 4)
    assert isinstance(make_law({}), UserLaw) and isinstance(make_law({"law": "calibrated"}), ControlLaw)


def test_user_law_schedule_warmup_every_step_then_every_interval():
    law = UserLaw(USER)
    due = [s for s in range(400) if law.due(s)]
    assert due == list(range(100)) + [100, 150, 200, 250, 300, 350]
    assert [law.phase(s) for s in (0, 99, 100, 101, 149, 150)] == [
        "warmup",
        "warmup",
        "control",
        None,
        None,
        "control",
    ]
    with pytest.raises(ValueError, match="not a measurement step"):
        law.observe(101, 1.0)


def test_user_law_hand_computed():
    """Warm-up holds the gains and averages d; control: delta = max(0, d - 0.5 baseline),
    beta = 1 / (1 + 0.01 delta), gamma likewise, clamped to [0.2, 1] / [0.1, 1]."""
    law = UserLaw(dict(USER, warmup_steps=3, every=2), beta0=0.9, gamma0=0.8)
    for step, d in enumerate((10.0, 20.0, 30.0)):
        assert law.observe(step, d) == (0.9, 0.8, "warmup")  # held at the initial gains
    assert law.baseline == pytest.approx(20.0) and law.history == [[0, 10.0], [1, 20.0], [2, 30.0]]
    b, g, phase = law.observe(4, 110.0)  # delta = 110 - 10 = 100 -> 1 / 2
    assert phase == "control" and (b, g) == (pytest.approx(0.5), pytest.approx(0.5))
    assert law.last["delta"] == pytest.approx(100.0) and law.baseline == pytest.approx(20.0)  # baseline fixed
    b, g, _ = law.observe(6, 5.0)  # d below half the baseline: delta 0 -> the maxima
    assert (b, g) == (1.0, 1.0)
    b, g, _ = law.observe(8, 410.0)  # delta 400 -> 1/5 = 0.2 both; gamma not clamped, beta at its floor
    assert b == pytest.approx(0.2) and g == pytest.approx(0.2)
    b, g, _ = law.observe(10, 10010.0)  # delta 10000 -> 1/101: clamped to beta_min 0.2, gamma_min 0.1
    assert (b, g) == (0.2, 0.1)
    law2 = UserLaw(dict(USER, warmup_steps=3, every=2, k_beta=0.03, beta_max=0.8, gamma_max=0.9))
    for step, d in enumerate((10.0, 20.0, 30.0)):
        law2.observe(step, d)
    b, g, _ = law2.observe(4, 60.0)  # delta 50: beta = 0.8 / 2.5 = 0.32, gamma = 0.9 / 1.5 = 0.6
    assert b == pytest.approx(0.32) and g == pytest.approx(0.6)


def test_user_law_without_warmup_takes_the_first_control_d_as_baseline():
    law = UserLaw(dict(USER, warmup_steps=0, every=5))
    assert law.phase(0) == "control" and law.phase(3) is None
    b, g, _ = law.observe(0, 200.0)  # the user's `drift_baseline or d`: delta = 200 - 100
    assert law.baseline == 200.0 and g == pytest.approx(1 / 2) and b == pytest.approx(1 / 2)


def test_user_law_state_roundtrip_mid_warmup_and_after():
    seq = [(s, 5.0 + s) for s in range(6)] + [(6, 40.0), (9, 80.0), (12, 7.0)]
    cfg = dict(USER, warmup_steps=6, every=3)
    ref = UserLaw(cfg)
    out_ref = [ref.observe(s, d) for s, d in seq]
    for cut in (3, 7):  # interrupted during the warm-up, and after it
        a = UserLaw(cfg)
        out = [a.observe(s, d) for s, d in seq[:cut]]
        b = UserLaw(cfg)
        b.load_state_dict(a.state_dict())
        out += [b.observe(s, d) for s, d in seq[cut:]]
        assert out == out_ref and b.state_dict() == ref.state_dict()
    with pytest.raises(ValueError, match="calibrated"):
        UserLaw(cfg).load_state_dict(ControlLaw(CFG).state_dict())


def test_user_law_invalid_config():
    with pytest.raises(ValueError, match="beta_min"):
        UserLaw(dict(USER, beta_min=0.0))
    with pytest.raises(ValueError, match="every"):
        UserLaw(dict(USER, every=0))
    with pytest.raises(ValueError):
        UserLaw(USER).observe(0, float("inf"))
    with pytest.raises(ValueError, match="law"):
        make_law({"law": "pid"})


# ----------------------------------------------------------------------------- estimators


def _plugin(metric, estimator, teacher, C_T, U, batch, seed=0):
    from types import SimpleNamespace

    from vlaforget.train.plugins import ThermostatPlugin

    icsm = SimpleNamespace(rep_layers=[3], C_T={3: C_T}, basis={3: U})
    ctx = SimpleNamespace(plugins={}, world_size=1)
    cfg = {"metric": metric, "estimator": estimator, "probe_batch": batch}
    return ThermostatPlugin(ctx, cfg, icsm, list(range(teacher.shape[0])), seed, teacher_pooled={3: teacher})


@pytest.mark.parametrize("metric", ["raw", "normalized", "basis"])
def test_paired_estimator_is_zero_at_the_teacher_and_less_noisy(metric):
    """Issue 26.2: paired d = 0 exactly when the student's states equal the teacher's (every draw,
    every metric); full d there is the sampling noise of a small-draw covariance. For a drifted
    student (states A x + b), paired d over draws is closer to the whole-probe drift than full d,
    and over the whole probe set the two estimators agree."""
    g = torch.Generator().manual_seed(0)
    N, D = 200, 12
    T = torch.randn(N, D, generator=g) @ torch.diag(torch.linspace(3.0, 0.3, D))  # anisotropic teacher
    C_T = covariance(T)
    U, _ = torch.linalg.qr(torch.randn(D, 4, generator=g))
    A = torch.eye(D) + 0.15 * torch.randn(D, D, generator=g)
    S = T @ A + 0.5
    truth = drift(covariance(S), C_T, metric, U)
    assert truth > 0
    res = {}
    for est in ("paired", "full"):
        th = _plugin(metric, est, T, C_T, U, batch=16)
        at_teacher, drifted = [], []
        for _ in range(40):
            idx = th.draw()
            at_teacher.append(th.measure(idx, student={3: T[idx]})[0])
            drifted.append(th.measure(idx, student={3: S[idx]})[0])
        res[est] = (torch.tensor(at_teacher, dtype=torch.float64), torch.tensor(drifted, dtype=torch.float64))
    zero, drifted = res["paired"]
    assert torch.all(zero == 0.0)
    noise_full = res["full"][0]
    assert noise_full.min() > 0 and noise_full.mean() > 0.1 * truth  # the full estimator's floor
    err = {e: float((res[e][1] - truth).abs().mean()) for e in res}
    assert err["paired"] < err["full"], err
    assert float(res["paired"][1].std()) < float(res["full"][1].std())
    # a draw of the whole probe set: C_T of the draw is C_T (a draw's covariances use 1/n, the user's)
    everything = list(range(N))

    def cov_n(X):
        return covariance(X, X.mean(0))

    paired = _plugin(metric, "paired", T, C_T, U, batch=N).measure(everything, student={3: S})[0]
    full = _plugin(metric, "full", T, C_T, U, batch=N).measure(everything, student={3: S})[0]
    assert paired == pytest.approx(drift(cov_n(S), cov_n(T), metric, U), rel=1e-5)
    assert full == pytest.approx(drift(cov_n(S), C_T, metric, U), rel=1e-5)
    assert paired == pytest.approx(truth, rel=2e-2) and full == pytest.approx(truth, rel=2e-2)


def test_a_draws_covariance_is_the_users():
    """The user's _compute_covariance: centred on the draw's own mean, divided by n (not n - 1)."""
    g = torch.Generator().manual_seed(3)
    T = torch.randn(10, 5, generator=g)
    X = torch.randn(4, 5, generator=g)
    th = _plugin("raw", "full", T, covariance(T), torch.eye(5)[:, :2], batch=4)
    Xc = X - X.mean(0)
    user = Xc.T @ Xc / 4
    assert th.measure([0, 1, 2, 3], student={3: X})[0] == pytest.approx(
        float((user - covariance(T)).norm()), rel=1e-5
    )


def test_paired_estimator_needs_the_teachers_states():
    from types import SimpleNamespace

    from vlaforget.train.plugins import ThermostatPlugin

    icsm = SimpleNamespace(rep_layers=[3], C_T={3: torch.eye(4)}, basis={3: torch.eye(4)[:, :2]})
    ctx = SimpleNamespace(plugins={}, world_size=1)
    with pytest.raises(ValueError, match="pooled"):
        ThermostatPlugin(ctx, {"estimator": "paired"}, icsm, [0, 1, 2], 0, teacher_pooled=None)
    with pytest.raises(ValueError, match="another count"):
        ThermostatPlugin(
            ctx, {"estimator": "paired"}, icsm, [0, 1, 2], 0, teacher_pooled={3: torch.zeros(5, 4)}
        )
    ThermostatPlugin(ctx, {"estimator": "full"}, icsm, [0, 1, 2], 0)  # full needs none
