"""Multiple-choice VQA: reader validation (line numbers), VQAv2 converter, scorer, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlaforget.eval import vqa_mc as V


def _img(tmp_path, name="a.png"):
    from PIL import Image

    (tmp_path / "imgs").mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(tmp_path / "imgs" / name)
    return f"imgs/{name}"


def _line(img, **kw):
    rec = {
        "image": img,
        "question": "is the drawer open?",
        "answer": "yes",
        "candidates": ["yes", "no"],
        "category": "drawer",
    }
    rec.update(kw)
    return json.dumps(rec)


def test_reader_accepts_and_refuses_with_line_numbers(tmp_path):
    img = _img(tmp_path)
    good = tmp_path / "q.jsonl"
    good.write_text(_line(img) + "\n\n" + _line(img, answer="No", category="mine") + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:3: unknown category 'mine'"):
        V.read_mc_jsonl(good)
    qs = V.read_mc_jsonl(good, image_size=None, categories=["mine"])
    assert [q["line"] for q in qs] == [1, 3] and qs[0]["image"].shape == (8, 8, 3)
    assert qs[1]["category"] == qs[1]["kind"] == "mine"
    cases = {
        "missing image": (
            _line("imgs/gone.png"),
            FileNotFoundError,
            r"bad.jsonl:2: image .*gone.png not found",
        ),
        "answer not a candidate": (
            _line(img, answer="maybe"),
            ValueError,
            r"bad.jsonl:2: answer 'maybe' is not among",
        ),
        "unknown category": (
            _line(img, category="colour"),
            ValueError,
            r"bad.jsonl:2: unknown category 'colour'",
        ),
        "one candidate": (_line(img, candidates=["yes", "Yes"]), ValueError, r"bad.jsonl:2: candidates must"),
        "no candidates": (
            json.dumps({"image": img, "question": "q", "answer": "a", "category": "drawer"}),
            ValueError,
            r"bad.jsonl:2: missing key\(s\) candidates",
        ),
    }
    for line, exc, msg in cases.values():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(_line(img) + "\n" + line + "\n")
        with pytest.raises(exc, match=msg):
            V.read_mc_jsonl(bad)


def test_forgetting_reads_mc_or_free_answer_files(tmp_path):
    from vlaforget.eval.forgetting import read_vqa_file

    img = _img(tmp_path)
    (tmp_path / "mc.jsonl").write_text(_line(img, category="x") + "\n")
    with pytest.raises(ValueError, match="mc.jsonl:1: unknown category"):  # the MC reader validates
        read_vqa_file(tmp_path / "mc.jsonl")
    (tmp_path / "free.jsonl").write_text(json.dumps({"image": img, "question": "q?", "answer": "a"}) + "\n")
    assert "candidates" not in read_vqa_file(tmp_path / "free.jsonl")[0]


def test_convert_vqav2(tmp_path):
    qs = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": 1, "image_id": 7, "question": "Is it red?"},
            {"question_id": 2, "image_id": 7, "question": "How many cats?"},
            {"question_id": 3, "image_id": 8, "question": "What animal?"},
            {"question_id": 4, "image_id": 8, "question": "Unannotated?"},
        ],
    }
    ann = {
        "annotations": [
            {"question_id": 1, "multiple_choice_answer": "yes", "answer_type": "yes/no"},
            {"question_id": 2, "multiple_choice_answer": "2", "answer_type": "number"},
            {"question_id": 3, "multiple_choice_answer": "dog", "answer_type": "other"},
            {"question_id": 5, "multiple_choice_answer": "1", "answer_type": "number"},
            {"question_id": 6, "multiple_choice_answer": "cat", "answer_type": "other"},
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ann))
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in (7, 8):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / f"COCO_val2014_{i:012d}.jpg")
    n = V.convert_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img", tmp_path / "o.jsonl")
    assert n == 3
    rows = V.read_mc_jsonl(tmp_path / "o.jsonl", image_size=None)
    assert [r["category"] for r in rows] == ["yes/no", "number", "other"]
    assert rows[0]["candidates"] == ["yes", "no"] and set(rows[1]["candidates"]) == {"2", "1"}
    assert set(rows[2]["candidates"]) == {"dog", "cat"} and all(r["answer"] in r["candidates"] for r in rows)


def test_score_mc_equals_teacher_forced_answer_loglik():
    from vlaforget.models.tiny import random_tiny_backend

    be = random_tiny_backend(seed=0)
    rng = np.random.default_rng(0)
    size = be.model.config.image_size if hasattr(be.model.config, "image_size") else 16
    samples = [
        {
            "image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
            "question": q,
            "answer": "open",
            "candidates": ["open", "closed", "drawer"],
            "category": "gripper_state",
        }
        for q in ("is the gripper open or closed?", "what object is on the table?")
    ]
    lls = V.score_mc(be, samples, batch_size=4)  # 6 rows in 2 batches of different padding
    assert [ll.shape for ll in lls] == [(3,), (3,)]
    for s, ll in zip(samples, lls):
        for c, v in zip(s["candidates"], ll):
            b = be.collate_vqa([{**s, "answer": c}])
            with torch.no_grad():
                logits = be.forward(b).logits
            ntok = int((b["labels"][:, 1:] != -100).sum())
            assert v == pytest.approx(-float(be.lm_loss(b, logits)) * ntok, rel=1e-4, abs=1e-4)
    assert V.score_mc(be, samples, batch_size=1)[1] == pytest.approx(lls[1], abs=1e-4)  # batching-invariant


def test_mc_metrics_accuracy_retention_kl_and_undefined():
    s = [
        {"answer": "yes", "candidates": ["yes", "no"], "category": "a"},
        {"answer": "no", "candidates": ["yes", "no"], "category": "a"},
        {"answer": "left", "candidates": ["left", "right", "up", "down"], "category": "b"},
    ]
    teacher = [np.array([0.0, -2.0]), np.array([-3.0, 0.0]), np.array([-5.0, 0.0, -5, -5])]
    student = [np.array([0.0, -2.0]), np.array([0.0, -1.0]), np.array([0.0, -1.0, -5, -5])]
    m = V.mc_metrics(s, student, teacher)
    assert m["accuracy_teacher"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    assert m["by_category"]["a"]["accuracy"] == 0.5 and m["by_category"]["a"]["retention"] == 0.5
    assert m["by_category"]["b"]["accuracy_teacher"] == 0.0
    assert m["by_category"]["b"]["retention"] is None  # teacher 0: retention undefined, not 0 / NaN
    assert m["chance"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    pt = np.exp(teacher[1]) / np.exp(teacher[1]).sum()
    ps = np.exp(student[1]) / np.exp(student[1]).sum()
    kl1 = float((pt * np.log(pt / ps)).sum())
    assert m["by_category"]["a"]["kl"] == pytest.approx(kl1 / 2)
    assert V.mc_metrics(s, teacher, teacher)["kl"] == pytest.approx(0.0)


def test_trained_teacher_scores_above_chance_on_its_own_questions():
    """The embedded study's path: a tiny VLA trained on visual questions (answers only visible in the
    image) scores far above chance on held-out ones by candidate log-likelihood, while an untrained
    copy sits near chance; the same metrics as the forgetting stage."""
    from vlaforget.data.vqa import CANDIDATES
    from vlaforget.models.tiny import random_tiny_backend

    torch.manual_seed(0)
    be = random_tiny_backend(
        seed=0,
        corpus=["is the gripper open or closed?", "is the drawer open?", "open closed yes no left right"],
    )
    size = be.model.config.image_size if hasattr(be.model.config, "image_size") else 16
    rng = np.random.default_rng(0)

    def draw(n):
        out = []
        for _ in range(n):
            bright = bool(rng.integers(2))
            img = rng.integers(180, 256, (size, size, 3)) if bright else rng.integers(0, 76, (size, size, 3))
            if rng.integers(2):
                q, a, c = "is the gripper open or closed?", "open" if bright else "closed", "gripper_state"
            else:
                q, a, c = "is the drawer open?", "yes" if bright else "no", "drawer_open"
            out.append(
                {
                    "image": img.astype(np.uint8),
                    "question": q,
                    "answer": a,
                    "category": c,
                    "candidates": list(CANDIDATES[c]),
                }
            )
        return out

    train, held = draw(256), draw(64)
    before = V.score_mc(be, held, 32)
    opt = torch.optim.AdamW(be.model.parameters(), lr=3e-3)
    be.model.train()
    for _step in range(60):
        idx = rng.choice(len(train), 16, replace=False)
        b = be.collate_vqa([train[i] for i in idx])
        loss = be.lm_loss(b, be.forward(b).logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    be.model.eval()
    after = V.score_mc(be, held, 32)
    m = V.mc_metrics(held, after, after)
    assert m["chance"] == 0.5
    assert m["accuracy"] >= 0.9, m
    assert all(b["accuracy"] >= 0.85 for b in m["by_category"].values()), m
    untrained = V.mc_metrics(held, before, after)  # the untrained copy as "student" of the trained teacher
    assert untrained["accuracy"] < 0.8 and untrained["retention"] < 0.9 and untrained["kl"] > 0.05
