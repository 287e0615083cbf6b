"""Multiple-choice visual questions: one reader, one scorer, for every question set.

A VLA fine-tuned on actions may no longer *generate* text, but it still assigns a likelihood to
each candidate answer. The scorer therefore teacher-forces every candidate (answer tokens + </s>,
backend.collate_vqa) and sums the token log-probs; the candidate with the highest sum is the model's
answer, and the softmax over the candidates' sums is its answer distribution.

Question sets, all scored by `score_mc`:
* the embedded study's Meta-World questions (data/vqa.py `vqa_samples`, candidates per kind);
* the LIBERO-simulator questions (data/libero_vqa.py, written as JSONL + images);
* a user's own JSONL (`read_mc_jsonl`), e.g. converted from VQAv2 (`convert_vqav2`).

JSONL format, one object per line:
  {"image": PATH, "question": TEXT, "answer": TEXT, "candidates": [TEXT, ...], "category": NAME}
PATH absolute or relative to the JSONL's folder (any RGB image PIL reads); candidates ≥ 2 distinct,
the answer among them; category one of KNOWN_CATEGORIES or of the extra names given (config
`eval.forgetting.vqa_categories`). Other keys are kept. A line breaking a rule is refused with its
line number (ValueError "FILE:LINE: ...").

Metrics (`mc_metrics`), overall and per category: accuracy of student and teacher, retention =
student / teacher accuracy (None — "retention undefined" — where the teacher scores 0), chance
(mean 1 / #candidates), and mean KL(teacher ‖ student) of the candidate distributions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import metrics as M

LIBERO_CATEGORIES = ("presence", "on_top", "left_right", "gripper", "drawer")
METAWORLD_CATEGORIES = (
    "scene",
    "drawer_open",
    "door_open",
    "window_open",
    "gripper_state",
    "gripper_side",
)
VQAV2_CATEGORIES = ("yes/no", "number", "other")
KNOWN_CATEGORIES = LIBERO_CATEGORIES + METAWORLD_CATEGORIES + VQAV2_CATEGORIES


def read_vqa_image(image: str, jsonl: Path, where: str, image_size: int | None) -> tuple[Path, np.ndarray]:
    """(path, uint8 [S, S, 3]) of a VQA record's image: relative paths are relative to the JSONL;
    resized to image_size × image_size (bicubic, as OpenVLA's processor; None keeps the size)."""
    from PIL import Image

    img_path = Path(image)
    if not img_path.is_absolute():
        img_path = jsonl.parent / img_path
    if not img_path.is_file():
        raise FileNotFoundError(f"{where}: image {img_path} not found")
    pil = Image.open(img_path).convert("RGB")
    if image_size:
        pil = pil.resize((int(image_size), int(image_size)), Image.BICUBIC)
    return img_path, np.asarray(pil, dtype=np.uint8)


def read_mc_jsonl(
    path: str | Path,
    limit: int | None = None,
    image_size: int | None = 224,
    categories: Iterable[str] = (),
) -> list[dict]:
    """Validated multiple-choice questions with images loaded (uint8 [S, S, 3]; None: as stored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"VQA JSONL {path} does not exist: give a file of "
            '{"image", "question", "answer", "candidates", "category"} lines (docs/evaluation.md)'
        )
    allowed = set(KNOWN_CATEGORIES) | set(categories)
    out = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{ln}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004 - bad input, not a bad call
        missing = [k for k in ("image", "question", "answer", "candidates", "category") if k not in rec]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        cands = rec["candidates"]
        if not isinstance(cands, list) or len({M.normalize_answer(c) for c in cands}) < 2:
            raise ValueError(
                f"{where}: candidates must be a list of at least 2 distinct answers, got {cands!r}"
            )
        cands = [str(c) for c in cands]
        ans = str(rec["answer"])
        if M.normalize_answer(ans) not in {M.normalize_answer(c) for c in cands}:
            raise ValueError(f"{where}: answer {ans!r} is not among its candidates {cands}")
        cat = str(rec["category"])
        if cat not in allowed:
            raise ValueError(
                f"{where}: unknown category {cat!r}; known: {', '.join(sorted(allowed))} "
                f"(add yours to eval.forgetting.vqa_categories)"
            )
        img_path, image = read_vqa_image(rec["image"], path, where, image_size)
        out.append(
            {
                **rec,
                "image": image,
                "image_path": str(img_path),
                "question": str(rec["question"]),
                "answer": ans,
                "candidates": cands,
                "category": cat,
                "kind": cat,
                "line": ln,
            }
        )
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def convert_vqav2(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    out_jsonl: str | Path,
    n_candidates: int = 4,
    limit: int | None = None,
    seed: int = 0,
    image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg",
) -> int:
    """VQAv2 (questions + annotations JSON) → our JSONL. Returns the number of lines written.

    answer = `multiple_choice_answer`, category = `answer_type` (yes/no, number, other); candidates:
    the answer plus the most frequent other answers of the same answer type (yes/no: yes, no)."""
    from ..io import atomic_write_text

    qs = json.loads(Path(questions_json).read_text())
    ann = json.loads(Path(annotations_json).read_text())
    subtype = qs.get("data_subtype") or ann.get("data_subtype") or ""
    by_id = {a["question_id"]: a for a in ann["annotations"]}
    freq: dict[str, Counter] = {}
    for a in ann["annotations"]:
        freq.setdefault(a["answer_type"], Counter())[a["multiple_choice_answer"]] += 1
    rng = np.random.default_rng(seed)
    lines = []
    for q in qs["questions"]:
        a = by_id.get(q["question_id"])
        if a is None:
            continue
        gold, typ = a["multiple_choice_answer"], a["answer_type"]
        if typ == "yes/no":
            cands = ["yes", "no"] if gold in ("yes", "no") else None
        else:
            others = [x for x, _ in freq[typ].most_common(n_candidates * 4) if x != gold][
                : max(n_candidates - 1, 1)
            ]
            cands = [gold, *others]
            rng.shuffle(cands)
        if not cands or len(set(cands)) < 2:
            continue
        img = Path(image_dir) / image_pattern.format(subtype=subtype, image_id=q["image_id"])
        lines.append(
            json.dumps(
                {
                    "image": str(img),
                    "question": q["question"],
                    "answer": gold,
                    "candidates": list(cands),
                    "category": typ,
                    "question_id": q["question_id"],
                }
            )
        )
        if limit and len(lines) >= limit:
            break
    atomic_write_text(Path(out_jsonl), "\n".join(lines) + "\n")
    return len(lines)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_mc(backend, samples: Sequence[dict], batch_size: int = 16) -> list[np.ndarray]:
    """Per question: float64 [C] summed log-likelihood of each candidate (answer tokens + </s>)."""
    rows = [(i, c) for i, s in enumerate(samples) for c in s["candidates"]]
    sums = np.zeros(len(rows))
    for r0 in range(0, len(rows), batch_size):
        chunk = rows[r0 : r0 + batch_size]
        batch = backend.collate_vqa(
            [
                {"image": samples[i]["image"], "question": samples[i]["question"], "answer": c}
                for i, c in chunk
            ]
        )
        logits = backend.forward(batch).logits
        n = logits.shape[1] - batch["labels"].shape[1]  # image tokens before the text
        lp = torch.log_softmax(logits[:, n:-1].float(), dim=-1)
        gt = batch["labels"][:, 1:]
        keep = gt != -100
        tok = lp.gather(-1, gt.clamp(min=0)[..., None])[..., 0] * keep
        sums[r0 : r0 + len(chunk)] = tok.sum(-1).double().cpu().numpy()
    out, k = [], 0
    for s in samples:
        c = len(s["candidates"])
        out.append(sums[k : k + c])
        k += c
    return out


def _dist(ll: np.ndarray) -> np.ndarray:
    z = ll - ll.max()
    p = np.exp(z)
    return p / p.sum()


def mc_correct(samples: Sequence[dict], lls: Sequence[np.ndarray]) -> list[bool]:
    return [M.answer_match(s["candidates"][int(np.argmax(ll))], s["answer"]) for s, ll in zip(samples, lls)]


def mc_metrics(samples: Sequence[dict], student: Sequence[np.ndarray], teacher: Sequence[np.ndarray]) -> dict:
    """{accuracy, accuracy_teacher, retention, kl, chance, n, by_category: {cat: same keys}}."""
    cs, ct = mc_correct(samples, student), mc_correct(samples, teacher)
    kls = []
    for ls, lt in zip(student, teacher):
        ps, pt = _dist(ls), _dist(lt)
        kls.append(
            float(np.sum(pt * (np.log(np.clip(pt, 1e-300, None)) - np.log(np.clip(ps, 1e-300, None)))))
        )
    chance = [1.0 / len(s["candidates"]) for s in samples]

    def block(idx: list[int]) -> dict:
        a = float(np.mean([cs[i] for i in idx]))
        at = float(np.mean([ct[i] for i in idx]))
        return {
            "n": len(idx),
            "accuracy": a,
            "accuracy_teacher": at,
            "retention": M.retention_ratio(a, at),
            "kl": float(np.mean([kls[i] for i in idx])),
            "chance": float(np.mean([chance[i] for i in idx])),
        }

    if not samples:
        return {
            "n": 0,
            "accuracy": None,
            "accuracy_teacher": None,
            "retention": None,
            "kl": None,
            "chance": None,
            "by_category": {},
        }
    cats: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        cats.setdefault(str(s.get("category", s.get("kind", "all"))), []).append(i)
    return {**block(list(range(len(samples)))), "by_category": {c: block(v) for c, v in sorted(cats.items())}}


# ----------------------------------------------------------------------------- CLI (vqa-convert)
