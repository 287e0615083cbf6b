"""Recipe `vlaforget stage-config`: write the config file of one stage job from the study config
(stageconfig.stage_config, written by stagefile.stage_config_text).
"""

from __future__ import annotations

from ..config import load_config
from ..io import atomic_write_text
from ..stageconfig import stage_config
from ..stagefile import stage_config_text


def add_args(p):
    p.add_argument(
        "--configfile",
        nargs="+",
        default=["config/config.yaml"],
        help="study config files, later ones overlay earlier ones",
    )
    p.add_argument("--stage", required=True)
    p.add_argument("--key", required=True, help="dataset / base / run name / run@suite, as in the workflow")
    p.add_argument("--out", required=True)


def main(args) -> int:
    cfg = load_config(*args.configfile)
    atomic_write_text(args.out, stage_config_text(stage_config(cfg, args.stage, args.key)))
    return 0
