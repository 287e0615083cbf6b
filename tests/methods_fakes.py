"""A tiny fake VLA backend + dataset conforming to the backend protocol (docs/DEVELOPMENT.md, Models),
for the methods' tests. It has a *planted fragile direction*: decoder layer `plant_layer` mixes the
component along `u_star` of earlier positions strongly into later ones (causal mean), and the head's
action-bin rows read `u_star`, so moving the instruction states along u_star changes the action
distribution far more than moving them along any other direction.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

WORDS = [
    "push",
    "pull",
    "open",
    "close",
    "the",
    "red",
    "blue",
    "green",
    "drawer",
    "door",
    "button",
    "left",
    "right",
    "slowly",
    "top",
    "handle",
]
PAD, BOS, EOS, SEP = 0, 1, 2, 3
W0 = 4  # first word id


class FakeLayer(nn.Module):
    """h + causal_mean(h) @ M (+ tanh bit), returning a tuple like HF decoder layers (4.40)."""

    def __init__(self, M: torch.Tensor, tuple_out: bool = True):
        super().__init__()
        self.M = nn.Parameter(M.clone())
        self.tuple_out = tuple_out

    def forward(self, hidden_states, attention_mask=None):
        S = hidden_states.shape[1]
        cm = (
            hidden_states.cumsum(1)
            / torch.arange(1, S + 1, dtype=hidden_states.dtype, device=hidden_states.device)[None, :, None]
        )
        out = hidden_states + cm @ self.M
        return (out,) if self.tuple_out else out


class FakeVLA(nn.Module):
    def __init__(self, D, L, vocab, n_img, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.img_proj = nn.Linear(3, D)
        self.layers = layers
        self.head = nn.Linear(D, vocab, bias=False)
        self.n_img = n_img

    def forward(self, input_ids, attention_mask, pixel_values, output_hidden_states=False):
        x = torch.cat(
            [self.embed(input_ids[:, :1]), self.img_proj(pixel_values), self.embed(input_ids[:, 1:])], 1
        )
        hs = [x]
        for layer in self.layers:
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
            hs.append(x)
        return SimpleNamespace(logits=self.head(x), hidden_states=tuple(hs) if output_hidden_states else None)


class FakeBackend:
    def __init__(
        self,
        D=16,
        L=4,
        n_img=2,
        action_dim=2,
        n_bins=8,
        plant_layer=3,
        u_index=2,
        gain=4.0,
        head_gain=3.0,
        seed=0,
        tuple_out=True,
        scales=None,
    ):
        g = torch.Generator().manual_seed(seed)
        self.D, self.n_bins, self.action_dim, self.n_image_tokens = D, n_bins, action_dim, n_img
        self.vocab = W0 + len(WORDS) + n_bins
        self.u_star = torch.zeros(D)
        self.u_star[u_index] = 1.0
        Ms = []
        for layer in range(L):
            M = 0.02 * torch.randn(D, D, generator=g)
            if layer == plant_layer:
                M += gain * torch.outer(self.u_star, self.u_star)
            Ms.append(M)
        layers = nn.ModuleList([FakeLayer(M, tuple_out) for M in Ms])
        self.model = FakeVLA(D, L, self.vocab, n_img, layers)
        with torch.no_grad():
            sc = torch.linspace(3.0, 0.3, D) if scales is None else scales
            self.model.embed.weight.copy_(torch.randn(self.vocab, D, generator=g) * sc)
            self.model.img_proj.weight.copy_(0.1 * torch.randn(D, 3, generator=g))
            self.model.img_proj.bias.copy_(0.1 * torch.randn(D, generator=g))
            W = 0.05 * torch.randn(self.vocab, D, generator=g)
            centre = (n_bins - 1) / 2
            for b in range(n_bins):
                W[self.vocab - n_bins + b] += head_gain * (b - centre) / centre * self.u_star
            self.model.head.weight.copy_(W)
        self.model.eval()
        self.device = torch.device("cpu")
        self.num_layers = L
        self.hidden_size = D
        self.statistics = None

    # protocol ------------------------------------------------------------
    def decoder_layers(self, model=None):
        return self.model.layers

    def tokenize(self, instruction):
        return [W0 + WORDS.index(w) for w in instruction.lower().split()]

    def collate(self, samples, train=False):
        n = self.n_image_tokens
        ids, spans, acts = [], [], []
        for s in samples:
            w = self.tokenize(s["instruction"])
            a = np.clip(np.asarray(s["action"], dtype=np.float32), -1, 1)
            bins = np.minimum(((a + 1) / 2 * self.n_bins).astype(int), self.n_bins - 1)
            act = [self.vocab - self.n_bins + int(b) for b in bins]
            seq = [BOS] + w + [SEP] + act + [EOS]
            ids.append(seq)
            spans.append((1, 1 + len(w), 2 + len(w)))
            acts.append(act)
        T = max(len(s) for s in ids)
        B = len(samples)
        input_ids = torch.full((B, T), PAD, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        instr = torch.zeros(B, T + n, dtype=torch.bool)
        amask = torch.zeros(B, T + n, dtype=torch.bool)
        for i, (seq, (s0, s1, p)) in enumerate(zip(ids, spans)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            instr[i, s0 + n : s1 + n] = True
            amask[i, p - 1 + n : p - 1 + n + self.action_dim] = True
        pix = torch.stack(
            [
                torch.as_tensor(s["image"], dtype=torch.float32).reshape(n, -1, 3).mean(1) / 255.0
                for s in samples
            ]
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attn,
            "pixel_values": pix,
            "instruction_mask": instr,
            "action_mask": amask,
            "action_targets": torch.tensor(acts, dtype=torch.long),
        }

    def forward(self, batch, output_hidden_states=False, model=None):
        m = self.model if model is None else model
        return m(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            output_hidden_states=output_hidden_states,
        )

    def action_logprobs(self, batch, logits, dtype=torch.float32):
        B = logits.shape[0]
        sel = logits[batch["action_mask"]].view(B, self.action_dim, -1)
        return sel[..., -self.n_bins :].to(dtype).log_softmax(-1)

    def instruction_span(self, instruction):
        return " ".join(WORDS[i - W0] for i in self.tokenize(instruction))


class FakeDataset:
    """List-like dataset with the CachedDataset item fields the methods use."""

    def __init__(self, n=96, seed=0, empty_every=0, name="fake_ds"):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            k = int(rng.integers(2, 6))
            words = [WORDS[int(j)] for j in rng.integers(0, len(WORDS), size=k)]
            instr = "" if empty_every and i % empty_every == 0 else " ".join(words)
            self.items.append(
                {
                    "image": rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8),
                    "instruction": instr,
                    "action": rng.uniform(-1, 1, size=2).astype(np.float32),
                    "task": "t",
                    "episode": i // 8,
                    "step": i % 8,
                }
            )
        self.name = name
        self.statistics = {"action": {}}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[int(i)]
