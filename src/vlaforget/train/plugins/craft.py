"""CRaFT plug-in: retention loss, dual variable, conflict projection (methods.craft)."""

from __future__ import annotations

import torch

from ...settings import CraftSettings
from ..distributed import all_reduce_flat, unwrap
from . import Plugin, TrainContext, side_pass

# ----------------------------------------------------------------------------- CRaFT


class CraftPlugin(Plugin):
    """Retention loss on cached teacher anchors, dual variable λ, conflict-aware projection."""

    name = "craft"

    def __init__(
        self,
        ctx: TrainContext,
        cfg: CraftSettings | dict,
        anchors: dict,
        anchor_samples: list,
        seed: int,
        batch_size: int | None = None,
    ):
        cfg = CraftSettings.of(cfg)
        self.ctx = ctx
        self.cfg = cfg
        self.eps_budget = cfg.epsilon
        self.lmbda = cfg.lambda_init if cfg.dual else cfg.fixed_lambda
        self.lambda_lr = cfg.lambda_lr
        self.dual = cfg.dual
        self.projection = cfg.projection
        self.pooling = anchors["pooling"]
        self.layer = int(anchors["layer"])
        self.features = anchors["features"].float()  # [N, D]
        self.samples = anchor_samples
        # anchors per retention step: method.craft.anchor_batch_size (the seeds' craft.anchor_batch_size),
        # independent of the training micro-batch; `batch_size` is only the fallback when unset
        self.batch = int(cfg.anchor_batch_size or batch_size or 8)
        # one forward of [task; anchor] rows and one backward (train/lora_split.py) instead of a
        # separate retention forward + backward; the same gradients (tests/test_craft.py)
        self.fused = cfg.fused_forward
        self._split = None  # LoraRowSplit while a fused step is between its forward and before_step
        self._pending = None
        self.overflow = False
        self.gen = torch.Generator().manual_seed(int(seed) + 104729)
        self._logs: dict = {}
        self._acc: dict = {}

    def _draw(self) -> tuple[list[int], dict]:
        """A fresh anchor mini-batch: (indices, collated batch)."""
        n = len(self.samples)
        idx = torch.randperm(n, generator=self.gen)[: min(self.batch, n)].tolist()
        return idx, self.ctx.backend.collate([self.samples[i] for i in idx])

    def _loss(self, idx: list[int], abatch: dict, hs: torch.Tensor) -> torch.Tensor:
        from ...methods.craft import pool_features

        feat = pool_features(hs.float(), abatch, self.pooling, self.ctx.backend.n_image_tokens)
        target = self.features[idx].to(feat.device)
        return torch.nn.functional.mse_loss(feat, target)

    def retention_loss(self) -> torch.Tensor:
        """L_ret = MSE(student feature, cached teacher feature) on a fresh anchor mini-batch.

        Under DDP every rank draws the same mini-batch (the generator stays equal everywhere) and
        forwards only its share, idx[rank::world]; it returns its share of the batch's mean,
        mean_local x n_local / n, so the sum over ranks (before_step all-reduces it) is the
        one-process L_ret of the whole mini-batch, at 1/world of its cost per rank."""
        n = len(self.samples)
        idx = torch.randperm(n, generator=self.gen)[: min(self.batch, n)].tolist()
        world, rank = getattr(self.ctx, "world_size", 1), getattr(self.ctx, "rank", 0)
        if world > 1:
            if len(idx) < world:
                from ...errors import TrainingError

                raise TrainingError(
                    f"CRaFT's anchor mini-batch ({len(idx)} anchors: method.craft.anchor_batch_size "
                    f"or the anchor cache's size) is smaller than the {world} DDP ranks that share "
                    "it: raise method.craft.anchor_batch_size to at least train.nproc"
                )
            share = idx[rank::world]
        else:
            share = idx
        abatch = self.ctx.backend.collate([self.samples[i] for i in share])
        # the unwrapped model: this backward is ours, not DDP's (g_ret is all-reduced in before_step)
        model = unwrap(self.ctx.model)
        with self.ctx.autocast():  # the anchor layer's states only; the forward stops there
            hs = self.ctx.backend.hidden_states_at(abatch, [self.layer], model=model)[self.layer]
        loss = self._loss(share, abatch, hs)
        return loss if world == 1 else loss * (len(share) / len(idx))

    def fused_active(self) -> bool:
        """The fused path: one process (g_ret's all-reduce is the separate path's) and no HSW (its
        surgery hooks would act on the anchor rows' gradient too)."""
        others = [p for p in self.ctx.plugins.values() if p is not self]
        return self.fused and self.ctx.world_size == 1 and not any(p.shapes_gradients for p in others)

    def forward(self, batch, model, last: bool):
        """Fused step (last micro-batch): the anchor rows ride along in the task forward; their
        anchor-layer states are caught by a hook, the LoRA layers route them through shadows."""
        if not (last and self.fused_active()):
            return None
        from types import SimpleNamespace

        from ..lora_split import LoraRowSplit

        backend = self.ctx.backend
        idx, abatch = self._draw()
        k, n_img = int(batch["input_ids"].shape[0]), int(backend.n_image_tokens)
        merged = backend.concat_batches(batch, abatch)
        self._split = LoraRowSplit(model, self.ctx.trainable, k, int(merged["input_ids"].shape[0]))
        with backend.capture_hidden_states([self.layer], model=model) as got:
            out = backend.forward(merged, model=model)
        hs = got[self.layer % (backend.num_layers + 1)]
        self._pending = (idx, abatch, hs[k:, : abatch["input_ids"].shape[1] + n_img])
        return SimpleNamespace(logits=out.logits[:k, : batch["input_ids"].shape[1] + n_img])

    def backward(self, losses: dict, scale: float) -> bool:
        """Fused step: ONE backward of L_act / accum + L_ret; g_act lands in .grad, g_ret in the shadows."""
        if self._pending is None:
            return False
        idx, abatch, hs = self._pending
        l_ret = self._loss(idx, abatch, hs)
        self._pending = l_ret.detach()
        total = losses["act"] * scale + l_ret
        (self.ctx.scaler.scale(total) if self.ctx.scaler is not None else total).backward()
        return True

    def _fused_retention_grads(self, params) -> tuple[torch.Tensor, list]:
        """(L_ret, g_ret) of the fused step, shadows removed. Parameters after the anchor layer get
        None, as autograd.grad(allow_unused=True) gives them on the separate path (L_ret does not
        reach them; the fused backward leaves zeros in their shadows)."""
        split, self._split = self._split, None
        l_ret, self._pending = self._pending, None
        grads = split.shadow_grads()
        split.close()
        layers = self.ctx.backend.decoder_layers(self.ctx.model)
        after = {
            id(q) for layer in list(layers)[self.layer % (len(layers) + 1) :] for q in layer.parameters()
        }
        return l_ret, [None if id(p) in after else g for p, g in zip(params, grads)]

    def before_step(self) -> None:
        """g_act = the step's accumulated action gradient; g_ret from the retention loss; if they
        conflict (dot < 0) project g_act onto g_ret's normal plane; grad = g_act' + λ g_ret.
        Under DDP g_act is already DDP's average; each rank's share of g_ret and L_ret is summed
        over ranks in one collective, so projection, combination and λ are the same on every rank."""
        from ...methods.craft import combine, conflict_project

        params = [p for _, p in self.ctx.trainable]
        scaler = self.ctx.scaler  # fp16: the retention backward is loss-scaled like the action one
        if self._split is not None:  # fused: g_ret is already there (scaled like the action gradient)
            l_ret, g_ret = self._fused_retention_grads(params)
            if scaler is not None:
                inv = 1.0 / float(scaler.get_scale())
                g_ret = [None if g is None else g * inv for g in g_ret]
        else:
            # HSW (if also on) shapes the action gradient only: its hooks would otherwise add their
            # correction of the retention gradient into .grad, i.e. into g_act, on each rank apart
            with side_pass(self.ctx.plugins, self):
                l_ret = self.retention_loss()
                if scaler is not None:
                    inv = 1.0 / float(scaler.get_scale())
                    g_ret = [
                        None if g is None else g * inv
                        for g in torch.autograd.grad(scaler.scale(l_ret), params, allow_unused=True)
                    ]
                else:
                    g_ret = list(torch.autograd.grad(l_ret, params, allow_unused=True))
        if (
            getattr(self.ctx, "world_size", 1) > 1
        ):  # sums of the ranks' shares: the whole mini-batch's L_ret, g_ret
            *g_ret, l_ret = all_reduce_flat(g_ret + [l_ret.detach().reshape(1)])
            l_ret = l_ret[0]
        checks = [torch.isfinite(l_ret.detach()).all()] + [
            torch.isfinite(g).all() for g in g_ret if g is not None
        ]
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
        self._acc = {
            "L_ret": 0.0 if nonfinite else float(l_ret.detach()),
            "projection": float(stats["projection"]),
            "grad_dot": stats["grad_dot"],
            "grad_cos": stats["grad_cos"],
            "g_act_norm": stats["g_act_norm"],
            "g_ret_norm": stats["g_ret_norm"],
            "conflict_ratio": stats["conflict_ratio"],
            "nonfinite": float(nonfinite),
        }

    def overflowed(self) -> bool:
        out, self.overflow = self.overflow, False
        return out

    def annotate(self, rec: dict) -> None:
        rec["L_act"] = rec["train_loss"]  # the seeds' tools' name of the action loss

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
        self._logs = {
            "L_ret": a.get("L_ret"),
            "lambda": self.lmbda,
            "craft_fused": float(self.fused_active()),
            "lambda_before": before,
            "lambda_after": self.lmbda,
            "epsilon": self.eps_budget,
            "grad_dot": a.get("grad_dot"),
            "grad_cos": a.get("grad_cos"),
            "g_act_norm": a.get("g_act_norm"),
            "g_ret_norm": a.get("g_ret_norm"),
            "projection": a.get("projection"),
            "conflict_ratio": a.get("conflict_ratio"),
            "retention_nonfinite": a.get("nonfinite"),
            "retention_mode": "hidden",
        }

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

    ccfg = CraftSettings.of(sc["method"]["craft"])
    anchors = given["anchors"] if "anchors" in given else load_anchors(sc["craft_dir"])
    want = ccfg.anchor if ccfg.anchor is not None else anchors["pooling"]
    check_anchors(
        anchors,
        hidden_size=int(ctx.backend.hidden_size),
        num_layers=int(ctx.backend.num_layers),
        pooling=want,
        where=str(sc.get("craft_dir")),
        layer=sc.get("craft_layer"),
        dtype=(sc.get("model") or {}).get("dtype"),
        shots=sc.get("shots"),
        seed=sc.get("seed"),
    )
    by_pooling = anchors.get("features_by_pooling") or {anchors["pooling"]: anchors["features"]}
    anchors = dict(anchors, pooling=want, features=by_pooling[want])
    if "anchor_samples" in given:
        samples = given["anchor_samples"]
    else:
        from ...data.cache import CachedDataset

        ads = CachedDataset(
            anchors["dataset"]["cache_dir"],
            split=anchors.get("split", "train"),
            shots=anchors.get("shots"),
            seed=int(anchors.get("shots_seed") or 0),
        )
        samples = [ads[int(i)] for i in anchors["indices"]]
    return CraftPlugin(
        ctx, ccfg, anchors, samples, int(sc["seed"]), int(ccfg.anchor_batch_size or sc["train"]["batch_size"])
    )
