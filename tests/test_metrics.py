"""Forgetting formulas (eval/metrics.py) and the forgetting stage's pure pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaforget.eval import metrics as M


def test_retention_ratio():
    assert M.retention_ratio(0.6, 0.8) == pytest.approx(0.75)
    assert M.retention_ratio(0.5, 0.0) is None


def test_continual_metrics_hand_example():
    # R[i, j]: score on task j after learning task i
    R = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.9]]
    m = M.continual_metrics(R)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx([0.9 - 0.5, 0.8 - 0.7])
    assert M.continual_metrics([[0.4]]) == {"acc": 0.4, "bwt": 0.0, "forgetting": [], "mean_forgetting": 0.0}
    with pytest.raises(ValueError):
        M.continual_metrics([[1, 2, 3]])


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 16, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert M.linear_cka(X, X) == pytest.approx(1.0)
    assert M.linear_cka(X, 3.0 * X @ Q + 5.0) == pytest.approx(1.0, abs=1e-9)  # orthogonal, scale, shift
    Y = torch.randn(200, 16, generator=g)
    assert M.linear_cka(X, Y) < 0.3
    # matches the HSIC definition: tr(K_X H K_Y H) / sqrt(tr(K_X H K_X H) tr(K_Y H K_Y H))
    H = torch.eye(200, dtype=torch.float64) - 1.0 / 200
    Kx, Ky = X.double() @ X.double().T, Y.double() @ Y.double().T

    def hs(A, B):
        return torch.trace(A @ H @ B @ H)

    ref = hs(Kx, Ky) / torch.sqrt(hs(Kx, Kx) * hs(Ky, Ky))
    assert M.linear_cka(X, Y) == pytest.approx(float(ref), rel=1e-9)


def test_drift_metrics():
    C_T = torch.diag(torch.tensor([4.0, 1.0, 0.0]))
    C_S = torch.diag(torch.tensor([4.0, 1.0, 3.0]))  # change only outside the basis below
    U = torch.eye(3)[:, :2]
    d = M.drift_metrics(C_S, C_T, U)
    assert d["raw"] == pytest.approx(3.0)
    assert d["normalized"] == pytest.approx(3.0 / np.sqrt(17.0))
    assert d["basis"] == pytest.approx(0.0)
    assert M.drift_metrics(C_T, C_T)["basis"] is None


def test_feature_drift_is_float64_covariance_drift():
    """One covariance for training and eval (methods/icsm.py): float64 for the forgetting stage."""
    g = torch.Generator().manual_seed(0)
    S, T = torch.randn(50, 6, generator=g), torch.randn(50, 6, generator=g) * 2
    C = M.covariance(S, dtype=torch.float64)
    assert C.dtype == torch.float64 and torch.allclose(C, torch.cov(S.double().T), atol=1e-12)
    assert M.covariance(S).dtype == torch.float32
    U = torch.linalg.qr(torch.randn(6, 3, generator=g))[0]
    cs, ct = np.cov(S.double().numpy().T), np.cov(T.double().numpy().T)
    d = M.feature_drift(S, T, U)
    assert d["raw"] == pytest.approx(np.linalg.norm(cs - ct), rel=1e-12)
    assert d["normalized"] == pytest.approx(np.linalg.norm(cs - ct) / np.linalg.norm(ct), rel=1e-12)
    Ud = U.double().numpy()
    assert d["basis"] == pytest.approx(
        np.linalg.norm(Ud.T @ (cs - ct) @ Ud) / np.linalg.norm(Ud.T @ ct @ Ud), rel=1e-10
    )


def test_kl_and_answers():
    lt = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), -1)
    ls = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]]), -1)
    p = lt[0].exp()
    want = float((p * (lt[0] - ls[0])).sum()) / 2
    assert M.kl_teacher_student(lt, ls) == pytest.approx(want)
    assert M.kl_teacher_student(lt, lt) == pytest.approx(0.0)
    assert M.answer_match("The Red.", "red") and not M.answer_match("blue", "red")
    assert M.vqa_accuracy(["yes", "No", "3"], ["yes", "no", "2"]) == pytest.approx(2 / 3)


def test_representation_metrics_identity_and_change():
    from vlaforget.eval.forgetting import representation_metrics

    g = torch.Generator().manual_seed(1)
    T = {3: torch.randn(64, 8, generator=g)}
    same = representation_metrics(T, {3: T[3].clone()}, None)
    assert same["drift"][3]["raw"] == pytest.approx(0.0) and same["cka"][3] == pytest.approx(1.0)
    moved = representation_metrics(T, {3: T[3] + 0.5 * torch.randn(64, 8, generator=g)}, None)
    assert moved["drift"][3]["normalized"] > 0.05 and moved["cka"][3] < 1.0


def test_read_vqa_jsonl(tmp_path):
    from PIL import Image

    from vlaforget.eval.forgetting import read_vqa_jsonl

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "imgs" / "a.png")
    lines = [
        {"image": "imgs/a.png", "question": "what colour?", "answer": "grey", "kind": "color"},
        {"image": str(tmp_path / "imgs" / "a.png"), "question": "how many?", "answer": "1"},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    qs = read_vqa_jsonl(tmp_path / "q.jsonl", image_size=None)
    assert len(qs) == 2 and qs[0]["image"].shape == (8, 8, 3) and qs[1]["kind"] == "all"
    assert read_vqa_jsonl(tmp_path / "q.jsonl", limit=1)[0]["image"].shape == (224, 224, 3)
    (tmp_path / "bad.jsonl").write_text('{"image": "imgs/a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_vqa_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="vqa_jsonl"):
        read_vqa_jsonl(tmp_path / "none.jsonl")


class _FakeDS(list):
    """Stands in for CachedDataset: a list of samples with .statistics."""

    statistics = {  # noqa: RUF012
        "action": {
            "q01": [-1.0] * 4,
            "q99": [1.0] * 4,
            "mask": [True] * 3 + [False],
            "mean": [0.0] * 4,
            "std": [1.0] * 4,
            "min": [-1.0] * 4,
            "max": [1.0] * 4,
        }
    }


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["open the drawer", "press the button", "close the door", "push the puck"]
    return _FakeDS(
        {
            "image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
            "instruction": words[i % 4],
            "action": rng.uniform(-1, 1, 4).astype(np.float32),
            "state": np.zeros(4, np.float32),
        }
        for i in range(n)
    )


def test_forgetting_stage_teacher_and_adapter(tmp_root, monkeypatch):
    """Stage `forgetting` with a random-init tiny model: teacher run = no change; a random LoRA
    adapter = positive KL and drift, CKA < 1. Dataset, probe and ICSM inputs are small fakes."""
    import argparse
    from types import SimpleNamespace

    import yaml
    from peft import LoraConfig, get_peft_model

    from vlaforget.data import probe as P
    from vlaforget.eval import forgetting as FG
    from vlaforget.methods import icsm as I
    from vlaforget.models import features
    from vlaforget.models.tiny import random_tiny_backend
    from vlaforget.stages import forgetting as forgetting_stage

    b = random_tiny_backend({"image_size": 32}, action_dim=4, seed=0)
    model_dir = tmp_root / "models" / "tiny-vla"
    b.save(model_dir)
    ds = _samples(24)
    monkeypatch.setattr(P, "open_dataset", lambda block, split="train": ds)
    layers = [5, 7]
    b.set_stats(ds.statistics["action"])
    pooled, empty = features.pooled_states(b, list(ds), 8, layers=layers)
    probe_dir = tmp_root / "probe"
    probe_dir.mkdir(parents=True)
    torch.save(
        {"indices": torch.arange(24), "dataset": {"name": "fake"}, "pooled": pooled, "empty": empty},
        probe_dir / "probe.pt",
    )
    (probe_dir / "audit.json").write_text("{}")
    art = SimpleNamespace(
        reps=layers,
        layers={la: SimpleNamespace(U=torch.linalg.qr(I.covariance(pooled[la]))[0][:, :4]) for la in layers},
    )
    monkeypatch.setattr(I, "load_icsm", lambda d, map_location="cpu": art)
    qa = [
        {
            "image": s["image"],
            "question": "what is open",
            "answer": "drawer",
            "kind": "scene",
            "category": "scene",
            "candidates": ["drawer", "door", "button"],
        }
        for s in ds[:6]
    ]
    monkeypatch.setattr(forgetting_stage, "vqa_from_caches", lambda blocks, n, seed=0, camera="corner3": qa)

    cfg = peft_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=b.lora_targets(["attn", "mlp"]), init_lora_weights=False
    )
    adapter = tmp_root / "runs" / "r" / "final"
    get_peft_model(
        random_tiny_backend({"image_size": 32}, action_dim=4, seed=0).model, peft_cfg
    ).save_pretrained(adapter)
    del cfg

    outs = {}
    for run, ad in (("teacher", None), ("r", str(adapter))):
        sc = {
            "stage": "forgetting",
            "root": str(tmp_root),
            "allowed_root": str(tmp_root.parent),
            "run_name": run,
            "model": {"backend": "tiny", "path": str(model_dir), "dtype": "fp32"},
            "adapter_dir": ad,
            "probe_dir": str(probe_dir),
            "icsm_dir": "unused",
            "vqa_jsonl": None,
            "drift_samples": 20,
            "vqa_datasets": [{"name": "up", "cache_dir": "unused"}],
            "out_file": str(tmp_root / "evals" / run / "forgetting.json"),
        }
        path = tmp_root / f"{run}.yaml"
        path.write_text(yaml.safe_dump(sc))
        assert forgetting_stage.main(argparse.Namespace(config=str(path), device="cpu", batch_size=8)) == 0
        outs[run] = json.loads(Path(sc["out_file"]).read_text())
    t, r = outs["teacher"], outs["r"]
    assert t["n_vqa"] == 6 and t["n_drift"] == 20 and sorted(t["cka"]) == ["5", "7"]
    assert t["vqa_kl"] == 0.0 and t["drift_mean"] < 1e-5 and t["cka_mean"] > 0.9999
    assert t["vqa_accuracy"] == t["vqa_accuracy_teacher"]
    assert r["vqa_kl"] > 1e-4 and r["drift_mean"] > 1e-3 and r["cka_mean"] < t["cka_mean"]
    assert r["drift"]["7"]["basis"] is not None and r["vqa_accuracy_teacher"] == t["vqa_accuracy"]
    # multiple-choice scoring: the same questions, candidate log-likelihoods
    assert t["vqa_mc"]["n"] == 6 and t["vqa_mc_kl"] == pytest.approx(0.0, abs=1e-9)
    assert t["vqa_mc_accuracy"] == t["vqa_mc_accuracy_teacher"] and t["vqa_mc"]["chance"] == pytest.approx(
        1 / 3
    )
    assert r["vqa_mc_kl"] > 1e-6 and r["vqa_mc_accuracy_teacher"] == t["vqa_mc_accuracy"]
    assert set(r["vqa_mc"]["by_category"]) == {"scene"}
    # drift / CKA at the layer CRaFT constrains (craft.layer default −2 -> decoder layer L−2)
    L = b.num_layers
    for o in (t, r):
        assert o["craft_layer"]["craft_layer"] == -2 and o["craft_layer"]["decoder_layer"] == L - 2
        assert set(o["craft_layer"]["by_pooling"]) == {"mean_instruction_tokens", "mean_image_tokens"}
    assert t["drift_craft_layer"] == pytest.approx(0.0, abs=1e-9) and t["cka_craft_layer"] == pytest.approx(
        1.0
    )
    assert t["drift_craft_layer_image"] == pytest.approx(0.0, abs=1e-9)
    assert t["cka_craft_layer_image"] == pytest.approx(1.0)
    assert r["drift_craft_layer"] > 1e-3 and r["cka_craft_layer"] < 1 - 1e-6
    assert r["drift_craft_layer_image"] > 1e-3 and r["cka_craft_layer_image"] < 1 - 1e-6
    # instruction pooling at decoder layer L−2 is the probe's space: the teacher's own probe states
    # (probe.pt, computed by features.pooled_states) equal this stage's teacher forward there
    ref, _ = features.pooled_states(b, list(ds)[:20], 8, layers=[L - 2])
    s_t = FG.craft_layer_states(b, list(ds)[:20], 8, L - 2)
    assert torch.allclose(s_t["mean_instruction_tokens"], ref[L - 2], atol=1e-5)


def test_craft_layer_metrics_teacher_vs_itself_and_perturbed():
    """Two separate teacher forwards at the CRaFT layer: drift 0, CKA 1; a student whose decoder layer
    L−3 is perturbed: drift > 0, CKA < 1. craft.layer outside the model / at the embeddings is refused."""
    from vlaforget.eval import forgetting as FG
    from vlaforget.models.tiny import random_tiny_backend

    ds = _samples(16)
    t = random_tiny_backend({"image_size": 32}, action_dim=4, seed=0)
    s = random_tiny_backend({"image_size": 32}, action_dim=4, seed=0)
    L = t.num_layers
    dec = FG.craft_decoder_layer(-2, L)
    assert dec == L - 2 and FG.craft_decoder_layer(L, L) == L - 1 and FG.craft_decoder_layer(1, L) == 0
    for bad in (0, -(L + 1), L + 1):
        with pytest.raises(ValueError, match="craft.layer"):
            FG.craft_decoder_layer(bad, L)
    ft = FG.craft_layer_states(t, list(ds), 8, dec)
    same = FG.craft_layer_metrics(ft, FG.craft_layer_states(s, list(ds), 8, dec))
    for p in FG.CRAFT_POOLINGS:
        assert same[p]["drift"]["normalized"] == pytest.approx(0.0, abs=1e-6)
        assert same[p]["cka"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for prm in s.decoder_layers()[L - 3].parameters():
            prm.add_(0.5 * torch.randn(prm.shape, generator=g) * prm.std().clamp(min=1e-3))
    moved = FG.craft_layer_metrics(ft, FG.craft_layer_states(s, list(ds), 8, dec))
    for p in FG.CRAFT_POOLINGS:
        assert moved[p]["drift"]["normalized"] > 1e-3 and moved[p]["drift"]["raw"] > 0
        assert moved[p]["cka"] < 1 - 1e-4


def test_libero_lifelong_metrics_by_hand():
    from vlaforget.eval.metrics import libero_lifelong_metrics

    curves = [[0.0, 0.6, 0.8, 0.7], [0.2, 0.5], [0.1, 0.3, 0.9]]
    R = [[9, 9, 9], [0.4, 9, 9], [0.2, 0.5, 9]]  # diagonal / upper triangle are never read
    m = libero_lifelong_metrics(curves, R)
    # LIBERO (libero/lifelong/algos/base.py learn_one_task): the curve is clamped at its first peak
    # before averaging, task 1: [0, .6, .8, .7] -> [0, .6, .8, .8], FWT_1 = 2.2 / 4 (not 2.1 / 4)
    fwt = [0.55, 0.35, 1.3 / 3]
    assert m["fwt_k"] == pytest.approx(fwt) and m["fwt"] == pytest.approx(np.mean(fwt))
    # NBT_1 = ((0.8-0.4) + (0.8-0.2)) / 2 ; NBT_2 = 0.5 - 0.5
    assert m["nbt_k"] == pytest.approx([0.5, 0.0]) and m["nbt"] == pytest.approx(0.25)
    # AUC_1 = (0.55 + 0.4 + 0.2) / (3-1+1) ; AUC_2 = (0.35 + 0.5) / 2 ; AUC_3 = FWT_3
    assert m["auc_k"] == pytest.approx([1.15 / 3, 0.425, 1.3 / 3])
    # the first of equal peaks is kept: [.5, .2, .5, .1] -> [.5, .5, .5, .5]
    assert libero_lifelong_metrics([[0.5, 0.2, 0.5, 0.1]], [[0.0]])["fwt"] == pytest.approx(0.5)
    one = libero_lifelong_metrics([[0.3, 0.5, 0.4]], [[0.0]])  # clamped: [.3, .5, .5]
    assert (
        one["nbt"] is None and one["auc"] == pytest.approx(1.3 / 3) and one["fwt"] == pytest.approx(1.3 / 3)
    )
    with pytest.raises(ValueError, match="3 x 3"):
        libero_lifelong_metrics(curves, [[0]])
    perfect = libero_lifelong_metrics([[1.0]] * 3, np.ones((3, 3)))  # nothing forgotten
    assert perfect["nbt"] == 0.0 and perfect["auc"] == 1.0


def test_libero_lifelong_metrics_kept_checkpoint_replaces_the_peak_in_nbt():
    from vlaforget.eval.metrics import libero_lifelong_metrics

    # task 1 peaks at 0.8 mid-curve, but the checkpoint carried on scored 0.6 (the final one)
    curves, R = [[0.2, 0.8, 0.6], [0.1, 0.5]], [[0, 0], [0.3, 0]]
    peak = libero_lifelong_metrics(curves, R)
    kept = libero_lifelong_metrics(curves, R, kept=[0.6, 0.5])
    assert peak["nbt"] == pytest.approx(0.8 - 0.3) and kept["nbt"] == pytest.approx(0.6 - 0.3)
    assert kept["fwt"] == peak["fwt"] and kept["auc"] == peak["auc"]  # FWT / AUC do not use it
    with pytest.raises(ValueError, match="one value per task"):
        libero_lifelong_metrics(curves, R, kept=[0.6])


def test_forgetting_stage_config_carries_craft_layer(demo_config):
    """The forgetting stage measures at the layer the config's CRaFT constrains (craft.layer)."""
    import copy

    from vlaforget import stageconfig as vsc

    key = "mw_downstream__craft__full__s42"
    sc = vsc.stage_config(demo_config, "forgetting", key)
    assert sc["craft_layer"] == demo_config["craft"].get("layer", -2)
    cfg = copy.deepcopy(demo_config)
    cfg["craft"]["layer"] = 3
    assert vsc.stage_config(cfg, "forgetting", key)["craft_layer"] == 3
