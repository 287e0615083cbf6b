"""HSW: hierarchical subspace gradient surgery (pure math; train/plugins/hsw.py hooks it into layers).

For a gradient g [..., D] (e.g. dL/d hidden entering a hooked decoder layer, one D-vector per token):
    g_f = proj(g, U_f),  g_p = proj(g, U_p),  g_n = g - g_f - g_p
    g'  = g_n + beta * g_p + gamma * g_f
    g'  <- g' * min(1, ||g|| / (||g'|| + eps))          (never amplifies)
with proj(g, U) = (g U) U^T for orthonormal U [D, r]. The norm clamp is applied once for the whole
tensor (clamp="per_tensor", the user's research/hooks/hsw_hook.py: torch.norm of the whole gradient)
or per token ("per_token": one norm per D-vector); "none" skips it.
With orthonormal, mutually orthogonal U_f, U_p (icsm.split_directions guarantees it) and
beta, gamma in [0, 1], ||g'|| <= ||g|| already holds per token; the clamp makes it hold for any
beta, gamma (e.g. a Thermostat that overshoots) and is cheap.
"""

from __future__ import annotations

import torch

CLAMPS = ("per_token", "per_tensor", "none")


def proj(g: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of the last dim of g [..., D] onto span(U) (U [D, r] orthonormal)."""
    if U.numel() == 0:
        return torch.zeros_like(g)
    return (g @ U) @ U.T


def _norm_stats(g, gp, gf, gpl, gn) -> dict[str, float]:
    return {
        "g_norm": float(g.norm()),
        "gprime_norm": float(gp.norm()),
        "gf_norm": float(gf.norm()),
        "gp_norm": float(gpl.norm()),
        "gn_norm": float(gn.norm()),
    }


def hsw_surgery(
    g: torch.Tensor,
    U_f: torch.Tensor,
    U_p: torch.Tensor,
    beta: float,
    gamma: float,
    clamp: str = "per_tensor",
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(g' in float32, parts): the surgery of the module doc on the device, no host sync. parts (float32
    tensors): gf, gp, gn (the components of g), scale (the clamp factor: a scalar for per_tensor / none,
    [..., 1] per token). beta = gamma = 1 is NOT short-circuited here (see hsw_transform)."""
    if clamp not in CLAMPS:
        raise ValueError(f"hsw clamp must be one of {CLAMPS}, got {clamp!r}")
    if g.shape[-1] != U_f.shape[0] or g.shape[-1] != U_p.shape[0]:
        raise ValueError(f"hsw: gradient dim {g.shape[-1]} != subspace dim {U_f.shape[0]} / {U_p.shape[0]}")
    x = g.float()
    Uf, Up = U_f.to(device=x.device, dtype=torch.float32), U_p.to(device=x.device, dtype=torch.float32)
    gf = proj(x, Uf)
    gpl = proj(x, Up)
    gn = x - gf - gpl
    out = gn + float(beta) * gpl + float(gamma) * gf
    if clamp == "per_token":
        scale = torch.clamp(x.norm(dim=-1, keepdim=True) / (out.norm(dim=-1, keepdim=True) + eps), max=1.0)
    elif clamp == "per_tensor":
        scale = torch.clamp(x.norm() / (out.norm() + eps), max=1.0)
    else:
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    if clamp != "none":
        out = out * scale
    return out, {"gf": gf, "gp": gpl, "gn": gn, "scale": scale}


def hsw_transform(
    g: torch.Tensor,
    U_f: torch.Tensor,
    U_p: torch.Tensor,
    beta: float,
    gamma: float,
    clamp: str = "per_tensor",
    eps: float = 1e-8,
    stats: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """g' = g_n + beta g_p + gamma g_f, norm-clamped (see module doc). Returns (g' like g, stats).

    Computed in float32 (bf16/fp16 grads are upcast, the result cast back to g's dtype). beta = gamma = 1
    returns g itself (short-circuit: exact identity). stats (floats, whole-tensor Frobenius norms):
    g_norm, gprime_norm, gf_norm, gp_norm, gn_norm, and clamp_scale_min (smallest clamp factor).
    stats=False skips them (no host sync).
    """
    if clamp not in CLAMPS:
        raise ValueError(f"hsw clamp must be one of {CLAMPS}, got {clamp!r}")
    if g.shape[-1] != U_f.shape[0] or g.shape[-1] != U_p.shape[0]:
        raise ValueError(f"hsw: gradient dim {g.shape[-1]} != subspace dim {U_f.shape[0]} / {U_p.shape[0]}")
    if float(beta) == 1.0 and float(gamma) == 1.0:
        if not stats:
            return g, {}
        n = float(g.float().norm())
        gf32 = g.float()
        gf = proj(gf32, U_f.to(gf32))
        gpl = proj(gf32, U_p.to(gf32))
        return g, {
            "g_norm": n,
            "gprime_norm": n,
            "gf_norm": float(gf.norm()),
            "gp_norm": float(gpl.norm()),
            "gn_norm": float((gf32 - gf - gpl).norm()),
            "clamp_scale_min": 1.0,
        }
    out, parts = hsw_surgery(g, U_f, U_p, beta, gamma, clamp=clamp, eps=eps)
    st = {}
    if stats:
        st = _norm_stats(g.float(), out, parts["gf"], parts["gp"], parts["gn"])
        st["clamp_scale_min"] = float(parts["scale"].min()) if parts["scale"].numel() else 1.0
    return out.to(g.dtype), st
