"""CRaFT plug-in: retention loss, dual variable, conflict projection (methods.craft)."""

from __future__ import annotations

import torch

from . import Plugin, TrainContext

# ----------------------------------------------------------------------------- CRaFT


class CraftPlugin(Plugin):
    """Retention loss on cached teacher anchors, dual variable λ, conflict-aware projection."""

    name = "craft"

    def __init__(self, ctx: TrainContext, cfg: dict, anchors: dict, anchor_samples: list, seed: int,
                 batch_size: int | None = None):
        self.ctx = ctx
        self.cfg = cfg
        self.eps_budget = float(cfg.get("epsilon", 0.05))
        self.lmbda = float(cfg.get("lambda_init", 0.0)) if cfg.get("dual", True) else float(
            cfg.get("fixed_lambda", 0.1))
        self.lambda_lr = float(cfg.get("lambda_lr", 0.01))
        self.dual = bool(cfg.get("dual", True))
        self.projection = bool(cfg.get("projection", True))
        self.pooling = anchors["pooling"]
        self.layer = int(anchors["layer"])
        self.features = anchors["features"].float()  # [N, D]
        self.samples = anchor_samples
        # anchors per retention step: method.craft.anchor_batch_size (the seeds' craft.anchor_batch_size),
        # independent of the training micro-batch; `batch_size` is only the fallback when unset
        self.batch = int(cfg.get("anchor_batch_size") or batch_size or 8)
        self.overflow = False
        self.gen = torch.Generator().manual_seed(int(seed) + 104729)
        self._logs: dict = {}
        self._acc: dict = {}

    def retention_loss(self) -> torch.Tensor:
        """L_ret = MSE(student feature, cached teacher feature) on a fresh anchor mini-batch."""
        from ...methods.craft import pool_features

        n = len(self.samples)
        idx = torch.randperm(n, generator=self.gen)[: min(self.batch, n)].tolist()
        abatch = self.ctx.backend.collate([self.samples[i] for i in idx])
        # the unwrapped model: this backward is ours, not DDP's (g_ret is all-reduced below)
        model = self.ctx.model.module if hasattr(self.ctx.model, "module") and self.ctx.world_size > 1 \
            else self.ctx.model
        with self.ctx.autocast():  # the anchor layer's states only; the forward stops there
            hs = self.ctx.backend.hidden_states_at(abatch, [self.layer], model=model)[self.layer]
        feat = pool_features(hs.float(), abatch, self.pooling, self.ctx.backend.n_image_tokens)
        target = self.features[idx].to(feat.device)
        return torch.nn.functional.mse_loss(feat, target)

    def before_step(self) -> None:
        """g_act = the step's accumulated action gradient; g_ret from the retention loss; if they
        conflict (dot < 0) project g_act onto g_ret's normal plane; grad = g_act' + λ g_ret."""
        from ...methods.craft import combine, conflict_project

        params = [p for _, p in self.ctx.trainable]
        l_ret = self.retention_loss()
        scaler = self.ctx.scaler  # fp16: the retention backward is loss-scaled like the action one
        if scaler is not None:
            inv = 1.0 / float(scaler.get_scale())
            g_ret = [None if g is None else g * inv
                     for g in torch.autograd.grad(scaler.scale(l_ret), params, allow_unused=True)]
        else:
            g_ret = list(torch.autograd.grad(l_ret, params, allow_unused=True))
        if self.ctx.world_size > 1:
            for g in g_ret:
                if g is not None:
                    torch.distributed.all_reduce(g)
                    g /= self.ctx.world_size
        checks = [torch.isfinite(l_ret.detach()).all()] + [torch.isfinite(g).all() for g in g_ret if g is not None]
        nonfinite = not bool(torch.stack(checks).all())  # one host sync, not one per tensor
        if nonfinite and scaler is not None:
            # an fp16 overflow: a non-finite gradient makes the loop skip the step and lower the scale
            self.overflow = True
        elif nonfinite:  # never let a broken retention term poison the update: action-only step
            g_ret = [None] * len(params)
        g_act = [p.grad for p in params]
        g_act, stats = conflict_project(g_act, g_ret, projection=self.projection)
        for p, g in zip(params, combine(g_act, g_ret, self.lmbda)):
            p.grad = g
        self._acc = {"L_ret": 0.0 if nonfinite else float(l_ret.detach()), "projection": float(stats["projection"]),
                     "grad_dot": stats["grad_dot"], "grad_cos": stats["grad_cos"],
                     "conflict_ratio": stats["conflict_ratio"], "nonfinite": float(nonfinite)}

    def skip_step(self) -> None:
        self._acc = {}

    def dry_logs(self) -> dict:
        return {**self._acc, "lambda": self.lmbda, "epsilon": self.eps_budget}

    def every_step(self, step: int) -> None:
        from ...methods.craft import dual_update

        a, self._acc = self._acc, {}
        before = self.lmbda
        if self.dual and a:
            self.lmbda = float(dual_update(self.lmbda, a["L_ret"], self.eps_budget, self.lambda_lr))
        self._logs = {"L_ret": a.get("L_ret"), "lambda": self.lmbda,
                      "lambda_before": before, "lambda_after": self.lmbda, "epsilon": self.eps_budget,
                      "grad_dot": a.get("grad_dot"), "grad_cos": a.get("grad_cos"),
                      "projection": a.get("projection"), "conflict_ratio": a.get("conflict_ratio"),
                      "retention_nonfinite": a.get("nonfinite"), "retention_mode": "hidden"}

    def logs(self) -> dict:
        out, self._logs = self._logs, {}
        return {k: v for k, v in out.items() if v is not None}

    def state_dict(self) -> dict:
        return {"lambda": self.lmbda, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.lmbda = float(state["lambda"])
        self.gen.set_state(state["gen"])


def build(ctx: TrainContext, sc: dict, given: dict, train_ds, shared: dict) -> CraftPlugin:
    """Checks, before the first step, that the CRaFT anchor cache fits the run."""
    from ...methods.craft import check_anchors, load_anchors

    ccfg = sc["method"]["craft"]
    anchors = given["anchors"] if "anchors" in given else load_anchors(sc["craft_dir"])
    want = ccfg.get("anchor", anchors["pooling"])
    check_anchors(anchors, hidden_size=int(ctx.backend.hidden_size), num_layers=int(ctx.backend.num_layers),
                  pooling=want, where=str(sc.get("craft_dir")), layer=sc.get("craft_layer"),
                  dtype=(sc.get("model") or {}).get("dtype"), shots=sc.get("shots"), seed=sc.get("seed"))
    by_pooling = anchors.get("features_by_pooling") or {anchors["pooling"]: anchors["features"]}
    anchors = dict(anchors, pooling=want, features=by_pooling[want])
    if "anchor_samples" in given:
        samples = given["anchor_samples"]
    else:
        from ...data.cache import CachedDataset

        ads = CachedDataset(anchors["dataset"]["cache_dir"], split=anchors.get("split", "train"),
                            shots=anchors.get("shots"), seed=int(anchors.get("shots_seed") or 0))
        samples = [ads[int(i)] for i in anchors["indices"]]
    return CraftPlugin(ctx, ccfg, anchors, samples, int(sc["seed"]),
                       int(ccfg.get("anchor_batch_size") or sc["train"]["batch_size"]))
