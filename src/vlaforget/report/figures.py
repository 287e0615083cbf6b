"""Paper figures (`vlaforget figures ...`), PNG + PDF into results/figures/.

- pareto: downstream success vs retention, one point per run, method means with 95 % CI bars.
- training_curves: each run's metrics.jsonl (loss, action accuracy; the method's drift, HSW gains,
  CRaFT lambda / conflict ratio where logged), mean over seeds per method.
- ablation: bars of the ablation table (downstream success and retention per variant).
- category_retention: multiple-choice VQA retention (run / teacher accuracy) per question category,
  one bar group per category, one bar per method (mean ± 95 % t-CI over seeds); "undefined" marks a
  category the teacher answers 0 % of.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..io import atomic_path
from ..study import parse_run_name
from .tables import UNDEFINED, load_evals, read_table, run_metrics, summarize, teacher_of

CURVES = [
    ("train_loss", "action loss"),
    ("action_accuracy", "action token accuracy"),
    ("drift_d", "drift d"),
    ("hsw_gamma", "HSW gamma (fragile gain)"),
    ("hsw_beta", "HSW beta (plastic gain)"),
    ("lambda", "CRaFT lambda"),
    ("conflict_ratio", "CRaFT conflict ratio"),
    ("L_ret", "CRaFT L_ret"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{name}.{ext}"
        with atomic_path(p, suffix=f".{ext}") as tmp:  # matplotlib picks the format from the name
            # no CreationDate: a rerun's PDF is byte-identical, like its PNG and tables
            meta = {"CreationDate": None} if ext == "pdf" else None
            fig.savefig(tmp, dpi=150, bbox_inches="tight", metadata=meta)
        paths.append(p)
    _plt().close(fig)
    return paths


RETENTIONS = (
    ("upstream_retention", "upstream success retention"),
    ("vqa_retention", "VQA accuracy retention"),
    ("vqa_mc_retention", "VQA multiple-choice retention"),
    ("cka", "CKA vs teacher"),
)


def pareto(eval_files, upstream: list[str], out_dir: Path) -> list[Path]:
    """Downstream success vs retention, one panel per measured retention (upstream success and VQA
    accuracy; CKA when neither): the two kinds of forgetting can disagree, so both are shown."""
    plt = _plt()
    evals = load_evals(eval_files)
    teacher = evals.get("teacher")
    pts: dict[str, dict[str, list[tuple[float, float]]]] = {k: defaultdict(list) for k, _ in RETENTIONS}
    for run, ev in evals.items():
        if run == "teacher":
            continue
        r = parse_run_name(run)
        m = run_metrics(ev, r["suite"], upstream, teacher_of(teacher, r["seed"]))
        y = m["downstream_success"]
        for key, _ in RETENTIONS:
            x = m.get(key)
            if isinstance(x, float) and y is not None and np.isfinite(x):  # not None / UNDEFINED
                pts[key][r["method"]].append((x, y))
    panels = [(k, lab) for k, lab in RETENTIONS[:3] if pts[k]] or [
        (k, lab) for k, lab in RETENTIONS[3:] if pts[k]
    ]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    methods = sorted({m for k, _ in panels for m in pts[k]})
    for ax, (key, label) in zip(axes[0], panels):
        for method, a in ((m, np.array(pts[key][m])) for m in methods if pts[key].get(m)):
            color = f"C{methods.index(method) % 10}"
            ax.scatter(a[:, 0], a[:, 1], color=color, alpha=0.4, s=18)
            mx, my = a.mean(0)
            ex = a[:, 0].std(ddof=1) * 1.96 / math.sqrt(len(a)) if len(a) > 1 else 0
            ey = a[:, 1].std(ddof=1) * 1.96 / math.sqrt(len(a)) if len(a) > 1 else 0
            ax.errorbar(mx, my, xerr=ex, yerr=ey, fmt="o", color=color, label=method, capsize=3)
        if teacher is not None and key != "cka":
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label + (" (run / teacher)" if "retention" in label else ""))
        ax.set_ylabel("downstream success rate")
        ax.set_title(f"Downstream success vs {label.split(' retention')[0]}")
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no runs with both metrics", ha="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    return _save(fig, out_dir, "pareto")


def category_retention(eval_files, upstream: list[str], out_dir: Path) -> list[Path]:
    """Bars: multiple-choice VQA retention per question category and method (mean ± 95 % t-CI)."""
    plt = _plt()
    evals = load_evals(eval_files)
    teacher = evals.get("teacher")
    vals: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run, ev in evals.items():
        if run == "teacher" or teacher is None:
            continue
        r = parse_run_name(run)
        for k, v in run_metrics(ev, r["suite"], upstream, teacher_of(teacher, r["seed"])).items():
            if k.startswith("vqa_mc_retention[") and v is not None:
                vals[k[len("vqa_mc_retention[") : -1]][r["method"]].append(v)
    cats = sorted(vals)
    methods = sorted({m for c in cats for m in vals[c]})
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(cats) + 2), 4))
    w = 0.8 / max(1, len(methods))
    labelled: set[str] = set()
    for j, m in enumerate(methods):
        for i, c in enumerate(cats):
            s = summarize(vals[c].get(m, []))
            x = i - 0.4 + w * (j + 0.5)
            if s["n"]:
                ax.bar(
                    x,
                    s["mean"],
                    w,
                    color=f"C{j % 10}",
                    label=None if m in labelled else m,
                    yerr=0 if math.isnan(s["ci95"]) else s["ci95"],
                    capsize=2,
                )
                labelled.add(m)
            elif any(v is UNDEFINED for v in vals[c].get(m, [])):
                ax.text(x, 0.02, "undefined", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
    ax.set_ylabel("VQA-MC retention (run / teacher accuracy)")
    ax.set_title("General visual-language skill retained, per question category")
    if labelled:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no multiple-choice VQA measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, out_dir, "category_retention")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
    return rows


def training_curves(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    plt = _plt()
    series: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = defaultdict(lambda: defaultdict(list))
    for d in run_dirs:
        name = d.parent.name if len(d.name) == 12 and d.name.isalnum() else d.name  # runs/{run}/{config id}
        try:
            method = parse_run_name(name)["method"]
        except ValueError:
            method = name
        rows = read_metrics(d / "metrics.jsonl")
        for key, _ in CURVES:
            pts = [(r["step"], r[key]) for r in rows if "step" in r and isinstance(r.get(key), (int, float))]
            if pts:
                a = np.array(pts, dtype=float)
                series[key][method].append((a[:, 0], a[:, 1]))
    keys = [(k, lab) for k, lab in CURVES if series.get(k)] or CURVES[:2]
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    methods = sorted({m for k in series for m in series[k]})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, (key, label) in zip(axes.flat, keys):
        for method, runs in sorted(series.get(key, {}).items()):
            # mean over seeds on the steps all runs logged
            steps = sorted(set.intersection(*[set(s.tolist()) for s, _ in runs]))
            if steps:
                vals = np.array([[dict(zip(s.tolist(), v.tolist()))[t] for t in steps] for s, v in runs])
                ax.plot(steps, vals.mean(0), color=colors[method], label=method)
                if len(runs) > 1:
                    ax.fill_between(steps, vals.min(0), vals.max(0), color=colors[method], alpha=0.15)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if methods:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, "training_curves")


def ablation(table_csv: Path, out_dir: Path) -> list[Path]:
    plt = _plt()
    rows = [r for r in read_table(table_csv)] if Path(table_csv).exists() else []
    cols = [
        (c, lab)
        for c, lab in (
            ("downstream_success", "downstream success"),
            ("upstream_retention", "upstream retention"),
            ("vqa_retention", "VQA retention"),
            ("cka", "CKA"),
        )
        if any(np.isfinite(r.get(f"{c}_mean", float("nan"))) for r in rows)
    ] or [("downstream_success", "downstream success")]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.2), squeeze=False)
    labels = [r["method"] for r in rows]
    for ax, (c, lab) in zip(axes.flat, cols):
        means = [r.get(f"{c}_mean", float("nan")) for r in rows]
        cis = [r.get(f"{c}_ci95", float("nan")) for r in rows]
        cis = [0 if not np.isfinite(x) else x for x in cis]
        ax.bar(
            range(len(rows)),
            np.nan_to_num(means),
            yerr=cis,
            capsize=3,
            color=["grey" if m == "teacher" else f"C{i % 10}" for i, m in enumerate(labels)],
        )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(lab, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, "ablation")
