"""Issue 14.2, mode `own_params` (the ablation `hsw_own_params`; the default `flow_down` is tested in
tests/test_hsw_flow_down.py): the gains HSW applies are the gains it logs. Each hooked layer's parameters get
J^T (g_n + β g_p + γ g_f) for the TRUE gradient g at the layer's output, exactly once: the surgery
of one layer does not reach the layers below (the old hooks scaled the fragile component by γ at
every hooked layer it passed, γ² within a group and more across groups / in hsw_all_layers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def _orth(D, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=g))
    return q


class View:
    """The two methods of IcsmView the HSW plug-in reads, with fixed subspaces."""

    def __init__(self, bases):
        self.bases = bases

    def layer_bases(self, variant, num_layers, sensitivity=True):
        return self.bases


def _setup(hooked, seed=0):
    from peft import LoraConfig, get_peft_model

    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.train.plugins import TrainContext

    be = random_tiny_backend(seed=seed)
    torch.manual_seed(seed)
    model = get_peft_model(
        be.model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=be.lora_targets(["attn", "mlp"]), init_lora_weights="gaussian"
        ),
    )
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:  # B = 0 at init would leave every lora_A gradient zero
            with torch.no_grad():
                p.normal_(0, 0.05)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ctx = TrainContext(
        backend=be,
        model=model,
        device=torch.device("cpu"),
        stage_cfg={},
        trainable=trainable,
        autocast=lambda: torch.autocast("cpu", enabled=False),
    )
    D = be.hidden_size
    Q = _orth(D, 12, seed + 1)  # every group shares one basis: overlapping subspaces compound most
    bases = {l: (Q[:, :4], Q[:, 4:12]) for l in hooked}
    rng = np.random.default_rng(seed)
    samples = [
        {
            "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "instruction": ["open the drawer", "press the button"][i % 2],
            "action": rng.uniform(-1, 1, 4).astype(np.float32),
        }
        for i in range(3)
    ]
    return be, model, ctx, bases, be.collate(samples)


def _layer_params(be, model, l):
    return [p for p in be.decoder_layers(model)[l].parameters() if p.requires_grad]


def _reference(be, model, batch, bases):
    """Per hooked layer: the parameter-gradient images J^T g_n, J^T g_p, J^T g_f of the true g."""
    from vlaforget.methods.hsw import proj
    from vlaforget.models.features import layer_outputs

    layers = be.decoder_layers(model)
    with layer_outputs(layers, list(bases)) as hs:
        loss = be.action_metrics(batch, be.forward(batch, model=model).logits)["loss"]
    hooked = sorted(bases)
    gs = torch.autograd.grad(loss, [hs[l] for l in hooked], retain_graph=True)
    parts = {}
    for l, g in zip(hooked, gs):
        uf, up = bases[l]
        gf, gp = proj(g, uf), proj(g, up)
        comps = {"n": g - gf - gp, "p": gp, "f": gf}
        params = _layer_params(be, model, l)
        parts[l] = {
            k: torch.cat(
                [x.reshape(-1) for x in torch.autograd.grad(hs[l], params, grad_outputs=v, retain_graph=True)]
            )
            for k, v in comps.items()
        }
    plain = torch.autograd.grad(loss, [p for _, p in model.named_parameters() if p.requires_grad])
    return parts, plain


def _hsw_grads(be, model, ctx, batch, bases, beta, gamma, clamp="per_token"):
    from vlaforget.train.plugins import HSWPlugin

    plug = HSWPlugin(ctx, {"beta": beta, "gamma": gamma, "clamp": clamp, "mode": "own_params"}, View(bases))
    try:
        model.zero_grad(set_to_none=True)
        loss = be.action_metrics(batch, be.forward(batch, model=model).logits)["loss"]
        loss.backward()
        logs = plug.logs()
    finally:
        plug.close()
    return logs


@pytest.mark.parametrize("hooked", [[4, 5, 6, 7], list(range(8))], ids=["icsm_groups", "all_layers"])
def test_measured_gains_equal_logged_gains(hooked):
    beta, gamma = 0.5, 0.2
    be, model, ctx, bases, batch = _setup(hooked)
    parts, plain = _reference(be, model, batch, bases)
    logs = _hsw_grads(be, model, ctx, batch, bases, beta, gamma)
    assert logs["hsw_beta"] == beta and logs["hsw_gamma"] == gamma
    assert logs["hsw_gprime_norm"] <= logs["hsw_g_norm"] * (1 + 1e-6)  # the gradient the log reports
    for l in hooked:
        got = torch.cat([p.grad.reshape(-1) for p in _layer_params(be, model, l)])
        P = parts[l]
        # least-squares gains of the update on (J^T g_n, J^T g_p, J^T g_f): must be (1, β, γ)
        A = torch.stack([P["n"], P["p"], P["f"]], 1).double()
        coef = torch.linalg.lstsq(A, got.double()[:, None]).solution.flatten()
        assert coef.tolist() == pytest.approx([1.0, beta, gamma], abs=1e-4), (l, coef)
        assert torch.allclose(got, P["n"] + beta * P["p"] + gamma * P["f"], atol=1e-6, rtol=1e-4), l
    # layers without a hook, and parameters outside the decoder, get the plain gradient
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (n, p), g0 in zip(named, plain):
        if not any(f".layers.{l}." in n for l in hooked):
            assert torch.allclose(p.grad, g0, atol=1e-7, rtol=1e-5), n


def test_identity_gains_leave_the_gradient_untouched():
    be, model, ctx, bases, batch = _setup([4, 5, 6, 7])
    _, plain = _reference(be, model, batch, bases)
    _hsw_grads(be, model, ctx, batch, bases, 1.0, 1.0)
    for (n, p), g0 in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], plain):
        assert torch.equal(p.grad, g0), n
