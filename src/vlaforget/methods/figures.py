"""Diagnostic figures of the methods' offline artifacts (ICSM sensitivity spectrum)."""

from __future__ import annotations

import io
from pathlib import Path

import torch


def plot_icsm_spectrum(
    path: str | Path,
    scores: torch.Tensor,
    explained: torch.Tensor,
    order: torch.Tensor,
    n_f: int,
    n_p: int,
    rep: int,
    floor: float | None = None,
) -> Path:
    """PNG with two panels: (left) KL sensitivity per direction in variance order, coloured by the
    split (fragile / plastic / null), with 10 x the KL noise floor dashed; (right) explained variance per direction and cumulative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes

    s = scores.double().cpu().numpy()
    ev = explained.double().cpu().numpy()
    r = len(s)
    from .icsm import split_roles

    role = split_roles(order, n_f, n_p)
    colours = {"fragile": "tab:red", "plastic": "tab:blue", "null": "tab:gray"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(1, r + 1)
    for name, col in colours.items():
        pts = [(x, v) for x, v, ro in zip(xs, s, role) if ro == name]
        if pts:
            a1.bar(
                [p[0] for p in pts], [p[1] for p in pts], color=col, label=f"{name} ({len(pts)})", width=0.9
            )
    if floor:
        a1.axhline(10 * floor, color="k", ls="--", lw=0.8, label="10 x noise floor")
    a1.set_xlabel("direction (variance rank)")
    a1.set_ylabel("KL(teacher || perturbed)")
    a1.set_title(f"ICSM sensitivity, layer {rep}")
    if s.max() > 0 and s.max() / max(s[s > 0].min(), 1e-30) > 100:
        a1.set_yscale("log")
    a1.legend(fontsize=8)
    a2.plot(xs, ev, marker=".", label="per direction")
    a2.plot(xs, ev.cumsum(), label="cumulative")
    a2.set_xlabel("direction (variance rank)")
    a2.set_ylabel("explained variance ratio")
    a2.set_title(f"pooled instruction states, layer {rep}")
    a2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
