"""vlaforget.imaging gives openvla's TensorFlow image pipeline without TensorFlow in the process.

openvla's LIBERO evaluation (`resize_image`) and its training data pipeline resize with
tf.image.resize(lanczos3, antialias=True) after a JPEG round trip through TensorFlow; the evaluation
here cannot import TensorFlow next to MuJoCo's EGL. These tests hold the NumPy versions to TensorFlow
itself (TensorFlow is in the `rlds` extra, so `make test` has it).
"""

from __future__ import annotations

import numpy as np
import pytest

from vlaforget.imaging import decode_jpeg, encode_jpeg, resize_lanczos

try:  # the way that can share the process with MuJoCo's software rendering (other tests render)
    from vlaforget.data.rlds import load_tensorflow

    tf = load_tensorflow()
except ImportError:
    pytest.skip("TensorFlow (the `rlds` extra) is the reference", allow_module_level=True)


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A frame with what renders have: flat regions, hard edges, gradients and fine texture."""
    rng = np.random.default_rng(seed)
    img = np.kron(rng.integers(0, 256, (h // 8, w // 8, 3)), np.ones((8, 8, 1)))
    img = img + np.linspace(0, 60, w)[None, :, None] + rng.normal(0, 6, (h, w, 3))
    img[h // 3 : h // 2, w // 4 : w // 2] = [250, 20, 20]
    return np.clip(img, 0, 255).astype(np.uint8)


def _tf_resize(img: np.ndarray, size: int) -> np.ndarray:
    x = tf.image.resize(img, (size, size), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()


def _openvla_resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """openvla experiments/robot/libero/libero_utils.py `resize_image`, verbatim in effect."""
    x = tf.image.encode_jpeg(img)
    x = tf.io.decode_image(x, expand_animations=False, dtype=tf.uint8)
    x = tf.image.resize(x, (size, size), method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()


@pytest.mark.parametrize("h,size", [(256, 224), (128, 64), (200, 224), (64, 224), (256, 128)])
def test_resize_is_tensorflows_lanczos3_antialias(h, size):
    img = _scene(h, h, seed=h + size)
    ours, ref = resize_lanczos(img, size), _tf_resize(img, size)
    d = np.abs(ours.astype(int) - ref.astype(int))
    # float32 sums in another order can land on the other side of .5: a handful of values, by 1
    assert d.max() <= 1 and (d > 0).mean() < 1e-4, ((d > 0).mean(), d.max())


def test_pil_lanczos_would_fail_the_same_bound():
    """The bound above is tight enough to tell PIL's Lanczos (the resize before session 15) apart."""
    from PIL import Image

    img = _scene(256, 256, seed=3)
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.LANCZOS))
    d = np.abs(pil.astype(int) - _tf_resize(img, 224).astype(int))
    assert (d > 0).mean() > 1e-2


def test_jpeg_round_trip_is_tensorflows():
    """PIL's encoder at quality 95 writes the pixels of tf.image.encode_jpeg (the headers differ), and
    decode_jpeg decodes as tf.io.decode_image does: the round trip equals TensorFlow's bit for bit."""
    img = _scene(256, 256, seed=5)
    ours = decode_jpeg(encode_jpeg(img))
    ref = tf.io.decode_image(tf.image.encode_jpeg(img), expand_animations=False).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_libero_policy_image_is_openvlas():
    """The LIBERO evaluation's policy image (rotate, JPEG, resize) against openvla's resize_image."""
    from vlaforget.envs.libero import preprocess_image

    agentview = _scene(256, 256, seed=7)
    ours = preprocess_image(agentview, 224)
    ref = _openvla_resize_image(np.ascontiguousarray(agentview[::-1, ::-1]), 224)
    d = np.abs(ours.astype(int) - ref.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-4, ((d > 0).mean(), d.max())


def test_same_size_is_returned_untouched():
    img = _scene(64, 64)
    assert resize_lanczos(img, 64) is not None and np.array_equal(resize_lanczos(img, 64), img)
