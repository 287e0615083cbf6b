"""Issue 14.1: one space for every ICSM group -- the residual stream at a decoder layer's output,
before any final norm. For the LAST layer, HF's hidden_states[L] has the final RMSNorm applied; the
probe set, the Thermostat and the forgetting drift must record the layer's own output instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def _samples(n=3, size=32, action_dim=4):
    rng = np.random.default_rng(0)
    instr = ["open the drawer", "press the button from the top", "pick up the block"]
    return [
        {
            "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "instruction": instr[i % 3],
            "action": rng.uniform(-1, 1, action_dim).astype(np.float32),
        }
        for i in range(n)
    ]


def own_output_pooled(backend, samples, layer):
    """Instruction-pooled output of decoder `layer`, read by a hook on that layer (the reference)."""
    from vlaforget.models.features import pool_instruction

    got = {}
    h = backend.decoder_layers()[layer].register_forward_hook(
        lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    try:
        batch = backend.collate(samples)
        with torch.no_grad():
            out = backend.forward(batch, output_hidden_states=True)
    finally:
        h.remove()
    normed, _ = pool_instruction(out.hidden_states[layer + 1].float(), batch["instruction_mask"])
    return pool_instruction(got["h"].float(), batch["instruction_mask"])[0], normed


def check_last_layer_is_pre_norm(backend, samples):
    from vlaforget.models.features import pooled_states

    L = backend.num_layers
    pooled, empty = pooled_states(backend, samples, batch_size=2)
    assert not empty.any()
    for layer in (L - 1, L - 3):
        ref, hf = own_output_pooled(backend, samples, layer)
        assert torch.allclose(pooled[layer], ref, atol=1e-5), layer
        if layer == L - 1:  # the old code's hidden_states[L] is in normalised coordinates
            assert not torch.allclose(ref, hf, atol=1e-3)
        else:
            assert torch.allclose(ref, hf, atol=1e-5)


def test_probe_records_pre_norm_output_tiny():
    from vlaforget.models.tiny import random_tiny_backend

    check_last_layer_is_pre_norm(random_tiny_backend(seed=0), _samples())


def test_thermostat_measures_in_the_probe_space():
    """The Thermostat's pooled states at the reps equal the probe stage's (same space): a student
    equal to the teacher gives the teacher's pooled states for the last layer."""
    from types import SimpleNamespace

    from vlaforget.models.features import pooled_states
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.settings import ThermostatSettings
    from vlaforget.train.plugins import ThermostatPlugin

    be = random_tiny_backend(seed=0)
    samples = _samples(4)
    L = be.num_layers
    icsm = SimpleNamespace(rep_layers=[L - 3, L - 1])
    ctx = SimpleNamespace(
        backend=be,
        model=be.model,
        autocast=lambda: torch.autocast("cpu", enabled=False),
        stage_cfg={"train": {"batch_size": 2}},
        plugins={},
    )
    th = ThermostatPlugin.__new__(ThermostatPlugin)
    th.ctx, th.icsm, th.samples, th.cfg = ctx, icsm, samples, ThermostatSettings.of({})  # the defaults
    got = th.pooled(list(range(4)))
    ref, _ = pooled_states(be, samples, batch_size=4, layers=[L - 3, L - 1])
    for rep in icsm.rep_layers:
        assert torch.allclose(got[rep], ref[rep], atol=1e-5)


# OpenVLA's real modelling code on a tiny random checkpoint (skips with its reason without it)
from test_openvla_backend import REASON as OPENVLA_REASON
from test_openvla_backend import backend as openvla_backend  # noqa: F401  (fixture)
from test_openvla_backend import ckpt  # noqa: F401  (fixture)


@pytest.mark.skipif(OPENVLA_REASON is not None, reason=str(OPENVLA_REASON))
def test_probe_records_pre_norm_output_openvla(openvla_backend):  # noqa: F811
    check_last_layer_is_pre_norm(openvla_backend, _samples(3, size=96, action_dim=7))
