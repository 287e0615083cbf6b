"""Stage `forgetting`: how much general skill and representation a run lost relative to the teacher.

    vlaforget forgetting --config {root}/configs/forgetting/{run}.yaml

Measured here (upstream-task success retention comes from the `eval` stage on the upstream suites):

* general skill — visual-question accuracy, answers from `backend.answer` (greedy) compared with
  metrics.answer_match. Questions: the tiny world's `data.vqa.vqa_samples` on the held-out split of
  each upstream cache (`vqa_datasets`); OpenVLA: a user file `vqa_jsonl` (format below). Also the
  teacher's accuracy on the same questions and the retention ratio student / teacher.
* multiple-choice general skill (eval/vqa_mc.py, the same code path for every question set) —
  questions that carry `candidates` (the tiny world's, the LIBERO-simulator set of data/libero_vqa.py,
  a user's MC JSONL) are also scored by the log-likelihood of each candidate answer, so a VLA whose
  free generation was trained away is still measured: `vqa_mc` = {accuracy, accuracy_teacher,
  retention, kl (candidate distributions), chance, n, by_category}.
* downstream-scene multiple choice (`vqa_mc_downstream`, same keys as `vqa_mc`) — the tiny world's
  questions on the held-out frames of `eval.forgetting.downstream_vqa_suites` (the scenes the
  fine-tuning trains on: e.g. "is the window open?"), scored apart so `vqa_mc` stays the
  upstream-scene set; null when none is configured.
* vqa_kl — mean KL(teacher ‖ student) of the next-token distributions at the answer positions of
  those questions (teacher-forced on the gold answer; full vocabulary).
* drift and CKA — the first `drift_samples` probe samples (non-empty instruction masks): the
  student's instruction-pooled hidden states at each ICSM representative layer against the
  teacher's (from probe.pt). Per layer: covariance drift raw / normalised / in the ICSM basis
  (metrics.drift_metrics) and linear CKA of the pooled features. `drift_mean` = mean normalised drift
  over those layers (`drift_means` has all three), `cka_mean` = mean CKA.
* drift and CKA at the layer CRaFT constrains (`craft_layer` = craft.layer, a hidden_states index,
  default −2 → decoder layer L−2; `craft_decoder_layer`), on the same probe samples (held-out data:
  `probe_source`), so CRaFT is graded on more than its own training objective: in the same
  residual-stream space, against the teacher's states from a teacher forward in this stage.
  `drift_craft_layer` / `cka_craft_layer` = normalised drift / CKA of the instruction-pooled states
  (the representative layers' pooling); `drift_craft_layer_image` / `cka_craft_layer_image` = the same
  on the image-token mean (CRaFT's default anchor pooling); `craft_layer` = {craft_layer,
  decoder_layer, by_pooling: {pooling: {drift: {raw, normalized, basis}, cka}}}.

The teacher and the student are loaded one after the other (never both in memory): the teacher's
answers and answer-position log-probs are kept on the CPU. For run `teacher` the student is the
teacher (KL 0, drift ≈ 0, CKA ≈ 1: a check of the pipeline's determinism).

`vqa_jsonl` format: the multiple-choice format of eval/vqa_mc.py (lines with "candidates" and
"category"; validated, refused with the line number), or the older free-answer format: one JSON object
per line, {"image": PATH, "question": TEXT, "answer": TEXT} with optional "kind" (accuracy is also reported per kind); PATH is absolute or relative to the JSONL's
folder; any RGB image PIL reads. Answers should be short (a word or two: exact match after
lower-casing and removing punctuation and articles).

Output `out_file` (completion file, written last): {run, vqa_accuracy, vqa_accuracy_teacher,
vqa_retention, vqa_by_kind, vqa_kl, n_vqa, vqa_mc, vqa_mc_accuracy, vqa_mc_retention, vqa_mc_kl,
vqa_mc_downstream, vqa_mc_downstream_accuracy, vqa_mc_downstream_retention, vqa_mc_downstream_kl, drift: {layer: {raw, normalized, basis}}, cka: {layer: v},
drift_mean, drift_means, cka_mean, drift_craft_layer, cka_craft_layer, drift_craft_layer_image,
cka_craft_layer_image, craft_layer, n_drift, layers, probe_hash, probe_source, timing, provenance}.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..io import progress
from . import metrics as M

log = logging.getLogger("vlaforget.forgetting")

DEFAULT_VQA_N = 256


# ----------------------------------------------------------------------------- inputs


def read_vqa_jsonl(path: str | Path, limit: int | None = None, image_size: int | None = 224) -> list[dict]:
    """The user's VQA set: [{image uint8 [S,S,3], question, answer, kind}] (format: module doc).

    Images are resized to image_size × image_size (bicubic; OpenVLA's processor resizes to 224 the
    same way, without keeping the aspect ratio); None keeps them as they are."""
    from .vqa_mc import read_vqa_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.forgetting.vqa_jsonl = {path} does not exist: give a JSONL of "
            '{"image", "question", "answer"} lines (docs/evaluation.md) or set it to null'
        )
    out = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image = str(rec["image"])
            q, a = str(rec["question"]), str(rec["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{ln}: expected a JSON object with image, question, answer ({e})") from e
        _, img = read_vqa_image(image, path, f"{path}:{ln}", image_size)
        out.append({"image": img, "question": q, "answer": a, "kind": str(rec.get("kind", "all"))})
        if limit and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def read_vqa_file(path: str | Path, limit=None, image_size=224, categories=()) -> list[dict]:
    """A multiple-choice JSONL (first line has "candidates": eval/vqa_mc.py) or a free-answer one."""
    from .vqa_mc import read_mc_jsonl

    p = Path(path)
    if p.is_file():
        first = next((ln for ln in p.read_text().splitlines() if ln.strip()), "")
        try:
            mc = "candidates" in json.loads(first)
        except (json.JSONDecodeError, TypeError):
            mc = False
        if mc:
            return read_mc_jsonl(p, limit, image_size, categories)
    return read_vqa_jsonl(p, limit, image_size)


def vqa_from_caches(blocks: Sequence[dict], n: int, seed: int = 0, camera: str = "corner3") -> list[dict]:
    """Visual questions on the held-out split of each upstream cache (tiny world)."""
    from ..data.cache import CachedDataset
    from ..data.vqa import vqa_samples

    out = []
    for b in blocks:
        cache_dir = Path(b["cache_dir"])
        if not (cache_dir / "manifest.json").exists():
            raise FileNotFoundError(
                f"dataset cache {cache_dir} missing: run the cache stage for '{b.get('name')}'"
            )
        ds = CachedDataset(cache_dir, split="heldout")
        for s in vqa_samples(ds, n, seed, camera=camera):
            out.append({**s, "kind": s.get("kind", "all"), "dataset": b.get("name")})
    return out


def probe_samples(probe: dict, n: int) -> tuple[list[dict], torch.Tensor]:
    """The first n probe samples with a non-empty instruction mask, and their row indices in probe.pt."""
    from ..data.probe import open_dataset

    ds = open_dataset(probe["dataset"], probe.get("split", "train"))
    empty = probe.get("empty")
    rows = [i for i in range(len(probe["indices"])) if empty is None or not bool(empty[i])][:n]
    return [ds[int(probe["indices"][i])] for i in rows], torch.as_tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------- model passes


@torch.no_grad()
def answer_logprobs(backend, samples: Sequence[dict], batch_size: int) -> torch.Tensor:
    """[P, V] float32 CPU log-probs at every answer position (teacher-forced) of all samples."""
    out = []
    for s0 in range(0, len(samples), batch_size):
        batch = backend.collate_vqa(list(samples[s0 : s0 + batch_size]))
        logits = backend.forward(batch).logits
        sel = logits[batch["answer_mask"]].float()
        out.append(torch.log_softmax(sel, dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def answers(backend, samples: Sequence[dict], batch_size: int) -> list[str]:
    out: list[str] = []
    for s0 in progress(range(0, len(samples), batch_size), desc="vqa"):
        chunk = samples[s0 : s0 + batch_size]
        out += backend.answer(np.stack([s["image"] for s in chunk]), [s["question"] for s in chunk])
    return out


def vqa_pass(backend, samples: Sequence[dict], batch_size: int) -> dict:
    if not samples:
        return {"answers": [], "logprobs": torch.zeros(0, 0)}
    return {
        "answers": answers(backend, samples, batch_size),
        "logprobs": answer_logprobs(backend, samples, batch_size),
    }


def representation_metrics(teacher_pooled: dict, student_pooled: dict, icsm) -> dict:
    """Per rep layer drift {raw, normalized, basis} and CKA; pooled: {layer: [N, D]}."""
    drift, cka = {}, {}
    for layer in sorted(student_pooled):
        T, S = teacher_pooled[layer].double(), student_pooled[layer].double()
        basis = icsm.layers[layer].U if icsm is not None and layer in icsm.layers else None
        drift[int(layer)] = M.feature_drift(S, T, basis)
        cka[int(layer)] = M.linear_cka(T, S)
    return {"drift": drift, "cka": cka}


def craft_decoder_layer(craft_layer: int, num_layers: int) -> int:
    """The decoder layer whose output is CRaFT's constrained state: `craft.layer` is a hidden_states
    index (methods/craft.py; −2 = hidden_states[L−1] = output of decoder layer L−2). Measured here in
    the residual stream at that layer's output, before any final norm (models.features.layer_outputs), the
    space of the representative-layer drift; for craft.layer = L / −1 that is decoder layer L−1 before
    the final norm HF applies to hidden_states[L]."""
    L = int(num_layers)
    layer = int(craft_layer)
    if not -(L + 1) <= layer <= L:
        raise ValueError(
            f"craft.layer = {layer} is not a hidden_states index of a {L}-layer model (valid: {-(L + 1)}..{L})"
        )
    a = layer % (L + 1)
    if a == 0:
        raise ValueError(
            f"craft.layer = {layer} is the embedding output (hidden_states[0]), not a decoder layer: "
            "the forgetting stage measures drift at decoder-layer outputs; set craft.layer to 1..L or −L..−1"
        )
    return a - 1


CRAFT_POOLINGS = ("mean_instruction_tokens", "mean_image_tokens")


@torch.no_grad()
def craft_layer_states(backend, samples: Sequence[dict], batch_size: int, decoder_layer: int) -> dict:
    """{pooling: [N, D] float32 CPU} of decoder layer `decoder_layer`'s output for `samples`, pooled
    over the instruction tokens (the representative layers' pooling) and over the image tokens (the
    CRaFT anchors' default pooling, methods.craft.pool_features)."""
    from ..methods.craft import pool_features
    from ..models.features import layer_outputs

    acc: dict[str, list[torch.Tensor]] = {p: [] for p in CRAFT_POOLINGS}
    layers = backend.decoder_layers()
    for s0 in range(0, len(samples), batch_size):
        batch = backend.collate(list(samples[s0 : s0 + batch_size]), train=False)
        with layer_outputs(layers, [decoder_layer]) as hs:
            backend.forward(batch)
        if decoder_layer not in hs:
            raise RuntimeError(f"decoder layer {decoder_layer} did not run in the forward pass")
        for p in CRAFT_POOLINGS:
            acc[p].append(pool_features(hs[decoder_layer], batch, p, int(backend.n_image_tokens)).cpu())
    return {p: torch.cat(v) for p, v in acc.items()}


def craft_layer_metrics(teacher_feats: dict, student_feats: dict, basis=None) -> dict:
    """{pooling: {drift: {raw, normalized, basis}, cka}} at the CRaFT layer."""
    out = {}
    for p in CRAFT_POOLINGS:
        T, S = teacher_feats[p].double(), student_feats[p].double()
        out[p] = {"drift": M.feature_drift(S, T, basis), "cka": M.linear_cka(T, S)}
    return out


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _free(backend) -> None:
    del backend
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- stage
