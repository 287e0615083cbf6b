"""How far the LIBERO evaluation's frames are from openvla's: vlaforget's PIL pipeline against openvla's
TensorFlow `resize_image` (experiments/robot/libero/libero_utils.py) on real LIBERO renders.

openvla's eval feeds the policy `resize_image(agentview[::-1, ::-1], (224, 224))`:
tf.image.encode_jpeg (quality 95) -> tf.io.decode_image -> tf.image.resize(lanczos3, antialias) ->
round, clip, uint8. vlaforget's envs.libero.preprocess_image does the same steps with PIL (TensorFlow
and MuJoCo's EGL in one process crash). This measures each step's share of the difference.

Two processes (TF and the simulator never share one):
    MUJOCO_GL=egl .venv-real/bin/python bench/libero_frame_diag.py render OUT.npz [--suites ...]
    .venv-real/bin/python bench/libero_frame_diag.py compare OUT.npz [--json RAW.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np


def render(out: Path, suites: list[str], tasks: int, states: int, steps: int) -> None:
    from vlaforget.envs import libero as L

    frames, names = [], []
    rng = np.random.default_rng(0)
    for suite in suites:
        for t in range(tasks):
            env = L.LiberoEnv(suite, t, resolution=256)
            for k in range(states):
                env.reset(k)
                frames.append(env.raw_obs["agentview_image"].copy())
                names.append(f"{suite}/{env.task}/state{k}/step0")
                for _ in range(steps):  # a few random moves: the arm and objects elsewhere
                    a = np.concatenate([rng.uniform(-0.5, 0.5, 6), [rng.uniform(0, 1)]])
                    env.step(a)
                frames.append(env.raw_obs["agentview_image"].copy())
                names.append(f"{suite}/{env.task}/state{k}/step{steps}")
            env.close()
    np.savez_compressed(out, frames=np.stack(frames), names=np.array(names))
    print(f"{len(frames)} raw agentview frames -> {out}")


def _tf_pipeline(img, tf, decode=True, resize=True):
    x = tf.image.encode_jpeg(img)
    x = tf.io.decode_image(x, expand_animations=False, dtype=tf.uint8) if decode else x
    if not resize:
        return x.numpy()
    x = tf.image.resize(x, (224, 224), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {
        "pixels_differing": float((d > 0).mean()),
        "mean_abs": float(d.mean()),
        "over_4_levels": float((d > 4).mean()),
        "max": int(d.max()),
        "frames_equal": int(sum((x == 0).all() for x in d)),
    }


def compare(npz: Path, raw_json: Path | None) -> None:
    import tensorflow as tf
    from PIL import Image

    from vlaforget.envs import libero as L
    from vlaforget.imaging import decode_jpeg, resize_lanczos

    data = np.load(npz)
    raws = [np.ascontiguousarray(f[::-1, ::-1]) for f in data["frames"]]
    openvla = np.stack([_tf_pipeline(r, tf) for r in raws])
    tf_bytes = [tf.image.encode_jpeg(r).numpy() for r in raws]
    tf_dec = [tf.io.decode_image(b, expand_animations=False).numpy() for b in tf_bytes]
    pil_bytes = []
    for r in raws:
        buf = io.BytesIO()
        Image.fromarray(r).save(buf, format="JPEG", quality=95)
        pil_bytes.append(buf.getvalue())

    def pil_lanczos(x):
        return np.asarray(Image.fromarray(x).resize((224, 224), Image.LANCZOS))

    rows = {
        "policy input: vlaforget envs.libero.preprocess_image vs openvla resize_image": _stats(
            np.stack([L.preprocess_image(f, 224) for f in data["frames"]]), openvla
        ),
        "encode: PIL q95 vs tf.image.encode_jpeg, both decoded by TF (pixels; header bytes differ)": _stats(
            np.stack([tf.io.decode_image(b, expand_animations=False).numpy() for b in pil_bytes]),
            np.stack(tf_dec),
        ),
        "decode: vlaforget.imaging.decode_jpeg vs tf.io.decode_image (same bytes)": _stats(
            np.stack([decode_jpeg(b) for b in tf_bytes]), np.stack(tf_dec)
        ),
        "decode: PIL vs tf.io.decode_image (same bytes; before session 15)": _stats(
            np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in tf_bytes]),
            np.stack(tf_dec),
        ),
        "resize: vlaforget.imaging.resize_lanczos vs tf.image.resize lanczos3 antialias (same frame)": _stats(
            np.stack([resize_lanczos(x, 224) for x in tf_dec]), openvla
        ),
        "resize: PIL Lanczos vs tf.image.resize lanczos3 antialias (same frame; before session 15)": _stats(
            np.stack([pil_lanczos(x) for x in tf_dec]), openvla
        ),
    }
    out = {"n_frames": len(raws), "tensorflow": tf.__version__, "frames": [str(n) for n in data["names"]]}
    out["rows"] = rows
    print(json.dumps(rows, indent=1))
    if raw_json:
        raw_json.write_text(json.dumps(out, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("out", type=Path)
    r.add_argument("--suites", nargs="+", default=["libero_spatial", "libero_goal"])
    r.add_argument("--tasks", type=int, default=3)
    r.add_argument("--states", type=int, default=2)
    r.add_argument("--steps", type=int, default=8)
    c = sub.add_parser("compare")
    c.add_argument("npz", type=Path)
    c.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.cmd == "render":
        render(a.out, a.suites, a.tasks, a.states, a.steps)
    else:
        compare(a.npz, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
