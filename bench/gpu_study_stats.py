"""Paired comparisons of the GPU study's runs against the baseline (docs/benchmarks.md "Issue 19:
the GPU study, complete"): upstream retention per seed, scipy's paired t-test over the seeds, and
Fisher's exact test of the baseline's downstream episodes against the teacher's zero-shot ones.
The seeds are the raw folder's; with eval.initial_states per_seed (raw/teacher__s<seed>/) each run
is divided by the teacher on its own seed's states, and the teacher's downstream episodes pool the
blocks. Runs a folder lacks (a study cut short) are left out of their row, said so.
The paper tables' `table_*_stats.csv` (bootstrap, McNemar, Holm) are the study's statistics; this
is the quick look the issue-19 section used.

    .venv/bin/python bench/gpu_study_stats.py [results/embedded_gpu/raw]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

RUNS = [
    "icsm_hsw_thermostat",
    "craft",
    "hard_projection",
    "craft_no_dual",
    "no_thermostat",
    "no_sensitivity",
    "single_group",
    "craft_no_projection",
]


def main(raw: Path) -> None:
    def rate(run: str, suite: str) -> dict | None:
        f = raw / run / f"{suite}.json"
        return json.loads(f.read_text()) if f.exists() else None

    seeds = sorted({int(p.name.rsplit("__s", 1)[1]) for p in raw.glob("mw_downstream__baseline__full__s*")})
    per_seed = (raw / f"teacher__s{seeds[0]}").is_dir() if seeds else False

    def teacher(seed: int, suite: str) -> dict | None:
        return rate(f"teacher__s{seed}" if per_seed else "teacher", suite)

    def retention(method: str, shots: str = "full") -> np.ndarray:
        out = []
        for s in seeds:
            r = rate(f"mw_downstream__{method}__{shots}__s{s}", "mw_upstream")
            out.append(r["success_rate"] / teacher(s, "mw_upstream")["success_rate"] if r else np.nan)
        return np.array(out)

    print(f"seeds {seeds} ({'each on its own initial states' if per_seed else 'shared initial states'})")
    for shots, methods in (("full", RUNS), ("5shot", RUNS[:2]), ("10shot", RUNS[:2])):
        base = retention("baseline", shots)
        if np.isnan(base).all():
            continue
        b = base[~np.isnan(base)]
        lo, hi = stats.t.interval(0.95, len(b) - 1, loc=b.mean(), scale=stats.sem(b))
        print(
            f"{shots:6s} baseline retention {np.round(base, 3)} mean {b.mean():.3f} CI [{lo:.3f}, {hi:.3f}]"
        )
        for m in methods:
            x = retention(m, shots)
            ok = ~(np.isnan(x) | np.isnan(base))
            if ok.sum() < 2:
                print(f"{shots:6s} {m:22s} {int(ok.sum())} seed(s) evaluated: left out")
                continue
            xs, bs = x[ok], base[ok]
            p = stats.ttest_rel(xs, bs).pvalue if np.any(xs != bs) else float("nan")  # nan: equal per seed
            print(
                f"{shots:6s} {m:22s} retention {np.round(x, 3)} mean {xs.mean():.3f} "
                f"diff {xs.mean() - bs.mean():+.3f} paired p {p:.3f} ({int(ok.sum())} seeds)"
            )

    def successes(run: str) -> tuple[int, int]:
        eps = rate(run, "mw_downstream")["episodes"]
        return sum(bool(e["success"]) for e in eps), len(eps)

    t = [successes(f"teacher__s{s}") for s in seeds] if per_seed else [successes("teacher")]
    t_succ, t_n = sum(k for k, _ in t), sum(n for _, n in t)
    b = [successes(f"mw_downstream__baseline__full__s{s}") for s in seeds]
    b_succ, b_n = sum(k for k, _ in b), sum(n for _, n in b)
    ci = stats.binomtest(t_succ, t_n).proportion_ci()
    p = stats.fisher_exact([[b_succ, b_n - b_succ], [t_succ, t_n - t_succ]]).pvalue
    print(
        f"downstream: teacher {t_succ}/{t_n} (Clopper-Pearson 95 % CI {ci.low:.2f}-{ci.high:.2f}), "
        f"baseline {b_succ}/{b_n}, Fisher's exact p {p:.3f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/embedded_gpu/raw"))
