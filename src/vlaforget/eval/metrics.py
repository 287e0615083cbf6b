"""Forgetting metrics: pure formulas (docs/evaluation.md, "Forgetting metrics").

* retention ratio  r = score_after / score_before (per capability; None when score_before = 0);
* continual learning on an accuracy matrix R[i, j] = score on task j after learning task i (T × T):
  ACC = mean_j R[T−1, j];  BWT = mean_{j<T−1} (R[T−1, j] − R[j, j]);
  F_j = max_{l<T−1} R[l, j] − R[T−1, j] for j < T−1 (forgetting), mean F = mean_j F_j;
* linear CKA(X, Y) = ‖Ỹᵀ X̃‖²_F / (‖X̃ᵀ X̃‖_F ‖Ỹᵀ Ỹ‖_F) on column-centred features (Kornblith 2019);
* representation drift of covariances: raw ‖C_S − C_T‖_F, normalised by ‖C_T‖_F, and inside the ICSM
  basis U: ‖Uᵀ(C_S − C_T)U‖_F / ‖Uᵀ C_T U‖_F (the thermostat's measure, methods/thermostat.py);
* KL(teacher ‖ student) of next-token distributions, averaged over positions;
* VQA answer match: exact match after lower-casing and stripping punctuation / articles.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np
import torch

from ..methods.thermostat import covariance, drift  # one covariance / drift for training and eval

__all__ = [
    "answer_match",
    "continual_metrics",
    "covariance",
    "drift_metrics",
    "feature_drift",
    "kl_teacher_student",
    "libero_lifelong_metrics",
    "linear_cka",
    "normalize_answer",
    "peak_clamped",
    "retention_ratio",
    "vqa_accuracy",
]


def retention_ratio(after: float, before: float) -> float | None:
    """score after fine-tuning / score of the base model; None if the base scores 0."""
    if before is None or after is None or before == 0:
        return None
    return float(after) / float(before)


def continual_metrics(R: Sequence[Sequence[float]]) -> dict:
    """ACC, BWT and forgetting F_j from the T × T accuracy matrix R[i][j] (row i: after task i)."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be T x T, got shape {R.shape}")
    T = R.shape[0]
    final = R[T - 1]
    acc = float(final.mean())
    if T == 1:
        return {"acc": acc, "bwt": 0.0, "forgetting": [], "mean_forgetting": 0.0}
    bwt = float(np.mean([final[j] - R[j, j] for j in range(T - 1)]))
    F = [float(R[: T - 1, j].max() - final[j]) for j in range(T - 1)]
    return {"acc": acc, "bwt": bwt, "forgetting": F, "mean_forgetting": float(np.mean(F))}


def peak_clamped(curve: Sequence[float]) -> np.ndarray:
    """LIBERO's success curve for FWT_k: every value from the first peak on set to the peak
    (libero/lifelong/algos/base.py: `successes[idx_at_best_succ:] = successes[idx_at_best_succ]`)."""
    c = np.asarray(curve, dtype=np.float64).copy()
    best = int(np.argmax(c))  # first maximum: LIBERO keeps a checkpoint only on a strict improvement
    c[best:] = c[best]
    return c


def libero_lifelong_metrics(
    curves: Sequence[Sequence[float]], R: Sequence[Sequence[float]], kept: Sequence[float] | None = None
) -> dict:
    """LIBERO's FWT, NBT and AUC (Liu et al. 2023, Sec. 5; definitions quoted in docs/evaluation.md),
    checked against LIBERO's code: libero/lifelong/algos/base.py `Sequential.learn_one_task` (the FWT_k
    it returns) at github.com/Lifelong-Robot-Learning/LIBERO commit 8f1084e3.

    K tasks (here: suites) learnt in order. `curves[k]` = success on task k at each evaluated checkpoint
    while learning task k (c_{k,k,e}, e = 0 first: LIBERO evaluates before the first update too);
    `R[t][k]` (t > k) = success on task k after learning task t with the kept checkpoint (c_{t,k});
    R's diagonal and upper triangle are not read.
    c_{k,k} = max_e c_{k,k,e}; e*_k = the earliest checkpoint reaching it (the one LIBERO keeps);
    "pretend that the agent stops learning once it reaches the peak": c_{k,k,e} := c_{k,k} for e ≥ e*_k;
    FWT = (1/K) Σ_k FWT_k,  FWT_k = mean_e c_{k,k,e} (of that clamped curve);
    NBT = (1/(K−1)) Σ_{k<K} NBT_k,  NBT_k = (1/(K−k)) Σ_{t>k} (c_{k,k} − c_{t,k});
    AUC = (1/K) Σ_k AUC_k,  AUC_k = (FWT_k + Σ_{t>k} c_{t,k}) / (K−k+1)   (k 1-based).
    NBT is None for K = 1 (nothing learnt after the task).
    kept[k] (optional): the success of the checkpoint actually carried on to task k+1 when that is
    not the curve's peak (our chained runs carry the final adapter); NBT_k then uses it in place of
    c_{k,k}. Default: c_{k,k} (LIBERO, which carries the peak checkpoint)."""
    K = len(curves)
    if K < 1 or any(len(c) == 0 for c in curves):
        raise ValueError("libero_lifelong_metrics needs ≥ 1 task, each with ≥ 1 evaluated checkpoint")
    Rm = np.asarray(R, dtype=np.float64)
    if Rm.shape != (K, K):
        raise ValueError(f"success matrix must be {K} x {K} (one row per learnt task), got {Rm.shape}")
    fwt_k = [float(np.mean(peak_clamped(c))) for c in curves]
    ckk = [float(np.max(c)) for c in curves]
    if kept is not None and len(kept) != K:
        raise ValueError(f"kept needs one value per task ({K}), got {len(kept)}")
    ref = ckk if kept is None else [float(x) for x in kept]
    nbt_k = [float(np.mean([ref[k] - Rm[t, k] for t in range(k + 1, K)])) for k in range(K - 1)]
    auc_k = [(fwt_k[k] + float(sum(Rm[t, k] for t in range(k + 1, K)))) / (K - k) for k in range(K)]
    return {
        "fwt": float(np.mean(fwt_k)),
        "nbt": float(np.mean(nbt_k)) if nbt_k else None,
        "auc": float(np.mean(auc_k)),
        "fwt_k": fwt_k,
        "nbt_k": nbt_k,
        "auc_k": auc_k,
        "c_kk": ckk,
    }


def _center(X: torch.Tensor) -> torch.Tensor:
    X = torch.as_tensor(X).double()
    return X - X.mean(dim=0, keepdim=True)


def linear_cka(X, Y, eps: float = 1e-12) -> float:
    """Linear CKA between features X [N, D1] and Y [N, D2] of the same N inputs (1 = same up to an
    orthogonal transform and isotropic scale; invariant to those)."""
    X, Y = _center(X), _center(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same inputs: {X.shape[0]} vs {Y.shape[0]} rows")
    num = (Y.T @ X).norm() ** 2
    den = (X.T @ X).norm() * (Y.T @ Y).norm()
    return float(num / (den + eps))


def drift_metrics(C_S: torch.Tensor, C_T: torch.Tensor, basis: torch.Tensor | None = None) -> dict:
    """{raw, normalized, basis} drift of C_S from C_T (basis: None without an ICSM basis)."""
    out = {"raw": drift(C_S, C_T, "raw"), "normalized": drift(C_S, C_T, "normalized"), "basis": None}
    if basis is not None:
        out["basis"] = drift(C_S, C_T, "basis", basis=basis)
    return out


def feature_drift(S: torch.Tensor, T: torch.Tensor, basis: torch.Tensor | None = None) -> dict:
    """drift_metrics of the float64 covariances of student / teacher features S, T [N, D]."""
    return drift_metrics(covariance(S, dtype=torch.float64), covariance(T, dtype=torch.float64), basis)


def kl_teacher_student(logp_teacher: torch.Tensor, logp_student: torch.Tensor) -> float:
    """Mean over positions of KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S); inputs [P, V] log-probs."""
    lt, ls = logp_teacher.double(), logp_student.double()
    if lt.shape != ls.shape:
        raise ValueError(f"teacher / student log-prob shapes differ: {tuple(lt.shape)} vs {tuple(ls.shape)}")
    if lt.shape[0] == 0:
        return 0.0
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    s = str(s).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_match(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == normalize_answer(gold)


def vqa_accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} answers")
    return float(np.mean([answer_match(p, g) for p, g in zip(preds, golds)])) if golds else 0.0
