"""Forgetting formulas (eval/metrics.py) and the forgetting stage's pure pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlaforget.eval import metrics as M


def test_retention_ratio():
    assert M.retention_ratio(0.6, 0.8) == pytest.approx(0.75)
    assert M.retention_ratio(0.5, 0.0) is None


def test_continual_metrics_hand_example():
    # R[i, j]: score on task j after learning task i
    R = [[0.9, 0.1, 0.0],
         [0.6, 0.8, 0.2],
         [0.5, 0.7, 0.9]]
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
    hs = lambda A, B: torch.trace(A @ H @ B @ H)  # noqa: E731
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
    lines = [{"image": "imgs/a.png", "question": "what colour?", "answer": "grey", "kind": "color"},
             {"image": str(tmp_path / "imgs" / "a.png"), "question": "how many?", "answer": "1"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    qs = read_vqa_jsonl(tmp_path / "q.jsonl")
    assert len(qs) == 2 and qs[0]["image"].shape == (8, 8, 3) and qs[1]["kind"] == "all"
    (tmp_path / "bad.jsonl").write_text('{"image": "imgs/a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_vqa_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="vqa_jsonl"):
        read_vqa_jsonl(tmp_path / "none.jsonl")
