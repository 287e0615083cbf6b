"""Recipe `vlaforget forgetting`: forgetting metrics of a run against the teacher -- general-skill VQA
(accuracy, KL, multiple choice), representation drift and CKA at the ICSM layers and at CRaFT's layer
(eval/forgetting.py, eval/metrics.py); out_file last.
"""

from __future__ import annotations

import argparse
import time

from ..eval import metrics as M
from ..eval.forgetting import (
    DEFAULT_VQA_N,
    _free,
    _mean,
    craft_decoder_layer,
    craft_layer_metrics,
    craft_layer_states,
    log,
    probe_samples,
    read_vqa_file,
    representation_metrics,
    vqa_from_caches,
    vqa_pass,
)
from ..io import provenance, write_json
from ..settings import ForgettingSettings
from ..stagefile import load_stage_config


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="stage config (vlaforget stage-config forgetting RUN)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"forward batch (default {ForgettingSettings.batch_size})",
    )


def main(args) -> int:
    from ..data.probe import load_probe
    from ..gpus import pick_device
    from ..methods.icsm import load_icsm
    from ..models import load_backend
    from ..precision import exact_fp32

    sc = load_stage_config(args.config, "forgetting")
    fs = ForgettingSettings.of(sc)
    device = pick_device(args.device)
    exact_fp32(fs.model.get("dtype"))  # no TF32 for an fp32 model on CUDA (precision.py)
    bs = int(args.batch_size or fs.batch_size)
    t0 = time.perf_counter()
    probe = load_probe(fs.probe_dir)
    icsm = load_icsm(fs.icsm_dir)
    layers = icsm.reps
    samples, rows = probe_samples(probe, fs.drift_samples)
    if len(samples) < 2:
        raise ValueError(f"only {len(samples)} usable probe samples: drift and CKA need at least 2")
    teacher_pooled = {layer: probe["pooled"][layer][rows] for layer in layers}
    from ..data.probe import open_dataset

    stats = open_dataset(probe["dataset"], probe.get("split", "train")).statistics
    if fs.vqa_jsonl:
        vqa = read_vqa_file(fs.vqa_jsonl, fs.vqa_n, fs.vqa_image_size, fs.vqa_categories)
    elif fs.vqa_datasets:
        vqa = vqa_from_caches(
            list(fs.vqa_datasets), DEFAULT_VQA_N if fs.vqa_n is None else fs.vqa_n, fs.seed, fs.camera
        )
    else:
        vqa = []
        log.info("no VQA set configured (eval.forgetting.vqa_jsonl is null): general-skill accuracy skipped")
    # eval.forgetting.downstream_vqa_suites: questions on the scenes the fine-tuning trains on (the
    # window's state, issue 27.4), scored by multiple choice apart from the upstream-scene set
    down = (
        vqa_from_caches(
            list(fs.vqa_downstream_datasets),
            DEFAULT_VQA_N if fs.vqa_n is None else fs.vqa_n,
            fs.seed,
            fs.camera,
        )
        if fs.vqa_downstream_datasets
        else []
    )
    timing = {"inputs_s": round(time.perf_counter() - t0, 3)}

    from ..eval.vqa_mc import mc_metrics, score_mc

    mcq = [s for s in vqa if s.get("candidates")]
    adapter = fs.adapter_dir
    t = time.perf_counter()
    craft_layer = fs.craft_layer
    if adapter:
        teacher = load_backend(fs.model, device=device, adapter_dir=None, stats=stats)
        tv = vqa_pass(teacher, vqa, bs)
        t_mc = score_mc(teacher, mcq, bs)
        t_down = score_mc(teacher, down, bs)
        craft_dec = craft_decoder_layer(craft_layer, teacher.num_layers)
        t_craft = craft_layer_states(teacher, samples, bs, craft_dec)
        _free(teacher)
        teacher = None
    timing["teacher_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    from ..models.features import pooled_states

    student = load_backend(fs.model, device=device, adapter_dir=adapter, stats=stats)
    sv = vqa_pass(student, vqa, bs)
    s_mc = score_mc(student, mcq, bs)
    s_down = score_mc(student, down, bs)
    craft_dec = craft_decoder_layer(craft_layer, student.num_layers)
    s_craft = craft_layer_states(student, samples, bs, craft_dec)
    if not adapter:
        tv, t_mc, t_craft, t_down = sv, s_mc, s_craft, s_down
    student_pooled, _ = pooled_states(student, samples, bs, layers=layers)
    _free(student)
    student = None
    timing["student_s"] = round(time.perf_counter() - t, 3)

    golds = [s["answer"] for s in vqa]
    acc = M.vqa_accuracy(sv["answers"], golds) if vqa else None
    acc_t = M.vqa_accuracy(tv["answers"], golds) if vqa else None
    by_kind: dict[str, dict] = {}
    for s, p, pt in zip(vqa, sv["answers"], tv["answers"]):
        k = by_kind.setdefault(s["kind"], {"n": 0, "student": 0, "teacher": 0})
        k["n"] += 1
        k["student"] += M.answer_match(p, s["answer"])
        k["teacher"] += M.answer_match(pt, s["answer"])
    for k in by_kind.values():
        k["student"], k["teacher"] = k["student"] / k["n"], k["teacher"] / k["n"]
    kl = M.kl_teacher_student(tv["logprobs"], sv["logprobs"]) if vqa else None
    mc = mc_metrics(mcq, s_mc, t_mc)
    mc_down = mc_metrics(down, s_down, t_down) if down else None
    rep = representation_metrics(teacher_pooled, student_pooled, icsm)
    drift_means = {m: _mean(d[m] for d in rep["drift"].values()) for m in ("raw", "normalized", "basis")}
    craft_basis = icsm.layers[craft_dec].U if icsm is not None and craft_dec in icsm.layers else None
    cl = craft_layer_metrics(t_craft, s_craft, craft_basis)
    out = {
        "run": fs.run_name,
        "adapter_dir": adapter,
        "device": device,
        "vqa_accuracy": acc,
        "vqa_accuracy_teacher": acc_t,
        "vqa_retention": M.retention_ratio(acc, acc_t) if vqa else None,
        "vqa_by_kind": by_kind,
        "vqa_kl": kl,
        "n_vqa": len(vqa),
        "vqa_mc": mc,
        "vqa_mc_accuracy": mc["accuracy"],
        "vqa_mc_accuracy_teacher": mc["accuracy_teacher"],
        "vqa_mc_retention": mc["retention"],
        "vqa_mc_kl": mc["kl"],
        "vqa_source": "jsonl" if fs.vqa_jsonl else ("caches" if vqa else None),
        "vqa_mc_downstream": mc_down,
        "vqa_mc_downstream_accuracy": mc_down["accuracy"] if mc_down else None,
        "vqa_mc_downstream_accuracy_teacher": mc_down["accuracy_teacher"] if mc_down else None,
        "vqa_mc_downstream_retention": mc_down["retention"] if mc_down else None,
        "vqa_mc_downstream_kl": mc_down["kl"] if mc_down else None,
        "vqa_downstream_datasets": [b.get("name") for b in fs.vqa_downstream_datasets],
        "examples": [
            {"question": s["question"], "answer": s["answer"], "student": p, "teacher": pt}
            for s, p, pt in list(zip(vqa, sv["answers"], tv["answers"]))[:10]
        ],
        "drift": {str(k): v for k, v in rep["drift"].items()},
        "cka": {str(k): v for k, v in rep["cka"].items()},
        "drift_mean": drift_means["normalized"],
        "drift_means": drift_means,
        "cka_mean": _mean(rep["cka"].values()),
        "drift_craft_layer": cl["mean_instruction_tokens"]["drift"]["normalized"],
        "cka_craft_layer": cl["mean_instruction_tokens"]["cka"],
        "drift_craft_layer_image": cl["mean_image_tokens"]["drift"]["normalized"],
        "cka_craft_layer_image": cl["mean_image_tokens"]["cka"],
        "craft_layer": {
            "craft_layer": craft_layer,
            "decoder_layer": craft_dec,
            "space": "residual stream at the decoder layer's output, before any final norm",
            "teacher": "teacher forward in this stage (same samples)",
            "by_pooling": cl,
        },
        "n_drift": len(samples),
        "layers": layers,
        "probe_hash": probe.get("hash"),
        "probe_source": probe.get("source")
        or {"dataset": probe["dataset"].get("name"), "split": probe.get("split", "train")},
        "timing": timing,
        "provenance": {**provenance(), "stage_code": fs.code},
    }
    write_json(fs.out_file, out)  # the completion file, last
    log.info(
        "forgetting %s: vqa %.3f (teacher %.3f), kl %.4f, drift %.4f, cka %.4f, "
        "CRaFT layer %d: drift %.4f, cka %.4f",
        fs.run_name,
        acc if acc is not None else float("nan"),
        acc_t if acc_t is not None else float("nan"),
        kl if kl is not None else float("nan"),
        out["drift_mean"],
        out["cka_mean"],
        craft_dec,
        out["drift_craft_layer"],
        out["cka_craft_layer"],
    )
    return 0
