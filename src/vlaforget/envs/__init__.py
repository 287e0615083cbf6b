"""Simulator wrappers with one small protocol: reset() -> obs, step(a) -> (obs, success, done).

`metaworld.MetaWorldEnv` is the embedded world (scripted experts, CPU rendering). Import it from
`vlaforget.envs.metaworld`; this package does not import MuJoCo eagerly.
"""

from __future__ import annotations

import numpy as np


def resize_lanczos(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3], PIL's Lanczos (antialiased, as openvla resizes): the one
    resize of simulator frames, for the policy (eval) and for the dataset cache alike."""
    from PIL import Image

    if img.shape[0] == size and img.shape[1] == size:
        return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS), dtype=np.uint8)
