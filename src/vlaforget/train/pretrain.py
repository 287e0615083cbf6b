"""Teacher pretraining for the tiny VLA: behaviour cloning on the upstream demonstrations, mixed
with visual question answering, so the teacher has two skills a fine-tune can forget.

Each step draws a VQA batch with probability `vqa_fraction`, else a behaviour-cloning batch (openvla
prompt + action tokens); AdamW with linear warm-up and cosine decay, fp32, seeded. Also the
teacher's held-out metrics and a minimal closed-loop Meta-World rollout (one env, batch 1).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..io import log, progress
from ..settings import PretrainSettings
from .schedule import warmup_schedule


def smoothed_action_loss(backend, batch: Mapping[str, torch.Tensor], logits: torch.Tensor, sigma: float):
    """Behaviour-cloning loss with Gaussian soft labels over neighbouring action bins (HL-Gauss,
    Farebrother et al. 2024), plus the usual CE on the end token.

    The 256 bins are ordered, but one-hot CE scores a neighbouring bin as wrong as the far end of
    the range; spreading the target over bins within ~`sigma` of the true one turns the tiny
    teacher's classification into a smoother regression, which it learns in far fewer steps.
    Pretraining only: fine-tuning keeps openvla's one-hot loss."""
    import torch.nn.functional as F

    begin, end = backend.action_tokenizer.begin, backend.vocab_end
    logp = F.log_softmax(logits[batch["action_mask"]].float(), dim=-1)  # [B*A, V]
    ids = torch.arange(begin, end, device=logp.device, dtype=torch.float32)
    tgt = batch["action_targets"].reshape(-1, 1).float()
    q = torch.exp(-0.5 * ((ids[None] - tgt) / sigma) ** 2)
    q = q / q.sum(-1, keepdim=True)
    soft = -(q * logp[:, begin:end]).sum(-1).mean()
    text_logits = logits[:, backend.n_image_tokens : -1]
    gt = batch["labels"][:, 1:]
    is_eos = gt == backend.eos_id
    eos = F.cross_entropy(text_logits[is_eos].float(), gt[is_eos]) if bool(is_eos.any()) else 0.0
    return soft + eos


def pretrain(
    backend,
    bc_data,
    vqa_data: Sequence[Mapping],
    pcfg: PretrainSettings | Mapping[str, Any],
    image_aug: bool = True,
) -> dict:
    """Train backend.model in place. bc_data: indexable of samples (CachedDataset, train split);
    vqa_data: list of VQA samples; pcfg: the model.pretrain block (image_aug there overrides the
    argument). Returns the training history (loss/accuracy per logged step)."""
    pcfg = PretrainSettings.of(pcfg)
    steps, bsz = pcfg.steps, pcfg.batch_size
    frac = pcfg.vqa_fraction if len(vqa_data) else 0.0
    seed = pcfg.seed
    sigma = float(pcfg.bin_sigma or 0.0)
    image_aug = bool(pcfg.image_aug if pcfg.image_aug is not None else image_aug)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = backend.model
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=pcfg.lr,
        weight_decay=pcfg.weight_decay,
        betas=(0.9, 0.95),
    )
    sched = warmup_schedule(opt, steps, max(1, int(0.05 * steps)), "cosine", floor=0.1)
    hist: dict[str, list] = {"step": [], "bc_loss": [], "bc_acc": [], "vqa_loss": [], "seconds": []}
    ema: dict[str, float] = {}
    t0 = time.time()
    bar = progress(range(steps), desc="pretrain teacher")
    kill_at = int(os.environ.get("VLAFORGET_FAULT_KILL_AT_STEP", "0")) or None  # tests/test_faults.py
    for step in bar:
        if kill_at == step:
            os.kill(os.getpid(), 9)
        is_vqa = rng.random() < frac
        if is_vqa:
            idx = rng.integers(0, len(vqa_data), bsz)
            samples = [vqa_data[int(i)] for i in idx]
            if image_aug:
                from ..models.base import augment_images

                imgs = augment_images(np.stack([s["image"] for s in samples]), gen)
                samples = [dict(s, image=im) for s, im in zip(samples, imgs)]
            batch = backend.collate_vqa(samples)
            out = backend.forward(batch)
            loss = backend.lm_loss(batch, out.logits)
            key = "vqa_loss"
        else:
            idx = rng.integers(0, len(bc_data), bsz)
            batch = backend.collate([bc_data[int(i)] for i in idx], train=image_aug, generator=gen)
            out = backend.forward(batch)
            m = backend.action_metrics(batch, out.logits)
            loss = smoothed_action_loss(backend, batch, out.logits, sigma) if sigma > 0 else m["loss"]
            acc = float(m["accuracy"])
            ema["bc_acc"] = 0.9 * ema.get("bc_acc", acc) + 0.1 * acc
            key = "bc_loss"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        ema[key] = 0.9 * ema.get(key, lv) + 0.1 * lv
        if step % 50 == 0 or step == steps - 1:
            hist["step"].append(step)
            for k in ("bc_loss", "bc_acc", "vqa_loss"):
                hist[k].append(ema.get(k))
            hist["seconds"].append(time.time() - t0)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix({k: round(v, 3) for k, v in ema.items()})
    model.eval()
    hist["train_seconds"] = time.time() - t0
    log.info(
        "pretraining: %d steps in %.0f s; %s",
        steps,
        hist["train_seconds"],
        {k: round(v, 3) for k, v in ema.items()},
    )
    return hist


@torch.no_grad()
def heldout_metrics(
    backend, bc_heldout, vqa_heldout: Sequence[Mapping], n_bc: int = 512, batch_size: int = 64
) -> dict:
    """Held-out BC action-token accuracy / L1 (teacher forcing) and VQA exact-match accuracy."""
    model = backend.model
    model.eval()
    out: dict[str, Any] = {}
    if bc_heldout is not None and len(bc_heldout):
        idx = np.linspace(0, len(bc_heldout) - 1, min(n_bc, len(bc_heldout))).round().astype(int)
        correct = total = 0
        l1s = []
        for s in range(0, len(idx), batch_size):
            batch = backend.collate([bc_heldout[int(i)] for i in idx[s : s + batch_size]])
            m = backend.action_metrics(batch, backend.forward(batch).logits)
            n = int(batch["action_targets"].numel())
            correct += float(m["accuracy"]) * n
            total += n
            l1s.append(float(m["l1"]) * n)
        out.update(bc_token_accuracy=correct / total, bc_l1=sum(l1s) / total, bc_samples=len(idx))
    if vqa_heldout:
        right = 0
        by_kind: dict[str, list[int]] = {}
        for s in range(0, len(vqa_heldout), batch_size):
            chunk = list(vqa_heldout[s : s + batch_size])
            answers = backend.answer([c["image"] for c in chunk], [c["question"] for c in chunk])
            for c, a in zip(chunk, answers):
                ok = int(a.strip().lower() == str(c["answer"]).strip().lower())
                right += ok
                by_kind.setdefault(str(c.get("kind", "all")), []).append(ok)
        out.update(
            vqa_accuracy=right / len(vqa_heldout),
            vqa_samples=len(vqa_heldout),
            vqa_accuracy_by_kind={k: float(np.mean(v)) for k, v in by_kind.items()},
        )
    return out
