"""HSW gradient surgery identities."""

from __future__ import annotations

import pytest
import torch

from vlaforget.methods.hsw import hsw_transform, proj
from vlaforget.methods.icsm import split_directions


def _subspaces(D=32, nf=4, npl=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, nf + npl + 3, generator=g))
    sp = split_directions(U, None, nf, npl)
    return sp["U_f"], sp["U_p"]


def _g(shape=(3, 7, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identity_is_exact():
    Uf, Up = _subspaces()
    g = _g()
    out, st = hsw_transform(g, Uf, Up, 1.0, 1.0)
    assert out is g
    assert st["g_norm"] == st["gprime_norm"]
    assert abs(st["gf_norm"] ** 2 + st["gp_norm"] ** 2 + st["gn_norm"] ** 2 - st["g_norm"] ** 2) < 1e-3


def test_decomposition_and_zero_gains_remove_components():
    Uf, Up = _subspaces()
    g = _g()
    out, _ = hsw_transform(g, Uf, Up, 0.0, 0.0, clamp="none")
    assert float((out @ Uf).abs().max()) < 1e-5 and float((out @ Up).abs().max()) < 1e-5
    assert torch.allclose(out, g - proj(g, Uf) - proj(g, Up), atol=1e-5)
    out2, _ = hsw_transform(g, Uf, Up, 0.5, 0.25, clamp="none")
    expect = g - proj(g, Uf) - proj(g, Up) + 0.5 * proj(g, Up) + 0.25 * proj(g, Uf)
    assert torch.allclose(out2, expect, atol=1e-5)


@pytest.mark.parametrize("clamp", ["per_token", "per_tensor"])
def test_never_amplifies(clamp):
    Uf, Up = _subspaces()
    g = _g()
    for beta, gamma in [(0.3, 0.0), (2.0, 3.0), (1.0, 5.0), (0.0, 0.0)]:
        out, st = hsw_transform(g, Uf, Up, beta, gamma, clamp=clamp)
        assert st["gprime_norm"] <= st["g_norm"] * (1 + 1e-6)
        if clamp == "per_token":
            assert (out.norm(dim=-1) <= g.norm(dim=-1) * (1 + 1e-5)).all()
    # an amplifying gain is clamped back exactly to ||g|| per token
    out, _ = hsw_transform(g, Uf, Up, 3.0, 3.0, clamp="per_token")
    assert torch.allclose(out.norm(dim=-1), g.norm(dim=-1), rtol=1e-4)
    with pytest.raises(ValueError):
        hsw_transform(g, Uf, Up, 0.5, 0.5, clamp="bogus")


def test_low_precision_grads():
    Uf, Up = _subspaces()
    g = _g().bfloat16()
    out, _ = hsw_transform(g, Uf, Up, 0.5, 0.0)
    assert out.dtype == torch.bfloat16 and out.shape == g.shape
    ref, _ = hsw_transform(g.float(), Uf, Up, 0.5, 0.0)
    assert torch.allclose(out.float(), ref, atol=2e-2, rtol=2e-2)
    out16, _ = hsw_transform(g.half(), Uf, Up, 0.5, 0.0, stats=False)
    assert out16.dtype == torch.float16


def test_empty_subspace_and_dim_check():
    Uf, Up = _subspaces()
    g = _g()
    out, _ = hsw_transform(g, Uf[:, :0], Up, 1.0, 0.0, clamp="none")
    assert torch.allclose(out, g, atol=1e-5)
    with pytest.raises(ValueError, match="gradient dim"):
        hsw_transform(torch.randn(2, 31), Uf, Up, 0.5, 0.5)
