"""Does the training pipeline's JPEG (eval/frames.py) change how much the renderer matters? (issue 27,
session 14). Offline, on the CPU, from session 13's frames of both machines (bench/device_diag.py):

    python bench/render_jpeg_diag.py MODEL_DIR docs/bench-results/issue27_device_diag_cpu.npz \
        docs/bench-results/issue27_device_diag_h100.npz > OUT.json

For the 48 frames (6 tasks x 4 initial states, at reset and after 15 expert steps) rendered by Mesa
(this CPU) and by the NVIDIA driver (an H100), the teacher's 4-token action on raw frames (what the
evaluation fed it before session 14) and on the frames as training saw them (RLDS JPEG, the cache's
decoder): how often the two renderers' frames give the same action, and how far each is from the other.
"""

from __future__ import annotations

import json
import sys

import numpy as np

sys.path.insert(0, "bench")
from device_diag import policy

from vlaforget.eval.frames import training_image


def main(model_dir: str, cpu_npz: str, gpu_npz: str) -> None:
    cpu, gpu = np.load(cpu_npz), np.load(gpu_npz)
    names = [str(n) for n in cpu["names"]]
    assert names == [str(n) for n in gpu["names"]]
    out = {"frames": len(names)}
    for kind, f in (("raw", lambda x: x), ("rlds_jpeg", lambda x: np.stack([training_image(i) for i in x]))):
        a, b = f(cpu["images"]), f(gpu["images"])
        d = np.abs(a.astype(int) - b.astype(int))
        ta, *_ = policy(model_dir, a, names, "cpu", False)
        tb, *_ = policy(model_dir, b, names, "cpu", False)
        out[kind] = {
            "pixels_differing": round(float((d.max(-1) > 0).mean()), 4),
            "mean_abs": round(float(d.mean()), 3),
            "max_abs": int(d.max()),
            "tokens_equal": round(float((ta == tb).mean()), 4),
            "frames_same_action": int((ta == tb).all(1).sum()),
        }
    # the teacher's action on the training pipeline's frame vs on the raw frame, one renderer
    for m, x in (("cpu", cpu["images"]), ("gpu", gpu["images"])):
        t_raw, *_ = policy(model_dir, x, names, "cpu", False)
        t_jpg, *_ = policy(model_dir, np.stack([training_image(i) for i in x]), names, "cpu", False)
        out[f"{m}_raw_vs_rlds_jpeg"] = {
            "tokens_equal": round(float((t_raw == t_jpg).mean()), 4),
            "frames_same_action": int((t_raw == t_jpg).all(1).sum()),
        }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
