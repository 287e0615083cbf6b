"""Compare closed-loop evaluation results episode by episode (issue 27): the first file against each other.

    python bench/eval_compare.py REF.json OTHER.json [OTHER.json ...]

Episodes are matched by (task, seed); for each OTHER it prints successes, how many episodes end with
the same outcome, the same number of steps, and the same last image (`final_digest`, sha1 of the last frame: equal last frames from one renderer mean one trajectory; two renderers never give equal frames).
"""

from __future__ import annotations

import json
import sys


def episodes(path: str) -> dict:
    return {(e["task"], e["seed"]): e for e in json.load(open(path))["episodes"]}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    ref = episodes(argv[0])
    for other_path in argv[1:]:
        other = episodes(other_path)
        keys = sorted(set(ref) & set(other))
        if len(keys) != len(ref):
            sys.exit(f"{other_path}: {len(keys)} of {len(ref)} episodes in common: not the same protocol")
        same = {f: sum(ref[k][f] == other[k][f] for k in keys) for f in ("success", "steps", "final_digest")}
        print(
            f"{argv[0]} vs {other_path}: {len(keys)} episodes, successes {sum(ref[k]['success'] for k in keys)}"
            f" vs {sum(other[k]['success'] for k in keys)}; same outcome {same['success']}, same length"
            f" {same['steps']}, same last frame {same['final_digest']}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
