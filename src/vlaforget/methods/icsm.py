"""ICSM: instruction-conditioned semantic subspaces of the frozen teacher (offline, teacher only).

Pure functions (no model needed) plus the `icsm` stage. Formulas and the split rule: docs/methods.md.

Pipeline per representative layer `rep` (decoder-layer index). Every statistic lives in ONE space: the
residual stream at the output of decoder layer `rep`, before any final norm (`models.features.layer_outputs`, a forward
hook on the layer; HF's hidden_states[L] of the last layer has the final RMSNorm applied, so it is
never used):
  pooled instruction states X [N, D] (probe stage)  ->  centre (mu)  ->  SVD, top-r directions
  ->  sensitivity (KL of the action-token distribution when epsilon * u_k -- the user's unit
      injection; or alpha * std_k * u_k, icsm.injection: std -- is added to the instruction hidden
      states entering layer rep)  ->  order by sensitivity  ->  split: U_f = the fragile_dim most
      sensitive, U_p = the plastic_dim LEAST sensitive, null = the rest (the user's offline_icms.py)
  ->  U{L}_f.pt U{L}_p.pt mu{L}.pt C_T{L}.pt basis{L}.pt, spectrum PNG, meta.json (written last).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MethodConfigError, MissingInput
from ..settings import IcsmSettings

log = logging.getLogger("vlaforget.icsm")


EPSILON_RULE = (
    "directions sorted by sensitivity (KL, descending; KL <= 10x the numerical noise floor counts as 0; "
    "ties broken by variance rank); "
    "fragile = the first n_f directions (icsm.fragile_dim, null = max(1, r'//2)), "
    "plastic = the last n_p, i.e. the least sensitive (icsm.plastic_dim, null = max(1, r'//4)), "
    "n_f + n_p <= r'; null = the directions between them plus the orthogonal complement of the SVD basis"
)

INJECTIONS = ("unit", "std")
SENSITIVITY_DTYPES = ("fp32", "fp64", "model")


# ----------------------------------------------------------------------------- layer groups


def _check_layer(layer: int, num_layers: int, what: str) -> int:
    layer = int(layer)
    if not 0 <= layer < num_layers:
        raise MethodConfigError(
            f"{what}: decoder layer {layer} is outside 0..{num_layers - 1} "
            f"(the model has {num_layers} decoder layers); fix icsm.groups / icsm.layers"
        )
    return layer


def layer_groups(
    num_layers: int, override: dict | None = None, variant: str = "icsm", layers: Any = "auto"
) -> dict[str, dict]:
    """Decoder layers the HSW hooks, grouped by the representative layer whose subspace they share.

    variant "icsm" (default): the last four decoder layers in two groups,
        A = (L-4, L-3) sharing U(L-3), B = (L-2, L-1) sharing U(L-1)   (32 layers: 28,29->29; 30,31->31).
    `override` (config icsm.groups) replaces them: {"A": {"layers": [28, 29], "rep": 29}, ...};
    `layers` (config icsm.layers) = "auto" or four layer indices [a, b, c, d] -> A=(a,b) rep b, B=(c,d) rep d.
    variant "single": one group "all" = the union of the icsm groups' layers, rep = the largest rep.
    variant "all_layers": every decoder layer, each mapped to the nearest icsm rep (ties -> larger rep).
    Only the icsm reps ever need artifacts. Layer l = decoder layer index (its output h_l: layer_outputs).
    """
    L = int(num_layers)
    if override:
        groups = {}
        for name, g in override.items():
            if not isinstance(g, dict) or "layers" not in g or "rep" not in g:
                raise MethodConfigError(f"icsm.groups.{name} must be {{layers: [...], rep: int}}, got {g!r}")
            lays = [_check_layer(x, L, f"icsm.groups.{name}.layers") for x in g["layers"]]
            groups[str(name)] = {
                "layers": sorted(lays),
                "rep": _check_layer(g["rep"], L, f"icsm.groups.{name}.rep"),
            }
    else:
        if layers in (None, "auto"):
            if L < 4:
                raise MethodConfigError(
                    f"ICSM needs at least 4 decoder layers for the A/B groups, model has {L}; "
                    "set icsm.groups explicitly"
                )
            a, b, c, d = L - 4, L - 3, L - 2, L - 1
        else:
            if len(layers) != 4:
                raise MethodConfigError(f"icsm.layers must be 'auto' or four layer indices, got {layers!r}")
            a, b, c, d = (_check_layer(x, L, "icsm.layers") for x in layers)
        groups = {"A": {"layers": [a, b], "rep": b}, "B": {"layers": [c, d], "rep": d}}
    if variant == "icsm":
        return groups
    if variant == "single":
        lays = sorted({x for g in groups.values() for x in g["layers"]})
        return {"all": {"layers": lays, "rep": max(g["rep"] for g in groups.values())}}
    if variant == "all_layers":
        reps = sorted({g["rep"] for g in groups.values()})
        out: dict[str, dict] = {}
        name_of = {g["rep"]: n for n, g in groups.items()}
        for layer in range(L):
            rep = min(reps, key=lambda r: (abs(r - layer), -r))
            out.setdefault(name_of[rep], {"layers": [], "rep": rep})["layers"].append(layer)
        return out
    raise MethodConfigError(f"unknown layer-group variant '{variant}': use icsm | single | all_layers")


def representative_layers(groups: dict[str, dict]) -> list[int]:
    return sorted({int(g["rep"]) for g in groups.values()})


# ----------------------------------------------------------------------------- SVD


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Deterministic sign: the largest-|.| entry of each column is positive."""
    idx = U.abs().argmax(dim=0)
    s = torch.sign(U[idx, torch.arange(U.shape[1])])
    s[s == 0] = 1
    return U * s


def svd_directions(X: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    """Principal directions of the rows of X [N, D].

    mu = mean row; SVD of the centred matrix (float64); U = Vh.T[:, :r'] with r' = min(r, N-1, D)
    (a centred N-row matrix has rank <= N-1). Returns dict mu [D], U [D,r'] (orthonormal columns,
    sign-fixed), S [r'] singular values, std [r'] = S / sqrt(N-1) (std of the rows along each
    direction), explained [r'] = share of total variance per direction.
    """
    if X.dim() != 2 or X.shape[0] < 2:
        raise ValueError(f"svd_directions needs X [N>=2, D], got {tuple(X.shape)}")
    N, D = X.shape
    Xd = X.detach().to(torch.float64).cpu()
    mu = Xd.mean(dim=0)
    Xc = Xd - mu
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    rr = max(1, min(int(r), N - 1, D))
    U = _fix_signs(Vh[:rr].T.contiguous())
    total = (S**2).sum()
    explained = (S[:rr] ** 2) / total if total > 0 else torch.zeros(rr, dtype=torch.float64)
    return {
        "mu": mu.float(),
        "U": U.float(),
        "S": S[:rr].float(),
        "std": (S[:rr] / math.sqrt(max(N - 1, 1))).float(),
        "explained": explained.float(),
    }


def covariance(
    X: torch.Tensor, mu: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Covariance [D,D] of rows X [N,D] (float64 accumulation, `dtype` result): centred on their own
    mean with 1/(N-1), or on the given `mu` with 1/N. The one covariance of the package (ICSM's C_T,
    the thermostat's C_S, the forgetting stage's drift with dtype=float64)."""
    Xd = torch.as_tensor(X).detach().to(torch.float64)
    if mu is None:
        Xc = Xd - Xd.mean(dim=0)
        denom = max(X.shape[0] - 1, 1)
    else:
        Xc = Xd - mu.to(Xd)
        denom = max(X.shape[0], 1)
    return (Xc.T @ Xc / denom).to(dtype)


# ----------------------------------------------------------------------------- sensitivity


def _expand(batch: dict, k: int) -> dict:
    """Repeat every per-sample entry of a collated batch k times (rows s0d0, s0d1, ..., s1d0, ...)."""
    B = None
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            B = v.shape[0]
            break
    out = {}
    for key, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B:
            out[key] = v.repeat_interleave(k, dim=0)
        elif isinstance(v, list) and len(v) == B:
            out[key] = [x for x in v for _ in range(k)]
        else:
            out[key] = v
    return out


def _injection_hook(layer: torch.nn.Module, where: str, state: dict):
    """Register a hook adding state['delta'] [B,D] at the positions state['mask'] [B,S]."""

    def add(h: torch.Tensor) -> torch.Tensor:
        d = state.get("delta")
        if d is None:
            return h
        m = state["mask"].to(h.dtype).unsqueeze(-1)
        return h + m * d.to(h.dtype).unsqueeze(1)

    if where == "input":

        def pre(module, args, kwargs):
            if args:
                return (add(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = add(kwargs["hidden_states"])
            return args, kwargs

        return layer.register_forward_pre_hook(pre, with_kwargs=True)
    if where == "output":

        def post(module, args, output):
            if isinstance(output, tuple):
                return (add(output[0]),) + tuple(output[1:])
            return add(output)

        return layer.register_forward_hook(post)
    raise ValueError(f"inject must be 'input' or 'output', got {where!r}")


class _prefix_replaced:
    """Context: decoder layers 0..rep-2 return their input, layer rep-1 returns `cached` (its teacher
    output for the unexpanded batch) repeated k times per row, in the layer's own output format."""

    def __init__(self, layers, rep: int, cached, k: int):
        self.layers, self.rep, self.k = layers, rep, k
        self.is_tuple = isinstance(cached, tuple)
        h = cached[0] if self.is_tuple else cached
        self.rest = tuple(cached[1:]) if self.is_tuple else ()
        self.hidden = h.repeat_interleave(k, dim=0)

    def _wrap(self, h):
        return (h,) + self.rest if self.is_tuple else h

    def __enter__(self):
        def identity(*args, **kwargs):
            return self._wrap(args[0] if args else kwargs["hidden_states"])

        def cached(*args, **kwargs):
            return self._wrap(self.hidden)

        for j in range(self.rep):
            self.layers[j].forward = identity if j < self.rep - 1 else cached
        return self

    def __exit__(self, *exc):
        for j in range(self.rep):
            self.layers[j].__dict__.pop("forward", None)
        return False


def kl_teacher_perturbed(lp_teacher: torch.Tensor, lp_pert: torch.Tensor) -> torch.Tensor:
    """KL(teacher || perturbed) per row: log-probs [B,A,n_bins] -> [B], summed over bins, mean over A.

    float64: for a perturbation of size eps the KL is O(eps^2) (1e-7 and below at the default
    eps = 1e-3) while the per-bin log-prob differences are O(eps) and cancel to first order; in
    float32 their rounding (~1e-7 per bin at |log p| ~ 5) is as large as the KL itself. Pass
    log-probs computed in float64 (log_softmax of float64 logits) to keep them exact."""
    lt, lq = lp_teacher.double(), lp_pert.double()
    return (lt.exp() * (lt - lq)).sum(-1).mean(-1)


@torch.no_grad()
def sensitivity_scores(
    backend,
    samples: Sequence[dict],
    U: torch.Tensor,
    scales: torch.Tensor,
    rep: int,
    alpha: float = 1.0,
    direction_batch: int = 16,
    inject: str = "input",
    skip_prefix: bool = True,
    show_progress: bool = False,
) -> torch.Tensor:
    """Fragility of each direction: mean over `samples` of KL(teacher || perturbed) of the action-token
    distribution when `alpha * scales[k] * U[:, k]` is added to every instruction position
    (batch['instruction_mask']) of the residual stream at decoder layer `rep`. The user's unit injection
    epsilon * u_k: scales = 1, alpha = epsilon; the std-scaled one: scales = std, alpha = alpha.
    Log-probs and KL in float64 (kl_teacher_perturbed); the forwards run in the model's dtype.

    inject="input" (default) adds it to the hidden states entering layer `rep` (= output of layer rep-1,
    h_(rep-1)); inject="output" adds it to the output of layer `rep` (h_rep, before any final norm).
    "input" is the default because the output of the LAST decoder layer at instruction positions
    cannot reach the action logits (causal attention, per-position head): KL would be exactly 0.
    Each forward holds `direction_batch` perturbed copies (directions x samples); the unperturbed
    teacher forward runs once per sample chunk. Returns scores [k] float64 (variance order of U).

    skip_prefix (inject="input", rep >= 1): the perturbed copies share the teacher's residual stream
    up to layer rep, so during perturbed forwards decoder layers 0..rep-2 are replaced by identity
    stubs and layer rep-1 by the cached teacher output (expanded to the copies): only layers
    rep..L-1 (and the embeddings / vision tower) are recomputed. Same scores up to float rounding
    (tested); ~L/(L-rep) times less decoder compute (OpenVLA rep 29: 32 -> 3 layers).
    """
    from ..io import progress

    model = backend.model
    model.eval()
    k = U.shape[1]
    scales = scales.reshape(-1).double()
    if scales.numel() != k:
        raise ValueError(f"scales has {scales.numel()} entries for {k} directions")
    layers = backend.decoder_layers()
    layer = layers[rep]
    skip = bool(skip_prefix) and inject == "input" and rep >= 1
    cap: dict = {}
    dchunk = max(1, min(int(direction_batch), k))
    schunk = max(1, int(direction_batch) // dchunk)
    totals = torch.zeros(k, dtype=torch.float64)
    count = 0
    state: dict = {}
    handle = _injection_hook(layer, inject, state)
    n_chunks = math.ceil(len(samples) / schunk) * math.ceil(k / dchunk)
    bar = progress(total=n_chunks, desc=f"sensitivity L{rep}") if show_progress else None
    try:
        for s0 in range(0, len(samples), schunk):
            chunk = list(samples[s0 : s0 + schunk])
            batch = backend.collate(chunk, train=False)
            state["delta"] = None
            hcap = (
                layers[rep - 1].register_forward_hook(lambda m, a, o: cap.__setitem__("out", o))
                if skip
                else None
            )
            try:
                out = backend.forward(batch)
            finally:
                if hcap is not None:
                    hcap.remove()
            lp_t = backend.action_logprobs(batch, out.logits, dtype=torch.float64)  # [b,A,n]
            b = lp_t.shape[0]
            for d0 in range(0, k, dchunk):
                dirs = (
                    U[:, d0 : d0 + dchunk].T.double() * scales[d0 : d0 + dchunk, None] * float(alpha)
                )  # [kk,D]
                kk = dirs.shape[0]
                big = _expand(batch, kk)
                dev = big["instruction_mask"].device
                state["mask"] = big["instruction_mask"]
                state["delta"] = dirs.float().repeat(b, 1).to(dev)  # row s*kk + j -> direction j
                if skip:
                    with _prefix_replaced(layers, rep, cap["out"], kk):
                        out_p = backend.forward(big)
                else:
                    out_p = backend.forward(big)
                lp_p = backend.action_logprobs(big, out_p.logits, dtype=torch.float64)
                kl = kl_teacher_perturbed(lp_t.repeat_interleave(kk, dim=0), lp_p)  # [b*kk]
                totals[d0 : d0 + kk] += kl.view(b, kk).sum(0).cpu()
                state["delta"] = None
                if bar is not None:
                    bar.update(1)
            count += b
    finally:
        handle.remove()
        if bar is not None:
            bar.close()
    return totals / max(count, 1)


# ----------------------------------------------------------------------------- split


def orthonormalize_pair(U_f: torch.Tensor, U_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-orthonormalise [U_f | U_p] jointly (QR in float64, diag(R) > 0): the columns of U_f span the
    same space as before, U_p is made orthogonal to U_f; for already-orthonormal input this returns
    the input up to rounding."""
    nf = U_f.shape[1]
    M = torch.cat([U_f, U_p], dim=1).double()
    if M.shape[1] == 0:
        return U_f.float(), U_p.float()
    Q, R = torch.linalg.qr(M, mode="reduced")
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    Q = Q * s
    return Q[:, :nf].float().contiguous(), Q[:, nf:].float().contiguous()


def split_counts(r: int, fragile_dim: int | None = None, plastic_dim: int | None = None) -> tuple[int, int]:
    """(n_f, n_p) for r kept directions: the user's offline_icms.py defaults fragile_dim = max(1, r // 2),
    plastic_dim = max(1, r // 4) (null = default); capped so that n_f <= r and n_f + n_p <= r (the user's
    code takes r // 2 of the configured r and lets fragile and plastic overlap when fewer are kept)."""
    for name, v in (("fragile_dim", fragile_dim), ("plastic_dim", plastic_dim)):
        if v is not None and int(v) < 0:
            raise MethodConfigError(f"icsm.{name} = {v} must be >= 0 (or null for the default)")
    r = int(r)
    nf = max(1, r // 2) if fragile_dim is None else int(fragile_dim)
    npl = max(1, r // 4) if plastic_dim is None else int(plastic_dim)
    nf = min(r, nf)
    return nf, min(r - nf, npl)


def sensitivity_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting directions by descending score; ties keep variance order (stable sort)."""
    return torch.sort(-scores.double(), stable=True).indices


def split_directions(
    U: torch.Tensor, scores: torch.Tensor | None, n_f: int | None = None, n_p: int | None = None
) -> dict[str, Any]:
    """Split the columns of U [D,r] (variance order) into fragile / plastic / null, as the user's
    offline_icms.py: order = descending score; U_f = order[:n_f] (most sensitive), U_p = order[-n_p:]
    (least sensitive), null = the directions between them. n_f, n_p: `split_counts` (None = the user's
    defaults r // 2, r // 4).

    scores [r] = sensitivity per column; None = no sensitivity (ablation: variance order, i.e. the
    top-variance n_f directions are fragile and the lowest-variance n_p kept ones plastic). Returns dict
    U_f [D,n_f], U_p [D,n_p], order (sorted column indices), n_f, n_p, n_null. U_f and U_p are
    orthonormal and mutually orthogonal (re-checked by QR).
    """
    r = U.shape[1]
    order = torch.arange(r) if scores is None else sensitivity_order(scores)
    nf, npl = split_counts(r, n_f, n_p)
    Us = U[:, order]
    U_f, U_p = orthonormalize_pair(Us[:, :nf], Us[:, r - npl :])
    return {"U_f": U_f, "U_p": U_p, "order": order, "n_f": nf, "n_p": npl, "n_null": r - nf - npl}


def split_roles(order: torch.Tensor, n_f: int, n_p: int) -> list[str]:
    """Role of each basis column (variance order) under `split_directions`: the first n_f of `order`
    "fragile", the last n_p "plastic" (least sensitive), the rest "null"."""
    r = len(order)
    role = ["null"] * r
    for j, i in enumerate(order.tolist()):
        role[i] = "fragile" if j < n_f else ("plastic" if j >= r - n_p else "null")
    return role


# ----------------------------------------------------------------------------- artifacts


@dataclass
class IcsmLayer:
    rep: int
    U_f: torch.Tensor  # [D, n_f] fragile (sensitivity order)
    U_p: torch.Tensor  # [D, n_p] plastic
    mu: torch.Tensor  # [D] teacher mean of pooled instruction states
    C_T: torch.Tensor  # [D, D] teacher covariance
    U: torch.Tensor  # [D, r'] full SVD basis, variance order
    scores: torch.Tensor  # [r'] KL per basis column
    order: torch.Tensor  # [r'] sensitivity order (indices into U's columns)
    explained: torch.Tensor  # [r'] explained-variance ratio per column
    std: torch.Tensor  # [r'] std of pooled states along each column


@dataclass
class IcsmArtifacts:
    """What the plug-ins need: per representative layer subspaces and teacher statistics."""

    dir: Path
    meta: dict
    groups: dict[str, dict]
    layers: dict[int, IcsmLayer] = field(default_factory=dict)

    @property
    def reps(self) -> list[int]:
        return sorted(self.layers)

    def subspaces(self, rep: int, use_sensitivity_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_f, U_p) of a representative layer; use_sensitivity_order=False = the no-sensitivity
        ablation: the same n_f, n_p, directions taken in variance order (fragile = the n_f of largest
        variance, plastic = the n_p of smallest variance among the r' kept)."""
        lay = self.layers[int(rep)]
        if use_sensitivity_order:
            return lay.U_f, lay.U_p
        sp = split_directions(lay.U, None, lay.U_f.shape[1], lay.U_p.shape[1])
        return sp["U_f"], sp["U_p"]

    def hook_groups(self, variant: str = "icsm", num_layers: int | None = None) -> dict[str, dict]:
        """Layer groups for the HSW (variant icsm | single | all_layers), reps always among self.reps."""
        L = int(num_layers or self.meta["num_layers"])
        return layer_groups(L, override=self.groups, variant=variant)


def load_icsm(d: str | Path, map_location: str = "cpu") -> IcsmArtifacts:
    """Load the icsm stage's artifacts (meta.json must exist: it is the completion file)."""
    from ..io import read_json

    d = Path(d)
    if not (d / "meta.json").exists():
        raise MissingInput(
            f"{d}/meta.json not found: run the icsm stage first "
            "(snakemake ... or `vlaforget icsm --config ...`)"
        )
    meta = read_json(d / "meta.json")
    art = IcsmArtifacts(dir=d, meta=meta, groups={k: dict(v) for k, v in meta["groups"].items()})

    def ld(name):
        return torch.load(d / name, map_location=map_location, weights_only=True)

    for rep in meta["rep_layers"]:
        basis = ld(f"basis{rep}.pt")
        art.layers[int(rep)] = IcsmLayer(
            rep=int(rep),
            U_f=ld(f"U{rep}_f.pt"),
            U_p=ld(f"U{rep}_p.pt"),
            mu=ld(f"mu{rep}.pt"),
            C_T=ld(f"C_T{rep}.pt"),
            U=basis["U"],
            scores=basis["scores"],
            order=basis["order"],
            explained=basis["explained"],
            std=basis["std"],
        )
    return art


# ----------------------------------------------------------------------------- stage


def spread_subset(indices: torch.Tensor, n: int) -> torch.Tensor:
    """min(n, len) entries of `indices` at evenly spaced positions (first and last included)."""
    m = indices.numel()
    if n >= m:
        return indices.clone()
    pos = torch.linspace(0, m - 1, n, dtype=torch.float64).round().long()
    return indices[pos]


def injection_scales(icfg: IcsmSettings | dict, std: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(scales [r'], amplitude) of the sensitivity injection amplitude * scales[k] * u_k:
    icsm.injection "unit" (default, the user's offline_icms.py): epsilon * u_k, a perturbation of norm
    epsilon at every instruction token whatever the direction's variance; "std": alpha * std_k * u_k
    (alpha in units of the pooled states' std along u_k)."""
    icfg = IcsmSettings.of(icfg)
    if icfg.injection == "unit":
        return torch.ones_like(std), float(icfg.epsilon)
    if icfg.injection == "std":
        return std.clone(), float(icfg.alpha)
    raise MethodConfigError(f"icsm.injection = {icfg.injection!r}: use one of {list(INJECTIONS)}")


def compute_layer(
    backend,
    pooled: torch.Tensor,
    samples: Sequence[dict],
    rep: int,
    icfg: IcsmSettings | dict,
    show_progress: bool = False,
) -> dict[str, Any]:
    """All ICSM quantities of one representative layer from pooled probe states [N,D]."""
    icfg = IcsmSettings.of(icfg)
    sv = svd_directions(pooled, icfg.r)
    scales, amplitude = injection_scales(icfg, sv["std"])
    t0 = time.perf_counter()
    # one extra all-zero direction measures the numerical noise floor of the KL (batched bf16 forwards
    # are not bit-identical to the unbatched reference); it costs 1/r more
    U0 = torch.cat([sv["U"], torch.zeros(sv["U"].shape[0], 1)], 1)
    s0 = torch.cat([scales, torch.zeros(1)])
    all_scores = sensitivity_scores(
        backend,
        samples,
        U0,
        s0,
        rep,
        alpha=amplitude,
        direction_batch=icfg.direction_batch,
        show_progress=show_progress,
    )
    scores = all_scores[:-1]
    floor = noise_floor(scores, float(all_scores[-1]))
    t_sens = time.perf_counter() - t0
    sp = split_directions(sv["U"], resolved_scores(scores, floor), icfg.fragile_dim, icfg.plastic_dim)
    return {
        **sv,
        "scores": scores,
        "kl_noise_floor": floor,
        "C_T": covariance(pooled),
        "split": sp,
        "t_sensitivity_s": t_sens,
    }


def noise_floor(scores: torch.Tensor, zero_direction_kl: float) -> float:
    """Numerical floor of the KL scores: the larger of the all-zero direction's KL and the magnitude
    of the most negative score (a true KL is >= 0, so negatives are pure float rounding)."""
    return max(0.0, float(zero_direction_kl), -float(scores.min()) if scores.numel() else 0.0)


def resolved_scores(scores: torch.Tensor, floor: float, factor: float = 10.0) -> torch.Tensor:
    """Scores used for the order: those not above factor * floor are set to 0, so the stable sort
    keeps the variance order among directions whose KL is indistinguishable from rounding."""
    return torch.where(scores > factor * floor, scores, torch.zeros_like(scores))
