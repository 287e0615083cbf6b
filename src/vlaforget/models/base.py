"""The model-backend protocol (docs/DEVELOPMENT.md, "Models") and the logic both backends share.

A backend couples an HF model laid out like OpenVLA (`vision_backbone`, `projector`,
`language_model` = LlamaForCausalLM; LLM sequence = [<s>, image patches, text tokens 1..]) with its
tokenizer, action tokenizer and action statistics. Subclasses only say how images become
`pixel_values` and which token (if any) separates the prompt from the action tokens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .action_tokenizer import ActionTokenizer, action_stats, normalize_actions, unnormalize_actions
from .prompts import decode_span, encode_action_prompt, encode_vqa

log = logging.getLogger("vlaforget.models")

LAYERS_PATH = "language_model.model.layers"
ATTN_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_SUFFIXES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# lm_head: the LM head; patch_embed: the vision towers' patch-embedding convolutions. Both are in the
# adapters of the user's (and openvla's) finetune.py: peft 0.11.1 resolves target_modules="all-linear"
# to module *base names* (q_proj, proj, fc1, lm_head, ...) and drops the head by its full name, which
# on OpenVLA's nested model drops nothing, and the base name "proj" also matches timm's patch_embed.proj
# (a Conv2d). So all-linear there = attn, mlp, vision, projector, lm_head, patch_embed
# (tests/test_openvla_backend.py; config/user_recipe.yaml).
LORA_TARGETS = ("attn", "mlp", "vision", "projector", "lm_head", "patch_embed")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF model under DDP (`module.`), PEFT (`base_model.model.`) and torch.compile wrappers."""
    m = model
    for _ in range(8):
        if isinstance(m, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            m = m.module
        elif hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            m = m._orig_mod
        elif hasattr(m, "get_base_model") and callable(m.get_base_model):
            inner = m.get_base_model()
            if inner is m:
                break
            m = inner
        else:
            break
    return m


@contextmanager
def eval_mode(model: nn.Module):
    """Run a block with every submodule in eval mode, then put back exactly the modules that were
    training. `m.train(was_training)` would instead switch on submodules the trainer had left in
    eval mode (e.g. frozen parts)."""
    training = [mod for mod in model.modules() if mod.training]
    for mod in training:
        mod.training = False
    try:
        yield model
    finally:
        for mod in training:
            mod.training = True


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    m = unwrap_model(model)
    node: Any = m
    try:
        for part in LAYERS_PATH.split("."):
            node = getattr(node, part)
        if isinstance(node, nn.ModuleList):
            return node
    except AttributeError:
        pass
    for name, mod in model.named_modules():  # any other wrapper: match the name's tail
        if name.endswith(LAYERS_PATH) and isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(
        f"no decoder layers at '{LAYERS_PATH}' in {type(model).__name__}: the backend "
        "expects an OpenVLA-layout model (vision_backbone, projector, language_model)"
    )


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """A module's own forward, under non-reentrant `torch.utils.checkpoint` while it trains with
    gradients on (the same condition as HF's checkpointed layers); plain otherwise (no_grad probes,
    evaluation, generation)."""
    fwd = type(self).forward
    if self.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fwd, self, *args, use_reentrant=False, **kwargs)
    return fwd(self, *args, **kwargs)


def checkpoint_module(module: nn.Module) -> bool:
    """Run `module` under activation checkpointing from now on; False if it already was.

    Non-reentrant: the recomputation re-runs the module as it is at backward time, LoRA layers that
    PEFT injects afterwards included, and parameters get their gradients although the module's input
    does not require grad (with reentrant checkpointing and a frozen input they silently get none).
    The forward is rebound on the instance, so module names, state_dict keys and PEFT's target names
    are unchanged (a wrapper module such as torch's `checkpoint_wrapper` renames every parameter)."""
    if getattr(module, "_vlaforget_checkpointed", False):
        return False
    import types

    if "forward" in vars(module):
        raise ValueError(f"{type(module).__name__} has an instance-level forward; cannot checkpoint it")
    module.forward = types.MethodType(_checkpointed_forward, module)
    module._vlaforget_checkpointed = True
    return True


# text-length keys of a collated action batch and their padding values (right padding; input_ids: the pad id)
PAD_KEYS = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": -100,
    "instruction_mask": False,
    "action_mask": False,
}


class _StopForward(Exception):
    """Raised by hidden_states_at's last hook: the rest of the forward is not needed."""


def _final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The norm applied after the last decoder layer (the module owning `layers` has it as .norm)."""
    for mod in model.modules():
        if getattr(mod, "layers", None) is layers and isinstance(getattr(mod, "norm", None), nn.Module):
            return mod.norm
    raise ValueError(f"no final norm beside the decoder layers in {type(model).__name__}")


class VLABackend:
    """Shared implementation of the backend protocol. See docs/DEVELOPMENT.md for the contract."""

    name = "base"
    vision_prefix: str | tuple[str, ...] = "vision_backbone."  # str.startswith: one prefix or several
    projector_prefix = "projector."

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        n_image_tokens: int,
        action_dim: int,
        vocab_end: int,
        device: str | torch.device = "cpu",
        stats: Mapping | None = None,
        action_sep_ids: Sequence[int] = (),
        n_bins: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.n_image_tokens = int(n_image_tokens)
        self.device = torch.device(device)
        self.action_tokenizer = ActionTokenizer(vocab_end, n_bins)
        self.vocab_end = int(vocab_end)
        self.action_sep_ids = list(action_sep_ids)
        self.stats = action_stats(stats) if stats is not None else None
        if self.stats is not None:
            action_dim = len(self.stats["q01"])
        self.action_dim = int(action_dim)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self._warned_unnorm = False

    # ------------------------------------------------------------------ sizes

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return int(unwrap_model(self.model).language_model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_stats(self, stats: Mapping | None, key: str | None = None) -> None:
        """Action statistics used by collate (normalise) and predict_actions (un-normalise)."""
        self.stats = action_stats(stats, key) if stats is not None else None
        if self.stats is not None:
            self.action_dim = len(self.stats["q01"])

    # ------------------------------------------------------------------ images (per backend)

    def pixel_values(self, images) -> torch.Tensor:
        raise NotImplementedError

    def _images(self, samples_or_images) -> torch.Tensor:
        return self.pixel_values(samples_or_images).to(self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ batches

    def _pad(self, seqs: list[list[int]], fill: int) -> torch.Tensor:
        t = max(len(s) for s in seqs)
        out = torch.full((len(seqs), t), fill, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        return out

    def collate(
        self, samples: Sequence[Mapping], train: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Training/eval batch for action prediction (raw actions are normalised with self.stats).

        train=True applies openvla's image augmentation (random crop of 90 % area resized back,
        brightness, contrast, saturation and hue jitter: `augment_images`), drawn from `generator`. = to_device(collate_host(...))."""
        return self.to_device(self.collate_host(samples, train=train, generator=generator))

    def collate_host(
        self, samples: Sequence[Mapping], train: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The CPU half of collate: tokens, masks, action targets and the (augmented) images as
        host tensors, no CUDA. Runs in DataLoader workers; `to_device` finishes the batch."""
        if self.stats is None:
            raise ValueError(
                "collate needs the dataset's action statistics to normalise actions: "
                "load_backend(..., stats=dataset.statistics) or backend.set_stats(...)"
            )
        n = self.n_image_tokens
        ids, labels, spans, targets = [], [], [], []
        for s in samples:
            pt = encode_action_prompt(self.tokenizer, s["instruction"])
            act = self.action_tokenizer.encode(normalize_actions(s["action"], self.stats)).tolist()
            prompt = pt.ids + self.action_sep_ids
            ids.append(prompt + act + [self.eos_id])
            labels.append([-100] * len(prompt) + act + [self.eos_id])
            spans.append((pt.span, len(prompt)))
            targets.append(act)
        input_ids = self._pad(ids, self.pad_id)
        lab = self._pad(labels, -100)
        b, t = input_ids.shape
        attn = torch.zeros(b, t, dtype=torch.long)
        instr = torch.zeros(b, t + n, dtype=torch.bool)
        amask = torch.zeros(b, t + n, dtype=torch.bool)
        for i, (seq, ((s0, s1), p)) in enumerate(zip(ids, spans)):
            attn[i, : len(seq)] = 1
            instr[i, s0 + n : s1 + n] = True
            # logits at sequence position (t-1)+n predict the action token at text position t
            amask[i, p - 1 + n : p - 1 + n + self.action_dim] = True
        images = augment_images(images_to_uint8(samples), generator) if train else images_to_uint8(samples)
        return {
            "input_ids": input_ids,
            "attention_mask": attn,
            "pixel_values": self.host_pixel_values(images),
            "labels": lab,
            "instruction_mask": instr,
            "action_mask": amask,
            "action_targets": torch.as_tensor(targets, dtype=torch.long),
        }

    def host_pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """CPU part of image preprocessing (default: the uint8 images; `device_pixel_values` resizes
        and normalises). Backends whose preprocessing is CPU-only do all of it here."""
        return torch.from_numpy(np.ascontiguousarray(images))

    def device_pixel_values(self, host: torch.Tensor) -> torch.Tensor:
        """Finish `host_pixel_values` on the model's device."""
        if host.dtype == torch.uint8:
            return self._images(host.numpy() if host.device.type == "cpu" else host.cpu().numpy())
        return host.to(self.device, dtype=self.dtype, non_blocking=True)

    def to_device(self, host: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A `collate_host` batch (possibly in pinned memory) on the model's device."""
        out = {k: v.to(self.device, non_blocking=True) for k, v in host.items() if k != "pixel_values"}
        out["pixel_values"] = self.device_pixel_values(host["pixel_values"])
        return out

    def collate_vqa(self, samples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """`In: {question}?\\nOut:` + answer + </s>; labels only on the answer and </s>."""
        n = self.n_image_tokens
        ids, labels = [], []
        for s in samples:
            full, n_prompt = encode_vqa(self.tokenizer, s["question"], s["answer"])
            full = full + [self.eos_id]
            ids.append(full)
            labels.append([-100] * n_prompt + full[n_prompt:])
        input_ids = self._pad(ids, self.pad_id)
        lab = self._pad(labels, -100)
        attn = torch.arange(input_ids.shape[1])[None] < torch.tensor([len(s) for s in ids])[:, None]
        answer_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] + n, dtype=torch.bool)
        answer_mask[:, n : n + input_ids.shape[1] - 1] = lab[:, 1:] != -100
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attn.long().to(self.device),
            "pixel_values": self._images(samples),
            "labels": lab.to(self.device),
            "answer_mask": answer_mask.to(self.device),
        }

    # ------------------------------------------------------------------ model calls

    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        output_hidden_states: bool = False,
        model: nn.Module | None = None,
    ):
        m = self.model if model is None else model
        return m(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            output_hidden_states=output_hidden_states,
            use_cache=False,
            return_dict=True,
        )

    def hidden_states_at(
        self,
        batch: Mapping[str, torch.Tensor],
        indices: Sequence[int],
        model: nn.Module | None = None,
    ) -> dict[int, torch.Tensor]:
        """{i: forward(batch, output_hidden_states=True).hidden_states[i]} for the asked indices only
        (negative ones count from the end, as for a tuple of num_layers + 1), without keeping the
        other layers' states or computing the logits: forward hooks catch the needed states and the
        forward stops after the last of them. Index 0 = the decoder's input embeddings, i = decoder
        layer i-1's output, num_layers = the final norm's output. Works with and without grad."""
        m = self.model if model is None else model
        L = len(self.decoder_layers(m))
        with self.capture_hidden_states(indices, model=m, stop_after=True) as got:
            try:
                self.forward(batch, model=m)
            except _StopForward:
                pass
        want = sorted({int(i) % (L + 1) for i in indices})
        missing = [i for i in want if i not in got]
        if missing:
            raise RuntimeError(f"hidden states {missing} were not produced by the forward pass")
        return {int(i): got[int(i) % (L + 1)] for i in indices}

    @contextmanager
    def capture_hidden_states(
        self, indices: Sequence[int], model: nn.Module | None = None, stop_after: bool = False
    ):
        """Context: forward hooks put hidden_states[i] (same indexing as `hidden_states_at`) into the
        yielded dict {i % (num_layers + 1): tensor} during the forwards run inside it; stop_after
        raises _StopForward once the last of them is produced. The hooks are removed on exit."""
        m = self.model if model is None else model
        layers = self.decoder_layers(m)
        L = len(layers)
        want = sorted({int(i) % (L + 1) for i in indices})
        got: dict[int, torch.Tensor] = {}
        last = want[-1]

        def keep(i, t):
            got[i] = t[0] if isinstance(t, tuple) else t
            if stop_after and i == last:
                raise _StopForward

        handles = []
        try:
            for i in want:
                if i == 0:
                    handles.append(
                        layers[0].register_forward_pre_hook(
                            lambda mod, args, kwargs, i=i: keep(
                                i, args[0] if args else kwargs["hidden_states"]
                            ),
                            with_kwargs=True,
                        )
                    )
                elif i < L:
                    handles.append(layers[i - 1].register_forward_hook(lambda mod, a, out, i=i: keep(i, out)))
                else:
                    handles.append(
                        _final_norm(m, layers).register_forward_hook(lambda mod, a, out, i=i: keep(i, out))
                    )
            yield got
        finally:
            for h in handles:
                h.remove()

    def concat_batches(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict:
        """One batch with a's rows then b's (two `collate` batches): the text-length keys right-padded
        to the longer of the two (pad token, mask 0, label -100), so each row's forward is the one
        it has alone (causal attention, padding masked)."""
        if a.keys() != b.keys():
            raise ValueError(f"concat_batches: keys differ {sorted(a)} vs {sorted(b)}")
        out = {}
        for k in a:
            x, y = a[k], b[k]
            if k in PAD_KEYS and x.shape[1] != y.shape[1]:
                fill = self.pad_id if k == "input_ids" else PAD_KEYS[k]
                t = max(x.shape[1], y.shape[1])
                x, y = (
                    torch.cat([z, z.new_full((z.shape[0], t - z.shape[1], *z.shape[2:]), fill)], 1)
                    if z.shape[1] < t
                    else z
                    for z in (x, y)
                )
            out[k] = torch.cat([x, y.to(x.device)], 0)
        return out

    def lm_loss(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """Next-token CE over the labelled text positions (action tokens + </s>, or VQA answers)."""
        text_logits = logits[:, self.n_image_tokens : -1]  # predicts input_ids[:, 1:]
        gt = batch["labels"][:, 1:]
        keep = gt != -100
        return F.cross_entropy(text_logits[keep].float(), gt[keep])

    def action_metrics(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> dict:
        """openvla finetune.py metrics: CE loss, action-token accuracy, L1 in normalised space."""
        loss = self.lm_loss(batch, logits)
        text_logits = logits[:, self.n_image_tokens : -1]
        gt = batch["labels"][:, 1:]
        preds = text_logits.argmax(-1)
        mask = (gt >= self.action_tokenizer.begin) & (gt < self.vocab_end)
        correct = ((preds == gt) & mask).sum().float()
        accuracy = correct / mask.sum().clamp(min=1)
        cont_pred = self.action_tokenizer.decode(preds[mask].detach().cpu().numpy())
        cont_gt = self.action_tokenizer.decode(gt[mask].detach().cpu().numpy())
        l1 = float(np.abs(cont_pred - cont_gt).mean()) if cont_gt.size else float("nan")
        return {"loss": loss, "accuracy": accuracy, "l1": torch.tensor(l1)}

    def action_logprobs(
        self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """[B, A, n_bins] log-probs over the action vocabulary; column j = token id begin + j. Computed
        in `dtype` (float64: the ICSM sensitivity's KL of tiny perturbations)."""
        b = logits.shape[0]
        sel = logits[batch["action_mask"]].view(b, self.action_dim, -1)
        sel = sel[..., self.action_tokenizer.begin : self.vocab_end].to(dtype)
        return F.log_softmax(sel, dim=-1)

    # ------------------------------------------------------------------ structure

    def decoder_layers(self, model: nn.Module | None = None) -> nn.ModuleList:
        return find_decoder_layers(self.model if model is None else model)

    def checkpoint_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) pairs that `enable_gradient_checkpointing` wraps itself, beyond what the HF
        model's own `gradient_checkpointing_enable` reaches. Default: the projector."""
        proj = getattr(model, "projector", None)
        return [("projector", proj)] if isinstance(proj, nn.Module) else []

    def enable_gradient_checkpointing(self, model: nn.Module | None = None) -> list[str]:
        """`train.gradient_checkpointing`: activation checkpointing on every trainable tower.

        The HF model's `gradient_checkpointing_enable` (non-reentrant) reaches the modules HF knows
        (the Llama decoder layers, an HF ViT's layers); `checkpoint_targets` names the rest (timm
        blocks of OpenVLA's vision towers, the projector), wrapped by `checkpoint_module`. Call it
        before LoRA is applied or after: the wrapped forwards see PEFT's layers either way. Returns
        the names of the modules wrapped here (HF's own are not listed)."""
        m = unwrap_model(self.model if model is None else model)
        if getattr(m, "supports_gradient_checkpointing", False):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        done = []
        for name, mod in self.checkpoint_targets(m):
            checkpoint_module(mod)
            done.append(name)
        return done

    def lora_targets(self, targets: Sequence[str] = ("attn", "mlp"), layers: Any = "all") -> list[str]:
        """Full module names of the Linear layers to adapt (peft matches them as name suffixes, so
        they also work on a PEFT/DDP-wrapped model). targets ⊆ {attn, mlp, vision, projector,
        lm_head, patch_embed} (lm_head: the LM head; patch_embed: the vision towers' Conv2d patch
        embeddings, the only non-Linear modules); layers = "all" or [first, last] (inclusive)
        restricts attn/mlp to those decoder layers."""
        bad = set(targets) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA targets {sorted(bad)}; choose from {list(LORA_TARGETS)}")
        n = self.num_layers
        if layers in (None, "all"):
            lo, hi = 0, n - 1
        else:
            lo, hi = (int(x) for x in layers)
            lo, hi = lo % n if lo < 0 else lo, hi % n if hi < 0 else hi
            if not 0 <= lo <= hi < n:
                raise ValueError(f"LoRA layers {layers} out of range for {n} decoder layers")
        layer_re = re.compile(re.escape(LAYERS_PATH) + r"\.(\d+)\.(.+)$")
        suffixes = (ATTN_SUFFIXES if "attn" in targets else ()) + (MLP_SUFFIXES if "mlp" in targets else ())
        out = []
        for name, mod in unwrap_model(self.model).named_modules():
            if "lora_" in name:
                continue
            if isinstance(mod, nn.Conv2d):
                if "patch_embed" in targets and name.startswith(self.vision_prefix):
                    out.append(name)
                continue
            if not isinstance(mod, nn.Linear):
                continue
            if name.rsplit(".", 1)[-1] == "lm_head":
                if "lm_head" in targets:
                    out.append(name)
                continue
            m = layer_re.search(name)
            if m:
                if lo <= int(m.group(1)) <= hi and m.group(2) in suffixes:
                    out.append(name)
            elif ("vision" in targets and name.startswith(self.vision_prefix)) or (
                "projector" in targets and name.startswith(self.projector_prefix)
            ):
                out.append(name)
        if not out:
            raise ValueError(f"LoRA targets {list(targets)} (layers {layers}) match no Linear module")
        return out

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _greedy(
        self,
        prompts: list[list[int]],
        pixel_values: torch.Tensor,
        steps: int,
        allowed: slice | None,
        stop_at_eos: bool,
        model: nn.Module | None,
    ) -> list[list[int]]:
        """Greedy decoding with right padding: each sample appends at its own length.

        No KV cache: the whole sequence is re-run per new token (tiny sequences, few tokens)."""
        m = self.model if model is None else model
        n = self.n_image_tokens
        seqs = [list(p) for p in prompts]
        done = [False] * len(seqs)
        out: list[list[int]] = [[] for _ in seqs]
        for _ in range(steps):
            ids = self._pad([s for s in seqs], self.pad_id).to(self.device)
            lens = torch.tensor([len(s) for s in seqs])
            attn = (torch.arange(ids.shape[1])[None] < lens[:, None]).long().to(self.device)
            logits = m(
                input_ids=ids,
                attention_mask=attn,
                pixel_values=pixel_values,
                use_cache=False,
                return_dict=True,
            ).logits
            last = logits[torch.arange(len(seqs)), (lens - 1 + n).to(logits.device)].float()  # [B, V]
            if allowed is not None:
                masked = torch.full_like(last, float("-inf"))
                masked[:, allowed] = last[:, allowed]
                last = masked
            nxt = last.argmax(-1).tolist()
            for i, tok in enumerate(nxt):
                if done[i]:
                    continue
                seqs[i].append(tok)
                out[i].append(tok)
                if stop_at_eos and tok == self.eos_id:
                    done[i] = True
            if all(done):
                break
        return out

    @torch.no_grad()
    def _greedy_cached(self, prompts, pixel_values, steps, allowed, stop_at_eos, model):
        """Greedy decoding with a KV cache: one prefill over [<s>, patches, prompt] (right-padded),
        then one single-token step per new token. Each row's new token takes the next cache slot
        with its own position id (its true sequence position) and the padding slots masked, so the
        result equals the uncached decoding (VLABackend._greedy)."""
        m = self.model if model is None else model
        n = self.n_image_tokens
        b = len(prompts)
        ids = self._pad([list(p) for p in prompts], self.pad_id).to(self.device)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        attn = (torch.arange(ids.shape[1], device=self.device)[None] < lens[:, None]).long()
        out = m(
            input_ids=ids, attention_mask=attn, pixel_values=pixel_values, use_cache=True, return_dict=True
        )
        cache = getattr(out, "past_key_values", None)
        if cache is None:  # a model without a KV cache (e.g. a scripted test double)
            return VLABackend._greedy(self, prompts, pixel_values, steps, allowed, stop_at_eos, model)
        seq_mask = torch.cat([attn[:, :1], attn.new_ones(b, n), attn[:, 1:]], 1)  # [B, n + T]
        rows = torch.arange(b, device=self.device)
        last = out.logits[rows, lens - 1 + n].float()  # [B, V]
        done = [False] * b
        res: list[list[int]] = [[] for _ in range(b)]
        for k in range(steps):
            if allowed is not None:
                masked = torch.full_like(last, float("-inf"))
                masked[:, allowed] = last[:, allowed]
                last = masked
            nxt = last.argmax(-1)
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    res[i].append(tok)
                    done[i] = stop_at_eos and tok == self.eos_id
            if k == steps - 1 or all(done):
                break
            seq_mask = torch.cat([seq_mask, seq_mask.new_ones(b, 1)], 1)
            pos = (lens + n + k)[:, None]  # sequence position of the token appended at step k
            out = self._decode_step(m, nxt[:, None], seq_mask, pos, cache)
            cache = out.past_key_values
            last = out.logits[:, -1].float()
        return res

    def _decode_module(self, m: nn.Module) -> nn.Module:
        """The module a cached single-token step runs through: the model's own forward."""
        return m

    def _decode_step(self, m: nn.Module, input_ids, attention_mask, position_ids, cache):
        """One cached single-token step of `_greedy_cached`."""
        return self._decode_module(m)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )

    @torch.no_grad()
    def predict_actions(
        self, images, instructions: Sequence[str], model: nn.Module | None = None, normalized: bool = False
    ) -> np.ndarray:
        """Batched greedy action prediction -> [B, A] actions, un-normalised with self.stats.

        Decoding is restricted to the 256 action tokens (openvla argmaxes over the whole vocabulary
        and clips non-action ids to the extreme bins; restricting avoids that failure mode)."""
        m = self.model if model is None else model
        with eval_mode(m):
            prompts = [
                encode_action_prompt(self.tokenizer, s).ids + self.action_sep_ids for s in instructions
            ]
            pv = self._images(images)
            toks = self._greedy(
                prompts, pv, self.action_dim, slice(self.action_tokenizer.begin, self.vocab_end), False, m
            )
        acts = self.action_tokenizer.decode(np.asarray(toks))  # [B, A] normalised
        if normalized:
            return acts
        if self.stats is None:
            if not self._warned_unnorm:
                log.warning("predict_actions: no action statistics set; returning normalised actions")
                self._warned_unnorm = True
            return acts
        return unnormalize_actions(acts, self.stats)

    @torch.no_grad()
    def answer(
        self, images, questions: Sequence[str], max_new_tokens: int = 4, model: nn.Module | None = None
    ) -> list[str]:
        """Greedy answers to visual questions (action tokens excluded), up to </s>."""
        m = self.model if model is None else model
        with eval_mode(m):
            prompts = [encode_vqa(self.tokenizer, q)[0] for q in questions]
            toks = self._greedy(
                prompts, self._images(images), max_new_tokens, slice(0, self.action_tokenizer.begin), True, m
            )
        return [
            self.tokenizer.decode([t for t in ts if t != self.eos_id], skip_special_tokens=True).strip()
            for ts in toks
        ]

    def instruction_span(self, instruction: str) -> str:
        """The instruction tokens located in the prompt, decoded (audit)."""
        pt = encode_action_prompt(self.tokenizer, instruction)
        return decode_span(self.tokenizer, pt.ids, pt.span)


def images_to_uint8(images) -> np.ndarray:
    """List of samples (dicts with 'image') / list of arrays / array -> uint8 [B, H, W, 3]."""
    if isinstance(images, np.ndarray):
        arr = images
    elif isinstance(images, torch.Tensor):
        arr = images.cpu().numpy()
    else:
        arr = np.stack([np.asarray(x["image"] if isinstance(x, Mapping) else x) for x in images])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {arr.dtype}")
    return arr


def augment_images(
    images: np.ndarray,
    generator: torch.Generator | None = None,
    crop_area: float = 0.9,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.05,
) -> np.ndarray:
    """openvla's train-time image augmentation on uint8 [B, H, W, 3], drawn from `generator`.

    openvla (prismatic/vla/datasets/datasets.py, image_aug=True; dlimp's augment_image), in its
    order, each result clipped to [0, 1]: random_resized_crop (scale 0.9, ratio 1: a square crop of
    `crop_area` of the image at a random place, resized back), random_brightness 0.2 (add
    δ ∈ [−0.2, 0.2]), random_contrast [0.8, 1.2] (scale around each channel's mean, as
    tf.image.adjust_contrast), random_saturation [0.8, 1.2] (HSV saturation × f), random_hue 0.05
    (HSV hue + δ, δ ∈ [−0.05, 0.05] of a full turn). One draw per image and op."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    b, _, h, w = x.shape
    ch, cw = max(1, round(h * crop_area**0.5)), max(1, round(w * crop_area**0.5))
    out = torch.empty_like(x)
    for i in range(b):
        r = torch.randint(0, h - ch + 1, (1,), generator=generator).item()
        c = torch.randint(0, w - cw + 1, (1,), generator=generator).item()
        crop = x[i : i + 1, :, r : r + ch, c : c + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    u = torch.rand(b, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]: one per image and op
    out = jitter_colors(out.clamp(0, 1), u, brightness, contrast, saturation, hue)
    return (out * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def jitter_colors(
    x: torch.Tensor, u: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """The colour ops of `augment_images` on float [B, 3, H, W] in [0, 1], for given draws
    u [B, 4] in [-1, 1]: brightness + u0·b, contrast × (1 + u1·c) around each channel's mean,
    saturation × (1 + u2·s), hue + u3·h; clipped to [0, 1] after each (as dlimp)."""
    b = x.shape[0]
    out = (x + (u[:, 0] * brightness).view(b, 1, 1, 1)).clamp(0, 1)
    mean = out.mean(dim=(2, 3), keepdim=True)  # per channel, as tf.image.adjust_contrast
    out = ((out - mean) * (1 + u[:, 1] * contrast).view(b, 1, 1, 1) + mean).clamp(0, 1)
    hsv = rgb_to_hsv(out)
    sat = (hsv[:, 1] * (1 + u[:, 2] * saturation).view(b, 1, 1)).clamp(0, 1)
    out = hsv_to_rgb(torch.stack([hsv[:, 0], sat, hsv[:, 2]], dim=1)).clamp(0, 1)
    hsv = rgb_to_hsv(out)
    hue_shifted = (hsv[:, 0] + (u[:, 3] * hue).view(b, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue_shifted, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn, as TF's)."""
    r, g, b = rgb.unbind(1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, ((g - b) / d) % 6, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv."""
    h, s, v = hsv.unbind(1)
    h6 = (h % 1.0) * 6.0
    k = torch.stack([(5 + h6) % 6, (3 + h6) % 6, (1 + h6) % 6], dim=1)  # r, g, b
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * f


def read_stats_file(path: str | Path, key: str | None = None) -> dict:
    import json

    return action_stats(json.loads(Path(path).read_text()), key)
