"""HSW plug-in: gradient surgery on each hooked layer's own parameters (methods.hsw)."""

from __future__ import annotations

import math

import torch

from ...settings import HswSettings
from ..distributed import all_reduce_flat
from . import Plugin, TrainContext

# ----------------------------------------------------------------------------- HSW


class HSWPlugin(Plugin):
    """Gradient surgery on each hooked decoder layer's OWN parameters.

    For hooked layer l with output h_l (residual stream, before any final norm) and true gradient
    g_l = dL/dh_l, the trainable parameters θ_l of layer l receive J_θl^T S_l(g_l) instead of
    J_θl^T g_l, where S_l(g) = g_n + β g_p + γ g_f (per token, clamped ‖S(g)‖ ≤ ‖g‖; methods.hsw)
    with layer l's group subspaces. The gradient that flows on to the layers below is NOT modified,
    so every parameter sees exactly one surgery, its own layer's group gains, once (no compounding
    through the residual stream: see docs/methods.md §3). Implementation: a tensor hook on h_l
    computes S(g) − g and adds the vector-Jacobian product J_θl^T (S(g) − g) to θ_l's .grad before
    autograd accumulates J_θl^T g there (one extra backward through layer l, to its parameters only).
    """

    name = "hsw"

    def __init__(self, ctx: TrainContext, cfg: HswSettings | dict, icsm):
        from ...methods.hsw import hsw_transform

        cfg = HswSettings.of(cfg)
        self._transform = hsw_transform
        self.ctx = ctx
        self.beta = cfg.beta
        self.gamma = cfg.gamma
        self.clamp = cfg.clamp
        self.eps = cfg.eps
        self.layer_map = icsm.layer_bases(cfg.groups, ctx.backend.num_layers,
                                          sensitivity=cfg.use_sensitivity_order)
        layers = ctx.backend.decoder_layers(ctx.model)
        # layer -> its trainable parameters (LoRA); layers without any have nothing to act on
        self.params = {l: [p for p in layers[l].parameters() if p.requires_grad] for l in self.layer_map}
        bare = sorted(l for l, ps in self.params.items() if not ps)
        if len(bare) == len(self.params):
            from ...errors import TrainingError

            raise TrainingError(f"HSW hooks decoder layers {sorted(self.params)} but none of them has a "
                                "trainable parameter: include them in train.lora.layers / targets")
        # layer -> (U_f [D,rf], U_p [D,rp]) on device, fp32
        self.bases = {l: (uf.to(ctx.device, torch.float32), up.to(ctx.device, torch.float32))
                      for l, (uf, up) in self.layer_map.items() if l not in bare}
        self.skipped_layers = bare
        self.active = True  # False while another plug-in runs a backward of its own (CRaFT's g_ret)
        self._acc = self._zero_acc()
        self._nested = False
        self._handles = []
        for l in self.bases:
            self._handles.append(layers[l].register_forward_hook(self._make_forward_hook(l)))

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
                g2, stats = self._transform(g, uf, up, beta, gamma, clamp=self.clamp, eps=self.eps,
                                            stats=want_stats)
                acc = self._acc
                for k_src, k_dst in (("g_norm", "g"), ("gprime_norm", "gprime"), ("gf_norm", "gf"),
                                     ("gp_norm", "gp"), ("gn_norm", "gn")):
                    if k_src in stats:
                        acc[k_dst] += float(stats[k_src]) ** 2
                acc["calls"] += int(want_stats)
                acc["beta"], acc["gamma"] = beta, gamma  # the gains this gradient got
                if g2 is g:  # beta = gamma = 1: exact identity, nothing to add
                    return None
                self._nested = True
                try:
                    corr = torch.autograd.grad(hidden, params, grad_outputs=g2 - g, retain_graph=True,
                                               allow_unused=True)
                finally:
                    self._nested = False
                for p, c in zip(params, corr):
                    if c is not None:  # autograd adds J^T g to this afterwards: J^T S(g) in total
                        p.grad = c if p.grad is None else p.grad.add_(c)
                return None  # the gradient flowing to the layers below stays the true one

            hidden.register_hook(grad_hook)
            return None

        return hook

    def logs(self) -> dict:
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
