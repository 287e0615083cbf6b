"""Issue 16: fp16 loss scaling for every method (CRaFT's two backward passes), CRaFT's own anchor
batch size, the DataLoader batch path (same batches, exact resume), hidden states of only the
layers a plug-in needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_fixtures import CRAFT_TEST, base_stage, clone, run_adapter, run_metrics, teacher_world

from vlaforget.train.loop import StepSampler, run_training

CRAFT = CRAFT_TEST


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return teacher_world(tmp_path_factory, "speed")


metrics, adapter = run_metrics, run_adapter


def fresh(sc, name):
    return clone(sc, out_dir=str(Path(sc["out_dir"]).parent / name), run_id=f"{name}-id")


def backend_and_data(world):
    from vlaforget.data.cache import CachedDataset
    from vlaforget.models import load_backend

    _root, cache, model = world
    ds = CachedDataset(str(cache), split="train")
    b = load_backend({"backend": "tiny", "path": str(model), "dtype": "fp32"}, stats=ds.statistics)
    return b, ds


# ----------------------------------------------------------------------------- hidden states


def test_hidden_states_at_equals_output_hidden_states(world):
    b, ds = backend_and_data(world)
    batch = b.collate([ds[i] for i in range(3)])
    L = b.num_layers

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in b.model.modules())

    with torch.no_grad():
        full = b.forward(batch, output_hidden_states=True).hidden_states
        before = n_hooks()  # after transformers' own (installed lazily at the first forward)
        for i in [0, 1, L - 1, L, -1, -2]:  # embeddings, a middle layer, the last layer, the final norm
            got = b.hidden_states_at(batch, [i])
            assert torch.equal(got[i], full[i]), i
        both = b.hidden_states_at(batch, [L - 2, L])
        assert torch.equal(both[L - 2], full[L - 2]) and torch.equal(both[L], full[L])
    # with grad: the same gradient as through the full forward's states
    p = next(q for q in b.model.parameters() if q.ndim == 2)
    g_full = torch.autograd.grad(
        b.forward(batch, output_hidden_states=True).hidden_states[-2].square().sum(), p
    )[0]
    g_sel = torch.autograd.grad(b.hidden_states_at(batch, [-2])[-2].square().sum(), p)[0]
    assert torch.allclose(g_full, g_sel, rtol=1e-5, atol=1e-7)
    assert n_hooks() == before  # its hooks are removed


# ----------------------------------------------------------------------------- fp16 / loss scaling


def test_craft_loss_scaling_is_exact_in_fp32(world):
    """The scaled path (both backward passes scaled by 2^12, unscaled before the combination) gives
    the same update as no scaling: power-of-two scales are exact in fp32."""
    root, cache, model = world
    a = fresh(base_stage(root, cache, model, method_name="craft", method={"craft": CRAFT}), "ls_off")
    b = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="craft",
            method={"craft": CRAFT},
            loss_scaling=True,
            loss_scale_init=4096.0,
        ),
        "ls_on",
    )
    run_training(a)
    run_training(b)
    ma, mb = metrics(a), metrics(b)
    assert mb[-1]["loss_scale"] == 4096.0 and mb[-1]["overflow_steps"] == 0
    assert [r["L_ret"] for r in ma] == pytest.approx([r["L_ret"] for r in mb], rel=1e-6)
    assert [r["lambda_after"] for r in ma] == pytest.approx([r["lambda_after"] for r in mb], rel=1e-6)
    pa, pb = adapter(a), adapter(b)
    assert all(torch.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-7) for k in pa)


def test_craft_fp16_trains_skips_overflow_steps_and_counts_them(world):
    """precision fp16 (CPU autocast in float16) for CRaFT: a too-high initial scale overflows, those
    steps are skipped with the scale halved each time, counted, and training then proceeds."""
    root, cache, model = world
    sc = fresh(
        base_stage(
            root,
            cache,
            model,
            method_name="craft",
            method={"craft": CRAFT},
            precision="fp16",
            loss_scale_init=2.0**40,
            max_steps=4,
        ),
        "fp16",
    )
    res = run_training(sc)
    m = metrics(sc)
    assert res["steps"] == 4
    assert m[-1]["overflow_steps"] > 0 and res["skipped_steps"] == m[-1]["overflow_steps"]
    assert (
        m[-1]["loss_scale"] <= 2.0**40 / 2 ** m[-1]["overflow_steps"] * 2
    )  # halved per overflow (+1 growth)
    assert all(k in m[-1] for k in ("L_ret", "lambda_after", "grad_cos"))
    assert m[-1]["lambda_after"] > 0
    assert all(torch.isfinite(t).all() for t in adapter(sc).values())


def test_fp16_baseline_runs_on_cpu(world):
    root, cache, model = world
    sc = fresh(base_stage(root, cache, model, precision="fp16", max_steps=3), "fp16_base")
    res = run_training(sc)
    assert res["steps"] == 3 and "loss_scale" in metrics(sc)[-1]


# ----------------------------------------------------------------------------- CRaFT anchor batch


def test_craft_anchor_batch_size_is_its_own_key(world, monkeypatch):
    import vlaforget.methods.craft as craft_mod

    sizes = []
    orig = craft_mod.pool_features

    def spy(h, batch, pooling, n):
        out = orig(h, batch, pooling, n)
        sizes.append(out.shape[0])
        return out

    monkeypatch.setattr(craft_mod, "pool_features", spy)
    root, cache, model = world
    for bsz in (2, 4):
        sizes.clear()
        sc = fresh(
            base_stage(
                root,
                cache,
                model,
                method_name="craft",
                batch_size=bsz,
                max_steps=3,
                method={"craft": dict(CRAFT, anchor_batch_size=5)},
            ),
            f"anchor{bsz}",
        )
        run_training(sc)
        assert sizes == [5, 5, 5], (bsz, sizes)  # one retention batch of 5 per step, whatever the micro-batch
    sizes.clear()
    sc = fresh(
        base_stage(
            root, cache, model, method_name="craft", batch_size=3, max_steps=2, method={"craft": CRAFT}
        ),
        "anchor_default",
    )
    run_training(sc)
    assert sizes == [3, 3]  # unset: falls back to the micro-batch (the old behaviour)


# ----------------------------------------------------------------------------- DataLoader path


def _stream(source, n):
    return [source.next() for _ in range(n)]


def _same(a, b):
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("image_aug", [False, True])
def test_workers_give_the_same_batches_and_resume_exactly(world, image_aug):
    from vlaforget.train.batches import BatchSource

    b, ds = backend_and_data(world)
    s0 = StepSampler(len(ds), seed=3)
    ref = _stream(BatchSource(ds, b, s0, 5, seed=3, image_aug=image_aug, num_workers=0), 9)  # > 1 epoch
    s2 = StepSampler(len(ds), seed=3)
    src = BatchSource(ds, b, s2, 5, seed=3, image_aug=image_aug, num_workers=2)
    got = _stream(src, 4)
    state = s2.state_dict()
    src.close()
    assert _same(ref[:4], got)
    s3 = StepSampler(len(ds), seed=3)
    s3.load_state_dict(state)
    src = BatchSource(ds, b, s3, 5, seed=3, image_aug=image_aug, num_workers=2)
    assert _same(ref[4:], _stream(src, 5))  # resumed at batch 4: the same batches as without the stop
    src.close()
    if not image_aug:  # the same batches as the loop built before the DataLoader (collate in-process)
        old = StepSampler(len(ds), seed=3)
        assert _same(ref, [b.collate([ds[i] for i in old.take(5)]) for _ in range(9)])
    else:  # augmentation really differs between micro-batches
        assert not torch.equal(ref[0]["pixel_values"], ref[1]["pixel_values"])


def test_training_with_workers_matches_in_process_and_resumes_exactly(world):
    root, cache, model = world
    a = fresh(base_stage(root, cache, model, image_aug=True, num_workers=0), "dl_a")
    b = fresh(base_stage(root, cache, model, image_aug=True, num_workers=2), "dl_b")
    run_training(a)
    assert run_training(b, stop_after=4) == {"stopped_at": 4}
    run_training(b)
    pa, pb = adapter(a), adapter(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# ----------------------------------------------------------------------------- CRaFT vectorised math


def _conflict_reference(ga_list, gr_list, projection=True):
    """The per-tensor loop conflict_project used before it was vectorised."""
    dot = na2 = nr2 = 0.0
    per = []
    for a, r in zip(ga_list, gr_list):
        if a is not None:
            na2 += float(a.double().square().sum())
        if r is not None:
            nr2 += float(r.double().square().sum())
        if a is not None and r is not None:
            d = float((a.double() * r.double()).sum())
            per.append(d)
            dot += d
    proj = projection and dot < 0 and nr2 > 0
    out = []
    for a, r in zip(ga_list, gr_list):
        if not proj or r is None:
            out.append(a)
        elif a is None:
            out.append(-dot / nr2 * r.double())
        else:
            out.append(a.double() - dot / nr2 * r.double())
    return out, {
        "grad_dot": dot,
        "conflict_ratio": sum(d < 0 for d in per) / max(1, len(per)),
        "projection": proj,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectorised_conflict_project_and_combine_match_the_per_tensor_loop(dtype):
    from vlaforget.methods.craft import combine, conflict_project

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (7,), (2, 5), (3, 3), (6,)]
    ga = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    gr = [(-0.8 * a.float() + 0.3 * torch.randn(a.shape, generator=g)).to(dtype) for a in ga]  # conflicting
    ga[3], gr[4] = None, None  # tensors with one side only
    out, st = conflict_project(ga, gr)
    ref, rst = _conflict_reference(ga, gr)
    assert st["projection"] and rst["projection"]
    assert st["grad_dot"] == pytest.approx(rst["grad_dot"], rel=1e-4)
    assert st["conflict_ratio"] == rst["conflict_ratio"]
    for o, r, a in zip(out, ref, ga):
        if r is None:
            assert o is None
        else:
            assert o.dtype == (a.dtype if a is not None else dtype)
            assert torch.allclose(
                o.double(), r.double(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5
            )
    comb = combine(out, gr, 0.5)
    for c, o, r in zip(comb, out, gr):
        want = o if r is None else (0.5 * r if o is None else o + 0.5 * r.to(o.dtype))
        assert (c is None and want is None) or torch.equal(c, want)


# ----------------------------------------------------------------------------- speed keys


def test_fused_optimizer_key_gives_the_same_update(world):
    """train.fused_optimizer: AdamW's fused kernel; the adapter equals the default's up to rounding."""
    root, cache, model = world
    a = fresh(base_stage(root, cache, model, max_steps=3), "fopt_a")
    b = fresh(base_stage(root, cache, model, max_steps=3, fused_optimizer=True), "fopt_b")
    run_training(a)
    run_training(b)
    pa, pb = adapter(a), adapter(b)
    assert pa.keys() == pb.keys() and all(torch.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-7) for k in pa)


def test_compile_key_compiles_each_decoder_layer(world, monkeypatch):
    """train.compile: every decoder layer is compiled (eager backend on the CPU: dynamo traces, no
    code generation) and training gives the uncompiled run's adapter."""
    from vlaforget.train import speed

    assert speed.compile_backend(False) is None and speed.compile_backend(True) == "inductor"
    assert speed.compile_backend("eager") == "eager"
    with pytest.raises(ValueError, match="train.compile"):
        speed.compile_backend(3)
    counted = []
    real = speed.compile_layers
    monkeypatch.setattr(
        "vlaforget.train.loop.compile_layers", lambda b, m, v: counted.append(real(b, m, v)) or counted[-1]
    )
    root, cache, model = world
    a = fresh(base_stage(root, cache, model, max_steps=2), "comp_a")
    b = fresh(base_stage(root, cache, model, max_steps=2, compile="eager"), "comp_b")
    run_training(a)
    run_training(b)
    assert counted == [0, 8]  # the tiny test model's 8 decoder layers
    pa, pb = adapter(a), adapter(b)
    assert all(torch.allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6) for k in pa)


def test_compile_with_hsw_flow_down_on_openvla_is_refused_before_loading(world):
    """train.compile + HSW's flow-down hooks + gradient checkpointing on OpenVLA stopped at step 6 on
    an H100 (CheckpointError, issue 28 run 4): refused from the config, naming the fix,
    before any model is loaded (the config names an OpenVLA path that does not exist); the baseline and
    HSW's own_params mode, or compile off, are not refused."""
    from vlaforget.errors import TrainingError
    from vlaforget.settings import MethodSettings, TrainSettings
    from vlaforget.train.speed import check_compile

    root, cache, model = world
    hsw = {"hsw": {"enabled": True, "beta": 0.5, "gamma": 0.3}}
    sc = fresh(
        base_stage(
            root, cache, model, method_name="hsw", method=hsw, gradient_checkpointing=True, compile=True
        ),
        "comp_hsw",
    )
    sc["model"] = dict(sc["model"], backend="openvla", path=str(root / "no-openvla-here"))
    with pytest.raises(TrainingError, match=r"train.compile: false"):
        run_training(sc)
    out = Path(sc["out_dir"])  # nothing of a run was written (a finished run has final/done.json)
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()
    ts = TrainSettings.of(sc["train"])
    check_compile(ts, MethodSettings.of({}), "openvla")  # the baseline
    check_compile(ts, MethodSettings.of({"hsw": dict(hsw["hsw"], mode="own_params")}), "openvla")
    check_compile(ts, MethodSettings.of(hsw), "tiny")  # passes on the tiny model (CPU, inductor and eager)
    check_compile(TrainSettings.of(dict(sc["train"], compile=False)), MethodSettings.of(hsw), "openvla")
    check_compile(
        TrainSettings.of(dict(sc["train"], gradient_checkpointing=False)), MethodSettings.of(hsw), "openvla"
    )


def test_lora_input_cast_off_is_bit_identical_under_autocast(world):
    """train.lora_input_cast false (bf16 autocast): peft's LoRA layers skip the fp32 upcast of their
    input; the adapter is the same to the bit (bf16 -> fp32 -> bf16 is exact)."""
    import peft

    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.train.loop import apply_lora
    from vlaforget.train.speed import skip_lora_input_cast

    lcfg = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn", "mlp"], "layers": "all"}
    m = apply_lora(random_tiny_backend(), lcfg, seed=0)
    assert skip_lora_input_cast(m, {"lora_input_cast": True, "precision": "bf16"}) == 0
    assert skip_lora_input_cast(m, {"lora_input_cast": False, "precision": "fp32"}) == 0  # no autocast: keep
    n = skip_lora_input_cast(m, {"lora_input_cast": False, "precision": "bf16"})
    if n == 0:
        pytest.skip(f"peft {peft.__version__} has no input-cast switch")
    assert n == 8 * 7 and all(not x.cast_input_dtype_enabled for x in m.modules() if hasattr(x, "lora_A"))
    root, cache, model = world
    a = fresh(base_stage(root, cache, model, max_steps=2, precision="bf16"), "cast_a")
    b = fresh(base_stage(root, cache, model, max_steps=2, precision="bf16", lora_input_cast=False), "cast_b")
    run_training(a)
    run_training(b)
    pa, pb = adapter(a), adapter(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [r["train_loss"] for r in metrics(a)] == [r["train_loss"] for r in metrics(b)]
