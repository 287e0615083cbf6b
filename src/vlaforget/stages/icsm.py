"""Recipe `vlaforget icsm`: teacher-only ICSM artifacts from the probe set -- per representative layer
the SVD basis, sensitivity scores and the fragile / plastic split, mu and C_T (methods/icsm.py);
meta.json last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from ..data.probe import load_probe, open_dataset
from ..methods.icsm import (
    EPSILON_RULE,
    MethodConfigError,
    compute_layer,
    layer_groups,
    log,
    representative_layers,
    spread_subset,
)
from ..models.features import load_teacher
from ..settings import IcsmStageSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="icsm stage config (vlaforget stage-config --stage icsm)")


def main(args) -> int:
    from ..io import atomic_torch_save, provenance, seed_everything, sha256_file, sha256_tensor, write_json
    from ..methods.figures import plot_icsm_spectrum
    from ..stagefile import load_stage_config

    sc = load_stage_config(args.config, "icsm")
    icfg = IcsmStageSettings.of(sc).icsm  # unknown keys / wrong types: a ConfigError before anything loads
    out = Path(sc["out_dir"])
    t_start = time.perf_counter()
    probe_dir = Path(sc["probe_dir"])
    probe = load_probe(probe_dir)
    seed_everything(int(probe.get("seed", 0)))
    ds = open_dataset(probe["dataset"], probe.get("split", "train"))
    backend = load_teacher(sensitivity_model_block(sc["model"], icfg.sensitivity_dtype), ds)
    L = int(backend.num_layers)
    groups = layer_groups(L, override=icfg.groups, layers=icfg.layers)
    reps = representative_layers(groups)
    missing = [r for r in reps if r not in probe["pooled"]]
    if missing:
        raise MethodConfigError(
            f"probe set {probe_dir} has no pooled states for layers {missing}: rerun the probe stage"
        )
    empty = (
        probe["empty"].bool() if "empty" in probe else torch.zeros(len(probe["indices"]), dtype=torch.bool)
    )
    keep = ~empty  # empty instruction masks: excluded from the SVD and the sensitivity samples
    # n_sens non-empty probes evenly spaced over the (sorted) probe set, so they cover every task
    sens_idx = spread_subset(probe["indices"][keep], icfg.sensitivity_samples)
    n_sens = int(sens_idx.numel())
    samples = [ds[int(i)] for i in sens_idx]
    out.mkdir(parents=True, exist_ok=True)
    layers_meta: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    timings: dict[str, float] = {}
    for rep in reps:
        X = probe["pooled"][rep].float()[keep]
        res = compute_layer(backend, X, samples, rep, icfg, show_progress=True)
        sp = res["split"]
        tensors = {
            f"U{rep}_f.pt": sp["U_f"],
            f"U{rep}_p.pt": sp["U_p"],
            f"mu{rep}.pt": res["mu"],
            f"C_T{rep}.pt": res["C_T"],
        }
        for name, t in tensors.items():
            atomic_torch_save(t.contiguous(), out / name)
            hashes[name] = sha256_tensor(t)
        basis = {
            "U": res["U"],
            "S": res["S"],
            "std": res["std"],
            "explained": res["explained"],
            "scores": res["scores"],
            "order": sp["order"],
        }
        atomic_torch_save(basis, out / f"basis{rep}.pt")
        hashes[f"basis{rep}.pt"] = sha256_file(out / f"basis{rep}.pt")
        plot_icsm_spectrum(
            out / f"spectrum{rep}.png",
            res["scores"],
            res["explained"],
            sp["order"],
            sp["n_f"],
            sp["n_p"],
            rep,
            floor=res["kl_noise_floor"],
        )
        top = sp["order"][: min(5, len(sp["order"]))].tolist()
        layers_meta[str(rep)] = {
            "D": int(X.shape[1]),
            "n_probe": int(X.shape[0]),
            "r": int(res["U"].shape[1]),
            "n_f": sp["n_f"],
            "n_p": sp["n_p"],
            "n_null": sp["n_null"],
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "explained_top_r": float(res["explained"].sum()),
            "kl_max": float(res["scores"].max()),
            "kl_median": float(res["scores"].median()),
            "kl_min": float(res["scores"].min()),
            "kl_noise_floor": res["kl_noise_floor"],
            "n_resolved": int((res["scores"] > 10 * res["kl_noise_floor"]).sum()),
            "top_fragile_variance_ranks": top,
            "spearman_kl_vs_variance_rank": spearman(
                res["scores"], -torch.arange(len(res["scores"])).float()
            ),
        }
        timings[f"sensitivity_L{rep}_s"] = round(res["t_sensitivity_s"], 3)
        n_res = layers_meta[str(rep)]["n_resolved"]
        if n_res < sp["n_f"] + sp["n_p"]:
            log.warning(
                "layer %d: only %d of %d directions have a KL above 10x the noise floor (%.3g): the rest keep "
                "variance order in the split. With icsm.injection unit (epsilon %g) run the sensitivity "
                "teacher in fp32 (icsm.sensitivity_dtype: fp32, now %s) or raise icsm.epsilon",
                rep,
                n_res,
                int(res["U"].shape[1]),
                res["kl_noise_floor"],
                icfg.epsilon,
                icfg.sensitivity_dtype,
            )
        log.info(
            "layer %d: r'=%d n_f=%d n_p=%d KL max %.3g median %.3g (%.1fs)",
            rep,
            res["U"].shape[1],
            sp["n_f"],
            sp["n_p"],
            layers_meta[str(rep)]["kl_max"],
            layers_meta[str(rep)]["kl_median"],
            res["t_sensitivity_s"],
        )
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    meta = {
        "num_layers": L,
        "hidden_size": int(backend.hidden_size),
        "groups": groups,
        "rep_layers": reps,
        "r": icfg.r,
        "injection": icfg.injection,
        "injection_size": (
            f"epsilon * u_k, epsilon = {icfg.epsilon} (unit direction: norm epsilon per instruction token)"
            if icfg.injection == "unit"
            else f"alpha * std_k * u_k, alpha = {icfg.alpha} (std of the pooled teacher states along u_k, "
            "S_k / sqrt(N-1))"
        ),
        "epsilon": icfg.epsilon,
        "alpha": icfg.alpha,
        "sensitivity_dtype": icfg.sensitivity_dtype,
        "sensitivity_model_dtype": str(next(backend.model.parameters()).dtype).replace("torch.", ""),
        "injection_point": "added to the instruction positions of the residual stream entering decoder layer "
        "rep (= output of layer rep-1); directions, std and C_T from the pooled output of layer rep "
        "(residual stream before any final norm)",
        "space": "residual stream at the decoder layer's output, before any final norm (forward hook)",
        "sensitivity": "KL(teacher || perturbed) over the action-token bins, mean over action tokens and "
        f"{n_sens} probe samples",
        "sensitivity_samples": n_sens,
        "direction_batch": icfg.direction_batch,
        "fragile_dim": icfg.fragile_dim,
        "plastic_dim": icfg.plastic_dim,
        "split_rule": EPSILON_RULE,
        "probe_hash": probe["hash"],
        "probe_dir": str(probe_dir),
        "probe_dataset": probe["dataset"].get("name"),
        "probe_split": probe.get("split", "train"),
        "probe_source": probe.get("source"),
        "n_probe": len(probe["indices"]),
        "n_empty": int(probe.get("n_empty", 0)),
        "layers": layers_meta,
        "tensor_hashes": hashes,
        "timings": timings,
        "model": sc["model"],
        **provenance(),
    }
    write_json(out / "meta.json", meta)  # completion file: last
    log.info("ICSM artifacts in %s (%.1fs)", out, timings["total_s"])
    return 0


def sensitivity_model_block(model_block: dict, sensitivity_dtype: str) -> dict:
    """The model block the icsm stage loads its teacher with: icsm.sensitivity_dtype "fp32" / "fp64"
    overrides model.dtype (a bf16 residual stream rounds away an epsilon = 1e-3 unit injection; a
    small model's KL at epsilon can sit near fp32 rounding: docs/methods.md), "model" keeps it."""
    if sensitivity_dtype == "model":
        return model_block
    if sensitivity_dtype in ("fp32", "fp64"):
        return {**model_block, "dtype": sensitivity_dtype}
    raise MethodConfigError(f"icsm.sensitivity_dtype = {sensitivity_dtype!r}: use fp32, fp64 or model")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr: ties get average ranks); nan for < 2 values
    or a constant input."""
    import warnings

    from scipy.stats import spearmanr

    if a.numel() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan
        rho = spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic
    return float(rho)
