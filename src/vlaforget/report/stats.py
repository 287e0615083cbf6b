"""Statistics of the paper tables (docs/evaluation.md "Statistics"), all from scipy:

* ``binomial_ci``: Wilson score interval of a success rate pooled over episodes
  (``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``);
* ``paired_bootstrap``: the mean per-seed difference method − reference with a percentile bootstrap CI
  over seeds (``scipy.stats.bootstrap(..., paired=True, vectorized=True)``); "n/a" below two seeds;
* ``mcnemar_exact``: the episode-level paired test on shared initial states: exact McNemar, i.e. a
  two-sided binomial test of the discordant pairs (``scipy.stats.binomtest(b, b + c, 0.5)``), the pairs
  of every seed pooled (each pair is its own stratum: the Cochran–Mantel–Haenszel test over pair strata
  is McNemar's);
* ``holm``: Holm–Bonferroni adjusted p values over all comparisons of one table (Holm 1979, the
  step-down form statsmodels' ``multipletests(method="holm")`` returns; scipy has no Holm);
* ``pareto_front``: the methods no other method beats on both axes (downstream success, retention).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95


def binomial_ci(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials; (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def paired_bootstrap(
    x: Sequence[float], y: Sequence[float], level: float = LEVEL, n_resamples: int = 9999, seed: int = 0
) -> dict:
    """Mean of the paired differences x_i − y_i (one pair per seed) and its percentile bootstrap CI.

    ``n``: pairs; ``low``/``high`` NaN (shown "n/a") with fewer than two pairs. The percentile method,
    not BCa: with 2–10 seeds BCa's acceleration is undefined whenever the differences are all equal.
    Resampling is seeded, so a table is the same bytes on a rerun."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired data of different lengths: {x.shape} vs {y.shape}")
    n = int(x.size)
    diff = float(np.mean(x - y)) if n else float("nan")
    out = {"diff": diff, "low": float("nan"), "high": float("nan"), "n": n}
    if n < 2:
        return out
    if np.all(x - y == (x - y)[0]):  # no spread: every resample gives the same mean
        out["low"] = out["high"] = diff
        return out
    from scipy.stats import bootstrap

    kw = {"rng": np.random.default_rng(seed)}
    if "rng" not in inspect.signature(bootstrap).parameters:  # scipy < 1.15
        kw = {"random_state": np.random.default_rng(seed)}
    res = bootstrap(
        (x, y),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        paired=True,
        vectorized=True,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        **kw,
    )
    out["low"], out["high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of paired binary outcomes a_i, b_i (the same initial state i).

    ``a_only``: pairs a solved and b did not, ``b_only`` the reverse; p = two-sided binomial test of
    a_only out of the discordant pairs at 1/2 (1.0 without discordant pairs)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes of different lengths: {a.shape} vs {b.shape}")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0
    if a_only + b_only:
        from scipy.stats import binomtest

        p = float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "n_pairs": int(a.size), "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p values (NaN entries are kept NaN and not counted).

    Sorted ascending p_(1) ≤ … ≤ p_(m): adj_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)); reject H_(i) at
    level α iff adj_(i) ≤ α. Same as statsmodels.stats.multitest.multipletests(p, method="holm")[1]."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
        out[order] = adj
    return [float(v) for v in out]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """True for each (x, y) no other point dominates (≥ on both, > on one); NaN points are never on it."""
    pts = [(float(x), float(y)) for x, y in points]
    ok = [not (math.isnan(x) or math.isnan(y)) for x, y in pts]
    front = []
    for i, (x, y) in enumerate(pts):
        if not ok[i]:
            front.append(False)
            continue
        dominated = any(
            ok[j] and j != i and pts[j][0] >= x and pts[j][1] >= y and (pts[j][0] > x or pts[j][1] > y)
            for j in range(len(pts))
        )
        front.append(not dominated)
    return front
