"""Paired comparisons of the GPU study's runs against the baseline (docs/benchmarks.md "Issue 19:
the GPU study, complete"): upstream retention per seed, scipy's paired t-test over the seeds, and
Fisher's exact test of the baseline's downstream episodes against the teacher's zero-shot ones.

    .venv/bin/python bench/gpu_study_stats.py [results/embedded_gpu/raw]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

SEEDS = (42, 123, 456)
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
    def rate(run: str, suite: str) -> dict:
        return json.loads((raw / run / f"{suite}.json").read_text())

    teacher_up = rate("teacher", "mw_upstream")["success_rate"]

    def retention(method: str, shots: str = "full") -> np.ndarray:
        return (
            np.array(
                [
                    rate(f"mw_downstream__{method}__{shots}__s{s}", "mw_upstream")["success_rate"]
                    for s in SEEDS
                ]
            )
            / teacher_up
        )

    for shots, methods in (("full", RUNS), ("5shot", RUNS[:2]), ("10shot", RUNS[:2])):
        base = retention("baseline", shots)
        lo, hi = stats.t.interval(0.95, len(base) - 1, loc=base.mean(), scale=stats.sem(base))
        print(
            f"{shots:6s} baseline retention {np.round(base, 3)} mean {base.mean():.3f} CI [{lo:.3f}, {hi:.3f}]"
        )
        for m in methods:
            x = retention(m, shots)
            p = stats.ttest_rel(x, base).pvalue if np.any(x != base) else float("nan")  # nan: equal per seed
            print(
                f"{shots:6s} {m:22s} retention {np.round(x, 3)} mean {x.mean():.3f} "
                f"diff {x.mean() - base.mean():+.3f} paired p {p:.3f}"
            )

    def successes(run: str) -> tuple[int, int]:
        eps = rate(run, "mw_downstream")["episodes"]
        return sum(bool(e["success"]) for e in eps), len(eps)

    t_succ, t_n = successes("teacher")
    b = [successes(f"mw_downstream__baseline__full__s{s}") for s in SEEDS]
    b_succ, b_n = sum(k for k, _ in b), sum(n for _, n in b)
    ci = stats.binomtest(t_succ, t_n).proportion_ci()
    p = stats.fisher_exact([[b_succ, b_n - b_succ], [t_succ, t_n - t_succ]]).pvalue
    print(
        f"downstream: teacher {t_succ}/{t_n} (Clopper-Pearson 95 % CI {ci.low:.2f}-{ci.high:.2f}), "
        f"baseline {b_succ}/{b_n}, Fisher's exact p {p:.3f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/embedded_gpu/raw"))
