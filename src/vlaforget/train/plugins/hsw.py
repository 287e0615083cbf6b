"""HSW plug-in: gradient surgery at the hooked decoder layers (methods.hsw; docs/methods.md §3).

Two modes (`method.hsw.mode`):
  flow_down (default, the user's research/hooks/hsw_hook.py): the gradient flowing DOWN out of each
      hooked layer, dL/d(its input), is replaced by S(g) = g_n + β g_p + γ g_f (clamped), so every
      trainable parameter below it -- lower decoder layers, projector, vision tower -- is trained on
      the surgered gradient; the hooked layer's own parameters see the gradient arriving from above.
  own_params (ablation `hsw_own_params`): only each hooked layer's own parameters get J^T S(g) of the
      true gradient at the layer's output; the gradient passed on is the true one.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from ...settings import HswSettings
from ..distributed import all_reduce_flat
from . import Plugin, TrainContext

MODES = ("flow_down", "own_params")
log = logging.getLogger("vlaforget.train")

_disable = getattr(getattr(torch, "compiler", None), "disable", None) or (lambda f: f)


def _in_backward() -> bool:
    """Inside a backward pass (e.g. a non-reentrant checkpoint recomputing a layer's forward)."""
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f is not None and f() != -1


class _Surgery(torch.autograd.Function):
    """Identity in the forward; the backward returns `surgery(g)` (the gradient passed to the layers below).
    Saves no tensor, so a non-reentrant checkpoint's recomputation sees the same saved-tensor count."""

    @staticmethod
    def forward(ctx, x, surgery):
        ctx.surgery = surgery
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.surgery(g), None


# per-hook statistics on logged steps (sums over micro-batches, then ranks): squared norms of g, g' and
# g's parts, the hook's own-basis components of g', the clamp factor (sum, count), then per basis B of
# the chain: |P_f^B g|^2, |P_f^B g'|^2, |P_p^B g|^2, |P_p^B g'|^2
_FIELDS = ("g", "gprime", "gf", "gp", "gn", "gprime_f", "gprime_p", "scale_sum", "count")


# ----------------------------------------------------------------------------- HSW


def hooked_layers(group_bases: dict, layers, num_layers: int) -> dict:
    """decoder layer -> (U_f, U_p) of the layers HSW hooks. `layers` None: every layer of the groups;
    else those decoder layers (negative from the top, the user's `hsw_layer_ids: [-2, -1]`), each with
    its group's basis, a layer outside every group with the top group's — as the user's finetune.py
    maps a layer outside group A to `rep_layers[-1]`."""
    if layers is None:
        return group_bases
    from ...errors import TrainingError

    top = group_bases[max(group_bases)]
    out = {}
    for layer in layers:
        if not -num_layers <= int(layer) < num_layers:
            raise TrainingError(
                f"hsw.layers has {layer}, outside the model's {num_layers} decoder layers "
                f"(0..{num_layers - 1}, or -1..-{num_layers} from the top)"
            )
        idx = int(layer) % num_layers
        out[idx] = group_bases.get(idx, top)
    return out


class HSWPlugin(Plugin):
    """Gradient surgery at the hooked decoder layers (module doc; docs/methods.md §3).

    flow_down: a forward pre-hook on each hooked layer l passes its input x_l = h_(l-1) through an
    identity autograd.Function whose backward returns S_l(dL/dx_l), S_l with l's group subspaces: the
    user's `register_full_backward_hook` returning the surgered `grad_input`, without the full backward
    hook's restrictions (works under reentrant and non-reentrant gradient checkpointing, DDP, torch.compile
    -- the hook runs eagerly). The per-layer hooks compose like the user's: the gradient below layer l has
    passed every hook at or above l. Inserted only while `active` (CRaFT's retention forward sets it False).

    own_params: for hooked layer l with output h_l and true gradient g_l = dL/dh_l, the trainable
    parameters θ_l of layer l receive J_θl^T S_l(g_l) instead of J_θl^T g_l; the gradient that flows on
    is NOT modified. Implementation: a tensor hook on h_l adds J_θl^T (S(g) − g) to θ_l's .grad before
    autograd accumulates J_θl^T g there (one extra backward through layer l, to its parameters only).
    """

    name = "hsw"

    def __init__(self, ctx: TrainContext, cfg: HswSettings | dict, icsm):
        from ...methods.hsw import hsw_transform

        cfg = HswSettings.of(cfg)
        if cfg.mode not in MODES:
            from ...errors import MethodConfigError

            raise MethodConfigError(f"method.hsw.mode must be one of {MODES}, got {cfg.mode!r}")
        self._transform = hsw_transform
        self.ctx = ctx
        self.mode = cfg.mode
        self.beta = cfg.beta
        self.gamma = cfg.gamma
        self.clamp = cfg.clamp
        self.eps = cfg.eps
        self.measure_effective = cfg.measure_effective
        self.layer_map = hooked_layers(
            icsm.layer_bases(cfg.groups, ctx.backend.num_layers, sensitivity=cfg.use_sensitivity_order),
            cfg.layers,
            ctx.backend.num_layers,
        )
        layers = ctx.backend.decoder_layers(ctx.model)
        # layer -> its trainable parameters (LoRA)
        self.params = {l: [p for p in layers[l].parameters() if p.requires_grad] for l in self.layer_map}
        if self.mode == "own_params":
            bare = sorted(l for l, ps in self.params.items() if not ps)
            if len(bare) == len(self.params):
                from ...errors import TrainingError

                raise TrainingError(
                    f"HSW hooks decoder layers {sorted(self.params)} but none of them has a "
                    "trainable parameter: include them in train.lora.layers / targets"
                )
        else:
            bare = []
            top = max(self.layer_map)
            above = {id(p) for layer in list(layers)[top:] for p in layer.parameters()}
            if not any(p.requires_grad and id(p) not in above for p in ctx.model.parameters()):
                from ...errors import TrainingError

                raise TrainingError(
                    f"HSW (mode flow_down) hooks decoder layers {sorted(self.layer_map)} but no "
                    f"trainable parameter lies below layer {top}: nothing receives the surgered "
                    "gradient (train.lora.layers / targets)"
                )
        # layer -> (U_f [D,rf], U_p [D,rp]) on device, fp32
        self.bases = {
            l: (uf.to(ctx.device, torch.float32), up.to(ctx.device, torch.float32))
            for l, (uf, up) in self.layer_map.items()
            if l not in bare
        }
        self.skipped_layers = bare
        # the distinct bases of the chain (the layers of a group share one), named by their top layer
        tops: dict[int, int] = {}
        for l, (uf, _) in self.layer_map.items():
            tops[id(uf)] = max(tops.get(id(uf), l), l)
        self.basis_of = {l: tops[id(self.layer_map[l][0])] for l in self.bases}
        self.chain_bases = {
            t: tuple(u.to(ctx.device, torch.float32) for u in self.layer_map[t])
            for t in sorted(set(self.basis_of.values()))
        }
        self.active = True  # False while another plug-in runs a backward of its own (side_backward)
        self._acc = self._zero_acc()
        self._layer_acc: dict[int, torch.Tensor] = {}
        self._eff_acc: torch.Tensor | None = None  # measured effective gains (sums over micro-batches)
        self._fwd: dict[int, tuple] = {}  # logged steps: layer -> (its input x, the Function's output y)
        self._shadow: dict[
            int, torch.Tensor
        ] = {}  # layer -> the TRUE gradient at its hook (no surgery above)
        self._nested = False
        self._handles = []
        for l in self.bases:
            if self.mode == "flow_down":
                self._handles.append(
                    layers[l].register_forward_pre_hook(self._make_pre_hook(l), with_kwargs=True)
                )
            else:
                self._handles.append(layers[l].register_forward_hook(self._make_forward_hook(l)))

    # ------------------------------------------------------------------ flow_down
    def _make_pre_hook(self, layer_idx: int):
        @_disable
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if not (self.active and torch.is_grad_enabled() and torch.is_tensor(x) and x.requires_grad):
                return None
            # the gains of this forward (a Thermostat update between forward and backward cannot leak in)
            want_stats = bool(self.ctx.log_step)
            surgery = functools.partial(self._flow_down, layer_idx, self.beta, self.gamma, want_stats)
            y = _Surgery.apply(x, surgery)
            if want_stats and self.measure_effective and not _in_backward():
                if any(
                    k >= layer_idx for k in self._fwd
                ):  # a new forward (bottom-up): forget an unfinished one
                    self._fwd, self._shadow = {}, {}
                self._fwd[layer_idx] = (x, y)
            if args:
                return (y, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": y}

        return hook

    def _flow_down(self, layer_idx: int, beta: float, gamma: float, want_stats: bool, g: torch.Tensor):
        """The backward of the hook at layer `layer_idx`: S(g) for the layers below (+ statistics)."""
        from ...methods.hsw import hsw_surgery, proj

        identity = float(beta) == 1.0 and float(gamma) == 1.0
        if identity and not want_stats:
            return g  # exact identity: the baseline's gradient, bit for bit
        uf, up = self.bases[layer_idx]
        out, parts = hsw_surgery(g, uf, up, beta, gamma, clamp=self.clamp, eps=self.eps)
        if identity:
            out = g.float()
            parts["scale"] = torch.ones((), device=g.device)
        if want_stats:
            x = g.float()
            scale = parts["scale"]
            row = [
                x.square().sum(),
                out.square().sum(),
                parts["gf"].square().sum(),
                parts["gp"].square().sum(),
                parts["gn"].square().sum(),
                proj(out, uf).square().sum(),
                proj(out, up).square().sum(),
                scale.min() if self.clamp == "per_token" else scale.reshape(()),
                torch.ones((), device=x.device),
            ]
            for bf, bp in self.chain_bases.values():
                row += [
                    proj(x, bf).square().sum(),
                    proj(out, bf).square().sum(),
                    proj(x, bp).square().sum(),
                    proj(out, bp).square().sum(),
                ]
            row = torch.stack([r.float() for r in row]).detach()
            acc = self._layer_acc.get(layer_idx)
            self._layer_acc[layer_idx] = row if acc is None else acc + row
            self._acc["beta"], self._acc["gamma"] = beta, gamma
            if layer_idx in self._fwd:
                self._measure_effective(layer_idx, g, out)
        return g if identity else out.to(g.dtype)

    def _measure_effective(self, layer_idx: int, g: torch.Tensor, out: torch.Tensor) -> None:
        """Logged steps: carry the TRUE gradient (what it would be with every hook the identity) down the
        chain next to the surgered one -- at the top hook it is g itself; for the next lower hook n, the
        vector-Jacobian product of the layers between, t_n = (∂x_l/∂y_n)^T t_l, computed here, while their
        graph is still there (one extra backward through the hooked layers) -- and at the lowest hook log
        ‖P^B g'‖ / ‖P^B t‖ per basis B: the gain on B's fragile / plastic component of the gradient that
        every trainable parameter below the lowest hooked layer receives."""
        from ...methods.hsw import proj

        chain = sorted(self._fwd, reverse=True)
        t = g if layer_idx == chain[0] else self._shadow.pop(layer_idx, None)
        if t is None:
            return
        lower = [n for n in chain if n < layer_idx]
        if lower:
            x = self._fwd[layer_idx][0]
            y = self._fwd[lower[0]][1]
            try:
                (nxt,) = torch.autograd.grad(x, y, grad_outputs=t, retain_graph=True, allow_unused=True)
            except RuntimeError as e:  # reentrant checkpointing / a compiled backward: no second pass
                log.warning("hsw.measure_effective switched off: %s", str(e).splitlines()[0][:200])
                self.measure_effective = False
                self._fwd, self._shadow = {}, {}
                return
            if nxt is not None:
                self._shadow[lower[0]] = nxt.detach()
            return
        tf = t.float()
        row = []
        for bf, bp in self.chain_bases.values():
            row += [
                proj(out, bf).square().sum(),
                proj(tf, bf).square().sum(),
                proj(out, bp).square().sum(),
                proj(tf, bp).square().sum(),
            ]
        row = torch.stack(row).detach()
        self._eff_acc = row if self._eff_acc is None else self._eff_acc + row
        self._fwd, self._shadow = {}, {}

    # ------------------------------------------------------------------ own_params
    @staticmethod
    def _zero_acc():
        return {"g": 0.0, "gprime": 0.0, "gf": 0.0, "gp": 0.0, "gn": 0.0, "calls": 0}

    def _make_forward_hook(self, layer_idx: int):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not (self.active and torch.is_grad_enabled() and hidden.requires_grad):
                return None
            uf, up = self.bases[layer_idx]
            params = self.params[layer_idx]
            want_stats = self.ctx.log_step
            beta, gamma = self.beta, self.gamma

            def grad_hook(g):
                if self._nested:  # our own vector-Jacobian product below also passes this tensor
                    return None
                g2, stats = self._transform(
                    g, uf, up, beta, gamma, clamp=self.clamp, eps=self.eps, stats=want_stats
                )
                acc = self._acc
                for k_src, k_dst in (
                    ("g_norm", "g"),
                    ("gprime_norm", "gprime"),
                    ("gf_norm", "gf"),
                    ("gp_norm", "gp"),
                    ("gn_norm", "gn"),
                ):
                    if k_src in stats:
                        acc[k_dst] += float(stats[k_src]) ** 2
                acc["calls"] += int(want_stats)
                acc["beta"], acc["gamma"] = beta, gamma  # the gains this gradient got
                if g2 is g:  # beta = gamma = 1: exact identity, nothing to add
                    return None
                self._nested = True
                try:
                    corr = torch.autograd.grad(
                        hidden, params, grad_outputs=g2 - g, retain_graph=True, allow_unused=True
                    )
                finally:
                    self._nested = False
                for p, c in zip(params, corr):
                    if c is not None:  # autograd adds J^T g to this afterwards: J^T S(g) in total
                        p.grad = c if p.grad is None else p.grad.add_(c)
                return None  # the gradient flowing to the layers below stays the true one

            hidden.register_hook(grad_hook)
            return None

        return hook

    shapes_gradients = True

    @property
    def beta(self) -> float:
        self._adopt_gains()
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:  # a set value (config, checkpoint) wins over older posts
        self._beta, self._seen = value, self._gains_version()

    @property
    def gamma(self) -> float:
        self._adopt_gains()
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma, self._seen = value, self._gains_version()

    def _gains_version(self) -> int:
        gains = getattr(self.ctx, "gains", None)
        return gains.version if gains is not None else 0

    def _adopt_gains(self) -> None:
        """The gains a controller posted to ctx.gains (the Thermostat) since this plug-in last looked."""
        gains = getattr(self.ctx, "gains", None)
        if gains is not None and gains.version != self._seen and gains.beta is not None:
            self._beta, self._gamma, self._seen = gains.beta, gains.gamma, gains.version

    def side_backward(self, on: bool) -> None:
        """Another plug-in's own backward (CRaFT's retention gradient): no surgery there."""
        self.active = not on

    def logs(self) -> dict:
        if self.mode == "flow_down":
            return self._flow_down_logs()
        a = self._acc
        # the gains applied during this step (a Thermostat update after the step shows next step)
        out = {"hsw_beta": a.get("beta", self.beta), "hsw_gamma": a.get("gamma", self.gamma)}
        if a["calls"]:
            keys = ("g", "gprime", "gf", "gp", "gn")
            sq, div = [a[k] for k in keys], 1.0
            if getattr(self.ctx, "world_size", 1) > 1:
                # the global batch's norms: each rank's loss is its own mean, so its gradient is world x
                # its share of the global one; sum of squares over ranks / world^2
                sq = [float(v) for v in all_reduce_flat([torch.tensor(sq, dtype=torch.float64)])[0]]
                div = float(self.ctx.world_size)
            out.update({f"hsw_{k}_norm": math.sqrt(v) / div for k, v in zip(keys, sq)})
        self._acc = self._zero_acc()
        return out

    def _flow_down_logs(self) -> dict:
        """Per hook l (docs/methods.md §3): hsw_L{l}_{g,gprime,gf,gp,gn}_norm (√ of the sum over the step's
        micro-batches of the squared Frobenius norms; under DDP of the global batch's gradient), hsw_L{l}_
        clamp_scale (mean over micro-batches and ranks; per_token: each micro-batch's smallest factor),
        hsw_L{l}_gain_f / _gain_p (measured: ‖P_f S(g)‖ / ‖P_f g‖ with the hook's own basis; = γ·scale
        and β·scale for per_tensor). Per basis B of the chain, named by the top layer of the group that
        owns it: hsw_eff_gain_{f,p}_g{B} = ‖P^B g_bottom‖ / ‖P^B g_bottom(true)‖, the measured gain on B's
        fragile / plastic component of the gradient leaving the lowest hook -- the one every trainable
        parameter below the lowest hooked layer receives -- against the gradient there without HSW
        (hsw.measure_effective); hsw_skip_gain_{f,p}_g{B} = Π_hooks ‖P^B S_h(g_h)‖ / ‖P^B g_h‖, what the
        hooks alone apply (exact = eff when the layers between hooks pass the gradient unchanged, e.g. the
        residual skip path; γ^k·Π scale for a chain of k hooks sharing B). The aggregates
        hsw_{g,gprime,...}_norm (√Σ over hooks and micro-batches) keep their old meaning."""
        a, self._acc = self._acc, self._zero_acc()
        out = {"hsw_beta": a.get("beta", self.beta), "hsw_gamma": a.get("gamma", self.gamma)}
        eff_m, self._eff_acc, self._fwd, self._shadow = self._eff_acc, None, {}, {}
        if not self._layer_acc:
            return out
        ls = sorted(self._layer_acc, reverse=True)  # top hook first: the order the gradient passes them
        rows = torch.stack([self._layer_acc[l] for l in ls]).double()
        self._layer_acc = {}
        div = 1.0
        if getattr(self.ctx, "world_size", 1) > 1:
            # the global batch's norms: each rank's loss is its own mean, so its gradient is world x its share
            rows, eff_m = all_reduce_flat([rows, eff_m])
            div = float(self.ctx.world_size)
        rows = rows.cpu().tolist()  # one host sync
        if eff_m is not None:
            em = eff_m.double().cpu().tolist()
            for j, t in enumerate(self.chain_bases):
                of, tf, op, tp = em[4 * j : 4 * j + 4]
                out[f"hsw_eff_gain_f_g{t}"] = math.sqrt(of / tf) if tf > 0 else 1.0
                out[f"hsw_eff_gain_p_g{t}"] = math.sqrt(op / tp) if tp > 0 else 1.0
        nf = len(_FIELDS)
        tot = [0.0] * 5
        eff = {t: [1.0, 1.0] for t in self.chain_bases}

        def ratio(num, den):
            return math.sqrt(num / den) if den > 0 else 1.0

        for l, r in zip(ls, rows):
            for i, k in enumerate(("g", "gprime", "gf", "gp", "gn")):
                out[f"hsw_L{l}_{k}_norm"] = math.sqrt(r[i]) / div
                tot[i] += r[i]
            out[f"hsw_L{l}_clamp_scale"] = r[7] / max(r[8], 1.0)
            out[f"hsw_L{l}_gain_f"] = ratio(r[5], r[2])
            out[f"hsw_L{l}_gain_p"] = ratio(r[6], r[3])
            for j, t in enumerate(self.chain_bases):
                xf, of, xp, op = r[nf + 4 * j : nf + 4 * j + 4]
                eff[t][0] *= ratio(of, xf)
                eff[t][1] *= ratio(op, xp)
        for i, k in enumerate(("g", "gprime", "gf", "gp", "gn")):
            out[f"hsw_{k}_norm"] = math.sqrt(tot[i]) / div
        for t, (ef, ep) in eff.items():
            out[f"hsw_skip_gain_f_g{t}"], out[f"hsw_skip_gain_p_g{t}"] = ef, ep
        return out

    def skip_step(self) -> None:
        # a skipped (non-finite) step's statistics are not carried into the next logged step
        self._acc = self._zero_acc()
        self._layer_acc, self._eff_acc, self._fwd, self._shadow = {}, None, {}, {}

    def state_dict(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.gamma = float(state["beta"]), float(state["gamma"])

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def build(ctx: TrainContext, sc: dict, given: dict, train_ds, shared: dict) -> HSWPlugin:
    from ..icsm_adapter import icsm_for_run

    icsm, _ = icsm_for_run(sc, given, train_ds, shared)
    return HSWPlugin(ctx, HswSettings.of(sc["method"]["hsw"]), icsm)
