"""Issue 26.1: HSW as the user's research/hooks/hsw_hook.py builds it (`method.hsw.mode: flow_down`, the
default). At each hooked decoder layer the gradient flowing DOWN out of the layer, dL/d(its input), is
replaced by g' = (g_n + β g_p + γ g_f) · min(1, ‖g‖ / (‖g'‖ + eps)) (‖·‖ over the whole tensor), so every
trainable parameter below -- lower decoder layers, projector, vision tower -- is trained on the surgered
gradient; the hooked layer's own parameters see the gradient that arrives from above.

Every expected gradient here is computed by an independent route: an HSW-free forward, autograd from the
loss to each hooked layer's output and through the layer to its input, the surgery written out below
(not methods.hsw), then autograd through the lower part of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

HOOKED = [4, 5, 6, 7]  # the tiny model's A/B groups: A = 4, 5 (basis UA), B = 6, 7 (basis UB)
TARGETS = ["attn", "mlp", "vision", "projector"]


def _orth(D, k, seed):
    q, _ = torch.linalg.qr(torch.randn(D, k, generator=torch.Generator().manual_seed(seed)))
    return q


class View:
    """The one method of IcsmView the HSW plug-in reads; a group's layers share ONE (U_f, U_p) tuple."""

    def __init__(self, bases):
        self.bases = bases

    def layer_bases(self, variant, num_layers, sensitivity=True):
        return self.bases


def _setup(seed=0, identity_branches=()):
    """(backend, PEFT model, TrainContext, bases, batch). identity_branches: decoder layers whose attention
    and MLP outputs are zeroed (base weights and LoRA), so the layer is the identity on the residual stream."""
    from peft import LoraConfig, get_peft_model

    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.train.plugins import TrainContext

    be = random_tiny_backend(seed=seed)
    torch.manual_seed(seed)
    model = get_peft_model(
        be.model,
        LoraConfig(r=4, lora_alpha=8, target_modules=be.lora_targets(TARGETS), init_lora_weights="gaussian"),
    )
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_B" in n:  # B = 0 at init would leave every lora_A gradient zero
            with torch.no_grad():
                p.normal_(0, 0.05)
    for l in identity_branches:
        for n, p in be.decoder_layers(model)[l].named_parameters():
            if any(k in n for k in ("o_proj", "down_proj")) and (
                "lora_B" in n or "base_layer" in n or n.endswith("proj.weight")
            ):
                with torch.no_grad():
                    p.zero_()
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
    QA, QB = _orth(D, 12, seed + 1), _orth(D, 12, seed + 2)  # two groups, two (overlapping) bases
    A, B = (QA[:, :3], QA[:, 3:9]), (QB[:, :3], QB[:, 3:9])
    bases = {4: A, 5: A, 6: B, 7: B}
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


def _named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _grads(model):
    """{name: .grad} of the trainable parameters (zeros for one the loss does not reach)."""
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in _named(model)}


def _loss(be, model, batch):
    return be.action_metrics(batch, be.forward(batch, model=model).logits)["loss"]


def _user_surgery(g, uf, up, beta, gamma, eps=1e-8):
    """research/hooks/hsw_hook.py's _hook, line for line (in float64 here: an independent reference)."""
    g = g.double()
    uf, up = uf.double(), up.double()
    gf = (g @ uf) @ uf.T
    gp = (g @ up) @ up.T
    gn = g - gf - gp
    gprime = gn + beta * gp + gamma * gf
    scale = torch.clamp(g.norm() / (gprime.norm() + eps), max=1.0)
    return gprime * scale, scale


def _expected(be, model, batch, bases, beta, gamma):
    """HSW-free autograd + the surgery by hand: {param name: expected grad}, per-hook measurements, and
    the gradient leaving the lowest hook with / without the surgery."""
    from vlaforget.models.features import layer_outputs

    layers = be.decoder_layers(model)
    lo, hi = min(bases), max(bases)
    with layer_outputs(layers, list(range(lo - 1, hi + 1))) as hs:
        loss = _loss(be, model, batch)
    hs = dict(hs)
    named = _named(model)
    expect = {}
    g_out = torch.autograd.grad(loss, hs[hi], retain_graph=True)[0]  # true gradient at the top hook's output
    true_out = g_out
    hooks = {}
    for l in range(hi, lo - 1, -1):
        own = [(n, p) for n, p in named if f".layers.{l}." in n]
        # the hooked layer's own parameters: the gradient arriving from above (not its own surgery)
        for (n, _), gr in zip(
            own, torch.autograd.grad(hs[l], [p for _, p in own], grad_outputs=g_out, retain_graph=True)
        ):
            expect[n] = gr
        g_in = torch.autograd.grad(hs[l], hs[l - 1], grad_outputs=g_out, retain_graph=True)[0]
        true_out = torch.autograd.grad(hs[l], hs[l - 1], grad_outputs=true_out, retain_graph=True)[0]
        uf, up = bases[l]
        gp_, scale = _user_surgery(g_in, uf, up, beta, gamma)
        hooks[l] = {"g": g_in.double(), "gprime": gp_, "scale": float(scale)}
        g_out = gp_.float()
    lower = [(n, p) for n, p in named if n not in expect]
    grads = torch.autograd.grad(hs[lo - 1], [p for _, p in lower], grad_outputs=g_out, allow_unused=True)
    for (n, p), gr in zip(lower, grads):
        expect[n] = torch.zeros_like(p) if gr is None else gr
    return expect, hooks, g_out.double(), true_out.double()


def _hsw_backward(be, model, ctx, batch, bases, beta, gamma, **cfg):
    from vlaforget.train.plugins import HSWPlugin

    plug = HSWPlugin(ctx, {"beta": beta, "gamma": gamma, **cfg}, View(bases))
    try:
        model.zero_grad(set_to_none=True)
        _loss(be, model, batch).backward()
        logs = plug.logs()
    finally:
        plug.close()
    return _grads(model), logs


def _plain_backward(be, model, batch):
    model.zero_grad(set_to_none=True)
    _loss(be, model, batch).backward()
    return _grads(model)


@pytest.mark.parametrize("beta,gamma", [(0.5, 0.2), (1.5, 3.0)], ids=["damping", "clamped"])
def test_layer0_and_vision_lora_get_the_hand_computed_surgered_gradient(beta, gamma):
    be, model, ctx, bases, batch = _setup()
    expect, hooks, _, _ = _expected(be, model, batch, bases, beta, gamma)
    plain = _plain_backward(be, model, batch)
    got, logs = _hsw_backward(be, model, ctx, batch, bases, beta, gamma)
    names = list(got)
    layer0 = [n for n in names if ".layers.0." in n and "lora_A" in n]
    vision = [n for n in names if "vision_backbone" in n and "lora_A" in n]
    proj = [n for n in names if "projector" in n and "lora_A" in n]
    assert layer0 and vision and proj
    for n in names:  # every trainable parameter, below, inside and above the hooked layers
        assert torch.allclose(got[n], expect[n], rtol=1e-4, atol=1e-8), n
    for n in layer0 + vision + proj + [n for n in names if ".layers.5." in n]:
        assert not torch.allclose(got[n], plain[n], rtol=1e-3, atol=1e-7), n  # not the baseline's
    # the top hooked layer's own parameters see the true gradient (nothing above it is hooked)
    for n in [n for n in names if ".layers.7." in n]:
        assert torch.allclose(got[n], plain[n], rtol=1e-5, atol=1e-9), n
    # logged per hook = measured per hook; ‖g'‖ ≤ ‖g‖ at every hook
    for l, h in hooks.items():
        g, gp_ = h["g"], h["gprime"]
        uf, up = (b.double() for b in bases[l])
        assert logs[f"hsw_L{l}_g_norm"] == pytest.approx(float(g.norm()), rel=1e-4)
        assert logs[f"hsw_L{l}_gprime_norm"] == pytest.approx(float(gp_.norm()), rel=1e-4)
        assert logs[f"hsw_L{l}_gf_norm"] == pytest.approx(float((g @ uf).norm()), rel=1e-4)
        assert logs[f"hsw_L{l}_gp_norm"] == pytest.approx(float((g @ up).norm()), rel=1e-4)
        assert logs[f"hsw_L{l}_clamp_scale"] == pytest.approx(h["scale"], rel=1e-5)
        assert logs[f"hsw_L{l}_gain_f"] == pytest.approx(float((gp_ @ uf).norm() / (g @ uf).norm()), rel=1e-4)
        assert logs[f"hsw_L{l}_gain_p"] == pytest.approx(float((gp_ @ up).norm() / (g @ up).norm()), rel=1e-4)
        # per_tensor clamp with U_f ⟂ U_p: the hook's gains are exactly γ·scale and β·scale
        assert logs[f"hsw_L{l}_gain_f"] == pytest.approx(gamma * h["scale"], rel=1e-4)
        assert logs[f"hsw_L{l}_gain_p"] == pytest.approx(beta * h["scale"], rel=1e-4)
        assert logs[f"hsw_L{l}_gprime_norm"] <= logs[f"hsw_L{l}_g_norm"] * (1 + 1e-6)
        if gamma > 1:
            assert h["scale"] < 1.0  # the clamp acted
    assert logs["hsw_beta"] == beta and logs["hsw_gamma"] == gamma
    assert logs["hsw_gprime_norm"] <= logs["hsw_g_norm"] * (1 + 1e-6)


def _measured_bottom_gains(bases, g_hsw, g_off, top):
    uf, up = (b.double() for b in bases[top])
    return (
        float((g_hsw @ uf).norm() / (g_off @ uf).norm()),
        float((g_hsw @ up).norm() / (g_off @ up).norm()),
    )


@pytest.mark.parametrize("beta,gamma", [(0.5, 0.2), (1.0, 0.1)])
def test_effective_gains_equal_the_measured_gain_below_the_lowest_hook(beta, gamma):
    """hsw_eff_gain_{f,p}_g{B} = ‖P^B g_bottom(HSW)‖ / ‖P^B g_bottom(no HSW)‖ for both group bases, with
    the real (mixing) layers between the hooks; the skip-path product differs there."""
    be, model, ctx, bases, batch = _setup()
    _, _, g_hsw, g_off = _expected(be, model, batch, bases, beta, gamma)
    _, logs = _hsw_backward(be, model, ctx, batch, bases, beta, gamma)
    for top in (5, 7):
        mf, mp = _measured_bottom_gains(bases, g_hsw, g_off, top)
        assert logs[f"hsw_eff_gain_f_g{top}"] == pytest.approx(mf, rel=1e-4), top
        assert logs[f"hsw_eff_gain_p_g{top}"] == pytest.approx(mp, rel=1e-4), top
    assert logs["hsw_eff_gain_f_g7"] < 1.0
    _, off = _hsw_backward(be, model, ctx, batch, bases, beta, gamma, measure_effective=False)
    assert "hsw_eff_gain_f_g7" not in off and "hsw_skip_gain_f_g7" in off


def test_skip_gains_equal_the_measured_gain_when_the_layers_between_pass_the_gradient():
    """With the hooked layers below the top one made identities of the residual stream, the gradient leaving
    the lowest hook is S_4 S_5 S_6 S_7 g: the product of the per-hook gains (hsw_skip_gain_*) is then the
    measured gain too, for both group bases (the cross-basis factors included), and for one shared basis it
    is γ^4 (β^4) times the clamp factors."""
    beta, gamma = 0.6, 0.3
    be, model, ctx, bases, batch = _setup(identity_branches=[4, 5, 6])
    _, _, g_hsw, g_off = _expected(be, model, batch, bases, beta, gamma)
    _, logs = _hsw_backward(be, model, ctx, batch, bases, beta, gamma)
    for top in (5, 7):
        mf, mp = _measured_bottom_gains(bases, g_hsw, g_off, top)
        for kind in ("skip", "eff"):
            assert logs[f"hsw_{kind}_gain_f_g{top}"] == pytest.approx(mf, rel=1e-4), (kind, top)
            assert logs[f"hsw_{kind}_gain_p_g{top}"] == pytest.approx(mp, rel=1e-4), (kind, top)
    one = {l: bases[7] for l in HOOKED}  # a single-basis chain (the `single` variant)
    _, _, g_hsw, g_off = _expected(be, model, batch, one, beta, gamma)
    _, logs = _hsw_backward(be, model, ctx, batch, one, beta, gamma)
    scales = np.prod([logs[f"hsw_L{l}_clamp_scale"] for l in HOOKED])
    assert logs["hsw_skip_gain_f_g7"] == pytest.approx(gamma**4 * scales, rel=1e-4)
    assert logs["hsw_skip_gain_p_g7"] == pytest.approx(beta**4 * scales, rel=1e-4)
    mf, mp = _measured_bottom_gains(one, g_hsw, g_off, 7)
    assert logs["hsw_eff_gain_f_g7"] == pytest.approx(mf, rel=1e-4)
    assert logs["hsw_skip_gain_f_g7"] == pytest.approx(mf, rel=1e-4)


@pytest.mark.parametrize("log_step", [True, False])
def test_unit_gains_reproduce_the_baseline_bit_for_bit(log_step):
    be, model, ctx, bases, batch = _setup()
    ctx.log_step = log_step
    plain = _plain_backward(be, model, batch)
    got, logs = _hsw_backward(be, model, ctx, batch, bases, 1.0, 1.0)
    assert got.keys() == plain.keys()
    for n in plain:
        assert torch.equal(got[n], plain[n]), n
    assert ("hsw_L4_g_norm" in logs) == log_step  # the hooks fired and logged on a logged step


def test_inactive_hsw_leaves_the_gradient_alone():
    """CRaFT's separate retention forward + backward runs with hsw.active = False: no surgery there."""
    from vlaforget.train.plugins import HSWPlugin

    be, model, ctx, bases, batch = _setup()
    plain = _plain_backward(be, model, batch)
    plug = HSWPlugin(ctx, {"beta": 0.3, "gamma": 0.1}, View(bases))
    try:
        plug.active = False
        got = _plain_backward(be, model, batch)
    finally:
        plug.close()
    for n in plain:
        assert torch.equal(got[n], plain[n]), n


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_surgered_gradient_under_gradient_checkpointing(reentrant):
    """The loop's checkpointing (non-reentrant) and HF's other kind: the same surgered gradients as
    without checkpointing, the surgery applied once per hook (not again in the recomputation)."""
    beta, gamma = 0.5, 0.2
    be, model, ctx, bases, batch = _setup()
    ref, ref_logs = _hsw_backward(be, model, ctx, batch, bases, beta, gamma)
    be.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    try:
        got, logs = _hsw_backward(be, model, ctx, batch, bases, beta, gamma)
    finally:
        be.model.gradient_checkpointing_disable()
    # transformers 4.40 checkpoints the ViT layers too; reentrant checkpointing then gives the frozen-input
    # vision tower no gradient at all, HSW or not (the loop checkpoints non-reentrant): compare the rest
    skip = (
        ("vision_backbone",)
        if reentrant and all(float(got[n].abs().max()) == 0 for n in got if "vision_backbone" in n)
        else ()
    )
    for n in ref:
        if not any(k in n for k in skip):
            assert torch.allclose(got[n], ref[n], rtol=1e-5, atol=1e-9), n
    for l in HOOKED:
        assert logs[f"hsw_L{l}_g_norm"] == pytest.approx(ref_logs[f"hsw_L{l}_g_norm"], rel=1e-5)
    if reentrant:  # the layers' graphs exist one at a time in the backward: no shadow gradient across them
        assert "hsw_eff_gain_f_g7" not in logs
    else:
        assert logs["hsw_eff_gain_f_g7"] == pytest.approx(ref_logs["hsw_eff_gain_f_g7"], rel=1e-5)


def test_own_params_mode_leaves_the_layers_below_on_the_true_gradient():
    """The ablation `hsw_own_params`: layer 0, projector and vision LoRA get the baseline's gradient."""
    be, model, ctx, bases, batch = _setup()
    plain = _plain_backward(be, model, batch)
    got, _ = _hsw_backward(be, model, ctx, batch, bases, 0.5, 0.2, mode="own_params")
    below = [n for n in plain if ".layers.0." in n or "vision_backbone" in n or "projector" in n]
    assert below
    for n in below:
        assert torch.allclose(got[n], plain[n], rtol=1e-5, atol=1e-9), n
    assert not all(torch.allclose(got[n], plain[n]) for n in plain if ".layers.5." in n)


def test_hsw_layers_hooks_only_the_named_layers_with_the_users_basis_map():
    """hsw.layers [-2, -1] (the user's recipe): only the last two decoder layers are hooked; a layer of a
    group keeps its group's basis, a layer outside every group takes the top group's (finetune.py's
    `rep_layers[-1]`); an index past the model is refused naming the range."""
    from vlaforget.errors import TrainingError
    from vlaforget.train.plugins.hsw import hooked_layers

    a, b = ("Ua_f", "Ua_p"), ("Ub_f", "Ub_p")
    groups = {4: a, 5: a, 6: b, 7: b}  # A = (4, 5) rep 5, B = (6, 7) rep 7 at 8 layers
    assert hooked_layers(groups, None, 8) == groups
    assert hooked_layers(groups, [-2, -1], 8) == {6: b, 7: b}
    assert hooked_layers(groups, [5, 2], 8) == {5: a, 2: b}
    with pytest.raises(TrainingError, match="outside the model's 8 decoder layers"):
        hooked_layers(groups, [8], 8)


def test_hsw_layers_in_the_plugin_hooks_two_layers_only():
    be, _model, ctx, bases, _batch = _setup()
    from vlaforget.train.plugins import HSWPlugin

    plug = HSWPlugin(ctx, {"beta": 0.5, "gamma": 0.2, "layers": [-1]}, View(bases))
    try:
        top = be.num_layers - 1
        assert sorted(plug.layer_map) == [top]
        assert plug.layer_map[top] is bases[max(bases)]
    finally:
        plug.close()
