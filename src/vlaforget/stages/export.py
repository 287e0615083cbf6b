"""Recipe `vlaforget export`: a finished run as one merged HF checkpoint openvla's own code loads
(export.py).
"""

from __future__ import annotations

from pathlib import Path

from ..export import export_run, read_run
from ..models import DTYPES
from ..paths import apply_job_env


def add_args(p):
    p.add_argument(
        "--run-dir", required=True, help="a finished run: {root}/runs/<run> (holds config.yaml, final/)"
    )
    p.add_argument("--out", default=None, help="output folder (default {root}/exports/<run>)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="dtype of the merged weights (default: the run's model dtype)",
    )
    p.add_argument("--device", default="cpu", help="where to merge (cpu; cuda needs the weights' size free)")


def main(args) -> int:
    sc = read_run(args.run_dir)
    apply_job_env(Path(sc["root"]))
    export_run(args.run_dir, args.out, dtype=args.dtype, device=args.device)
    return 0
