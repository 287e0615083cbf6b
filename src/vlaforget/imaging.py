"""Image operations shared by the data cache, the simulators' wrappers and the evaluation, written to
give what openvla's TensorFlow pipeline gives without TensorFlow in the process (TensorFlow and
MuJoCo's EGL in one process crash; the evaluation runs the simulator).

- `decode_jpeg`: libjpeg-turbo's INTEGER_FAST DCT (simplejpeg `fastdct`), the decoder behind
  `tf.io.decode_jpeg` / `tf.io.decode_image` with their default `dct_method`: bit for bit the same
  pixels (PIL's decoder, INTEGER_ACCURATE, differs on ~65 % of them by up to 14 levels).
- `resize_lanczos`: `tf.image.resize(img, (size, size), method="lanczos3", antialias=True)` then
  round / clip / uint8, as openvla's LIBERO evaluation (`resize_image`) and its training data pipeline
  (dlimp's `resize_image`) do it: TensorFlow's ScaleAndTranslate kernel (its spans, weights and float32
  accumulation, rows first) in NumPy. On 24 LIBERO renders (256 -> 224) 25 of 3.6 million values differ
  from TensorFlow's, by 1 (float32 rounding at .5; docs/benchmarks.md "LIBERO frames as openvla makes
  them"); PIL's Lanczos differed on 14 % by up to 8.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] as TensorFlow decodes them (INTEGER_FAST DCT)."""
    try:
        import simplejpeg
    except ImportError as e:  # the `sim` extra and the real-study env install it
        raise ImportError(
            "vlaforget decodes simulator frames with simplejpeg (as TensorFlow decodes training images): "
            "pip install simplejpeg (part of `pip install -e '.[sim]'`, `make install`, `make real-env`)"
        ) from e
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes: PIL at `quality` with 4:2:0 chroma, the pixels of
    tf.image.encode_jpeg(img) at its default quality 95 (only the header's density fields differ)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_roundtrip(img: np.ndarray, quality: int = 95) -> np.ndarray:
    """A frame as a JPEG round trip through TensorFlow leaves it (encode_jpeg, then tf.io.decode_image):
    what openvla's `resize_image` does before resizing, and the frame the cache holds for a rendered one."""
    return decode_jpeg(encode_jpeg(img, quality))


_PI = np.float32(3.14159265359)  # TensorFlow's kPI, as a float
_RADIUS = np.float32(3.0)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """TensorFlow's LanczosKernelFunc(3) in float32."""
    x = np.abs(x).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = _RADIUS * np.sin(_PI * x) * np.sin(_PI * x / _RADIUS) / (_PI * _PI * x * x)
    v = np.where(x > _RADIUS, np.float32(0.0), v)
    return np.where(x <= np.float32(1e-3), np.float32(1.0), v).astype(np.float32)


@lru_cache(maxsize=32)
def _spans(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts [out], weights [out, span]) of ScaleAndTranslate's ComputeSpans (scale out/in, no
    translation, antialias): the weights of each output pixel over its span of input pixels, zero past
    a span's real end."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv_scale = np.float32(1.0 / float(scale))
    kernel_scale = max(inv_scale, np.float32(1.0))  # antialias: widen the kernel when downsampling
    one_over = np.float32(1.0) / kernel_scale
    reach = _RADIUS * kernel_scale
    span = min(2 * int(np.ceil(reach)) + 1, in_size)
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, span), np.float32)
    for x in range(out_size):
        sample = np.float32(np.float32(x) + np.float32(0.5)) * inv_scale
        lo = int(np.ceil(sample - reach - np.float32(0.5)))
        hi = int(np.floor(sample + reach - np.float32(0.5)))
        lo, hi = min(max(lo, 0), in_size - 1), min(max(hi, 0), in_size - 1) + 1
        pos = np.arange(lo, hi).astype(np.float32) + np.float32(0.5) - sample
        w = _lanczos3(np.abs(pos * one_over))
        total = np.float32(0.0)
        for v in w:  # sequential float32 sum, as the kernel does
            total = np.float32(total + v)
        weights[x, : hi - lo] = w * (np.float32(1.0) / total)
        starts[x] = lo
    return starts, weights


def _gather(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample float32 `img` along `axis` to out_size: out[i] = sum_k w[i, k] * img[start[i] + k],
    accumulated in k order in float32 (ScaleAndTranslate's GatherRows / GatherColumns)."""
    n = img.shape[axis]
    starts, weights = _spans(out_size, n)
    shape = [1] * img.ndim
    shape[axis] = out_size
    acc = np.zeros(img.shape[:axis] + (out_size,) + img.shape[axis + 1 :], np.float32)
    for k in range(weights.shape[1]):
        idx = np.minimum(starts + k, n - 1)  # past a span's end the weight is 0
        acc += np.take(img, idx, axis=axis) * weights[:, k].reshape(shape)
    return acc


def resize_lanczos(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C]: tf.image.resize(lanczos3, antialias=True), rounded
    half to even and clipped, as openvla resizes. The one resize of simulator frames and dataset
    images (the evaluation's policy input and the cache alike); a frame already `size` is returned as is."""
    a = np.asarray(img)
    if a.shape[0] == size and a.shape[1] == size:
        return np.ascontiguousarray(a)
    out = _gather(_gather(a.astype(np.float32), size, 0), size, 1)  # rows first, as TensorFlow
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
