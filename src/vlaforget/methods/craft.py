"""CRaFT: constrained retention fine-tuning (pure math + the `craft-anchors` stage).

Training (train/plugins/craft.py): L_ret = MSE(student feature, cached teacher feature);
    dual:        lambda <- max(0, lambda + lr * (L_ret - epsilon))              (`dual_update`)
    conflict:    if <g_act, g_ret> < 0:  g_act <- g_act - <g_act, g_ret> / ||g_ret||^2 * g_ret
    update:      g = g_act_proj + lambda * g_ret                               (`conflict_project`)
Anchors (this stage): teacher features hidden_states[layer] pooled per `pooling` for n_anchors seeded
samples of the data the run trains on (the suite's train split, or the few-shot subset of a few-shot
run) -> anchors.pt; `check_anchors` compares the cache with the run before its first step.
Formulas: docs/methods.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import MethodConfigError, MissingInput

log = logging.getLogger("vlaforget.craft")

POOLINGS = ("mean_image_tokens", "mean_instruction_tokens", "mean_all")


# ----------------------------------------------------------------------------- math


def dual_update(lmbda: float, L_ret: float, epsilon: float, lr: float) -> float:
    """Projected dual ascent: max(0, lambda + lr * (L_ret - epsilon))."""
    return max(0.0, float(lmbda) + float(lr) * (float(L_ret) - float(epsilon)))


def conflict_project(
    g_act_list: Sequence[torch.Tensor | None],
    g_ret_list: Sequence[torch.Tensor | None],
    projection: bool = True,
    eps: float = 1e-20,
) -> tuple[list[torch.Tensor | None], dict]:
    """Conflict-aware projection of the action gradient (A-GEM / PCGrad rule), over all parameters.

    Inputs: per-parameter gradients (same order; None = no gradient = zeros). The dot product is global
    (all tensors flattened and concatenated). If dot < 0 and `projection`, returns
    g_act - dot / ||g_ret||^2 * g_ret (then <result, g_ret> = 0 up to rounding), else g_act unchanged.
    stats: grad_dot, grad_cos, g_act_norm, g_ret_norm, projection (bool; alias projected), conflict_ratio (share of
    parameter tensors, among those with both gradients, whose own dot < 0), n_tensors, nonfinite.
    Accumulates in float32; results keep each gradient's dtype.
    """
    if len(g_act_list) != len(g_ret_list):
        raise ValueError(
            f"conflict_project: {len(g_act_list)} action grads vs {len(g_ret_list)} retention grads"
        )
    # Vectorised: one flat fp32 copy of each side, per-tensor dots by one segment reduction (a loop
    # of per-tensor kernels cost ~0.15 s per step at 7B shape with ~800 LoRA tensors: docs/benchmarks.md)
    both = [i for i, (ga, gr) in enumerate(zip(g_act_list, g_ret_list)) if ga is not None and gr is not None]
    for i in both:
        if g_act_list[i].shape != g_ret_list[i].shape:
            raise ValueError(
                f"conflict_project: shapes differ {tuple(g_act_list[i].shape)} vs "
                f"{tuple(g_ret_list[i].shape)}"
            )
    only_a = [
        g.detach().reshape(-1).float() for g, r in zip(g_act_list, g_ret_list) if g is not None and r is None
    ]
    only_r = [
        r.detach().reshape(-1).float() for g, r in zip(g_act_list, g_ret_list) if r is not None and g is None
    ]
    dot = na2 = nr2 = None
    n_conf = n_both = 0
    if both:
        A = torch.cat([g_act_list[i].detach().reshape(-1).float() for i in both])
        R = torch.cat([g_ret_list[i].detach().reshape(-1).float() for i in both])
        lengths = torch.tensor([g_act_list[i].numel() for i in both], device=A.device)
        per = torch.segment_reduce(A * R, "sum", lengths=lengths)  # per-tensor dots
        dot, na2, nr2 = per.sum(), A @ A, R @ R
        n_both = len(both)
        n_conf_t = (per < 0).sum()
    # norms also include tensors that only one side has
    for a in only_a:
        na2 = a @ a if na2 is None else na2 + a @ a
    for r in only_r:
        nr2 = r @ r if nr2 is None else nr2 + r @ r
    scal = [x if x is not None else torch.zeros(()) for x in (dot, na2, nr2)]
    vals = torch.stack(
        [x.detach().float().cpu() if x.device.type != "cpu" else x.detach().float() for x in scal]
        + ([n_conf_t.float().cpu()] if both else [])
    )  # one host sync
    dot_f = float(vals[0]) if dot is not None else 0.0
    na = math.sqrt(float(vals[1])) if na2 is not None else 0.0
    nr = math.sqrt(float(vals[2])) if nr2 is not None else 0.0
    n_conf = int(vals[3]) if both else 0
    cos = dot_f / (na * nr) if na > 0 and nr > 0 else 0.0
    nonfinite = not all(math.isfinite(x) for x in (dot_f, na, nr))
    do_proj = bool(projection and dot_f < 0 and nr > 0 and not nonfinite)
    out: list[torch.Tensor | None] = []
    if do_proj:
        coef = dot_f / max(nr * nr, eps)
        proj = {}
        if both:
            flat = A.sub_(R, alpha=coef)  # A is a fresh copy (cat): update it in place
            for i, piece in zip(both, torch.split(flat, [g_act_list[i].numel() for i in both])):
                proj[i] = piece.view_as(g_act_list[i]).to(g_act_list[i].dtype)
        for i, (ga, gr) in enumerate(zip(g_act_list, g_ret_list)):
            if gr is None:
                out.append(ga)
            elif ga is None:
                out.append((-coef * gr.float()).to(gr.dtype))
            else:
                out.append(proj[i])
    else:
        out = list(g_act_list)
    stats = {
        "grad_dot": dot_f,
        "grad_cos": cos,
        "g_act_norm": na,
        "g_ret_norm": nr,
        "projection": do_proj,
        "projected": do_proj,
        "conflict_ratio": (n_conf / n_both) if n_both else 0.0,
        "n_tensors": n_both,
        "nonfinite": nonfinite,
    }
    return out, stats


def combine(
    g_act_proj: Sequence[torch.Tensor | None], g_ret: Sequence[torch.Tensor | None], lmbda: float
) -> list[torch.Tensor | None]:
    """g = g_act_proj + lambda * g_ret, per parameter (None + None = None)."""
    out: list[torch.Tensor | None] = []
    pair_a, pair_r, at = [], [], []
    for i, (a, r) in enumerate(zip(g_act_proj, g_ret)):
        if r is None:
            out.append(a)
        elif a is None:
            out.append(float(lmbda) * r)
        else:
            out.append(None)
            pair_a.append(a)
            pair_r.append(r.to(a.dtype))
            at.append(i)
    if at:  # one fused launch for all pairs instead of one add per tensor
        for i, t in zip(at, torch._foreach_add(pair_a, pair_r, alpha=float(lmbda))):
            out[i] = t
    return out


def sequence_mask(batch: dict, n_image_tokens: int) -> torch.Tensor:
    """attention_mask [B,T] in text coords -> [B, T + n_img] in sequence coords (patches at 1..n_img)."""
    am = batch["attention_mask"]
    ones = torch.ones(am.shape[0], n_image_tokens, dtype=am.dtype, device=am.device)
    return torch.cat([am[:, :1], ones, am[:, 1:]], dim=1)


def prompt_mask(batch: dict, n_image_tokens: int) -> torch.Tensor:
    """[B, S] non-padding positions BEFORE the first ground-truth action token (the prompt: <s>, image
    patches, text incl. the separator), in sequence coordinates. batch['action_mask'] marks the
    positions whose logits predict the action tokens, so the first action token sits one later."""
    m = sequence_mask(batch, n_image_tokens).bool()
    am = batch["action_mask"].bool()
    S = m.shape[1]
    first = torch.where(am.any(1), am.float().argmax(1) + 1, torch.full_like(am[:, 0], S, dtype=torch.long))
    pos = torch.arange(S, device=m.device)[None]
    return m & (pos < first.to(m.device)[:, None])


def pool_features(hidden: torch.Tensor, batch: dict, pooling: str, n_image_tokens: int) -> torch.Tensor:
    """Pooled feature [B,D] (float32) of hidden [B,S,D]:
    mean_image_tokens = mean over sequence positions 1..n_image_tokens;
    mean_instruction_tokens = mean over batch['instruction_mask'] (empty -> zeros);
    mean_all = mean over every non-padding position of the prompt (`prompt_mask`): the ground-truth
    action tokens and </s>, which the policy never sees as input at inference, are excluded."""
    from ..models.features import pool_instruction

    S = hidden.shape[1]
    if pooling == "mean_image_tokens":
        if n_image_tokens < 1 or n_image_tokens + 1 > S:
            raise ValueError(
                f"mean_image_tokens: n_image_tokens={n_image_tokens} does not fit sequence length {S}"
            )
        return hidden[:, 1 : 1 + n_image_tokens].float().mean(dim=1)
    if pooling == "mean_instruction_tokens":
        return pool_instruction(hidden, batch["instruction_mask"])[0]
    if pooling == "mean_all":
        m = prompt_mask(batch, n_image_tokens)
        if m.shape[1] != S:
            raise ValueError(f"mean_all: mask length {m.shape[1]} != sequence length {S}")
        return pool_instruction(hidden, m)[0]
    raise ValueError(f"unknown pooling '{pooling}': use one of {POOLINGS}")


def retention_loss(student_feat: torch.Tensor, anchor_feat: torch.Tensor) -> torch.Tensor:
    """L_ret = mean squared error between pooled student and cached teacher features."""
    return torch.nn.functional.mse_loss(student_feat.float(), anchor_feat.to(student_feat.device).float())


# ----------------------------------------------------------------------------- anchors stage


def select_anchor_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """min(n, n_total) distinct seeded indices, sorted (the probe's selection, data/probe.py)."""
    from ..data.probe import select_indices

    return select_indices(n_total, min(int(n), n_total), seed)


@torch.no_grad()
def anchor_features(
    backend,
    samples: Sequence[dict],
    layer: int,
    batch_size: int,
    poolings: Sequence[str] = POOLINGS,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """{pooling: [N,D] float32} of hidden_states[layer] for every pooling (one forward per batch)."""
    from ..io import progress

    acc: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    rng = range(0, len(samples), batch_size)
    for s0 in progress(rng, desc="anchors") if show_progress else rng:
        batch = backend.collate(list(samples[s0 : s0 + batch_size]), train=False)
        hs = backend.forward(batch, output_hidden_states=True).hidden_states
        h = hs[layer]
        for p in poolings:
            acc[p].append(pool_features(h, batch, p, int(backend.n_image_tokens)).cpu())
    return {p: torch.cat(v) for p, v in acc.items()}


def check_anchors(
    anchors: dict,
    *,
    hidden_size: int,
    num_layers: int,
    pooling: str,
    where: str,
    layer: int | None = None,
    dtype: str | None = None,
    shots: int | None = None,
    seed: int | None = None,
) -> None:
    """Before the first step: the anchor cache must match the run (layer, pooling, dtype, hidden
    size, data subset). Raises MethodConfigError naming both sides."""
    have, want = {}, {}
    feats = anchors.get("features_by_pooling") or {anchors.get("pooling"): anchors.get("features")}
    if pooling not in feats:
        have["poolings"], want["pooling"] = sorted(feats), pooling
    f = feats.get(pooling, anchors.get("features"))
    d = int(f.shape[-1]) if f is not None else None
    for k, v_have, v_want in (
        ("hidden_size", anchors.get("hidden_size", d), hidden_size),
        ("feature_dim", d, hidden_size),
    ):
        if v_have is not None and int(v_have) != int(v_want):
            have[k], want[k] = int(v_have), int(v_want)
    if layer is not None and int(anchors.get("layer", layer)) != int(layer):
        have["layer"], want["layer"] = int(anchors["layer"]), int(layer)
    if "layer_abs" in anchors and layer is not None:
        if int(anchors["layer_abs"]) != int(layer) % (int(num_layers) + 1):
            have["layer_abs"], want["layer_abs"] = (
                int(anchors["layer_abs"]),
                int(layer) % (int(num_layers) + 1),
            )
    if dtype is not None and anchors.get("model_dtype") is not None and anchors["model_dtype"] != dtype:
        have["dtype"], want["dtype"] = anchors["model_dtype"], dtype
    if "shots" in anchors or shots:
        if (anchors.get("shots") or None) != (shots or None) or (
            shots and int(anchors.get("shots_seed", -1)) != int(seed)
        ):
            have["shots"] = [anchors.get("shots"), anchors.get("shots_seed")]
            want["shots"] = [shots, seed if shots else None]
    if have:
        raise MethodConfigError(
            f"CRaFT anchor cache {where} does not fit this run: cache has {have}, the run needs {want}. "
            "Rerun the craft_anchors rule for this run's suite / shots, or fix craft.layer / craft.anchor"
        )


def load_anchors(d: str | Path) -> dict:
    d = Path(d)
    if not (d / "anchors.pt").exists():
        raise MissingInput(f"{d}/anchors.pt not found: run the craft-anchors stage first")
    return torch.load(d / "anchors.pt", map_location="cpu", weights_only=True)
