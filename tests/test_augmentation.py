"""Train-time image augmentation as openvla's (crop 0.9, brightness 0.2, contrast [0.8, 1.2],
saturation [0.8, 1.2], hue 0.05; dlimp clips after each op), seeded from the training generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlaforget.models.base import augment_images, hsv_to_rgb, jitter_colors, rgb_to_hsv


def _images(b=4, size=24, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.1, 0.9, (b, 1, 1, 3))
    img = 255 * np.clip(base * (0.6 + 0.4 * xx[None, ..., None]) + 0.2 * yy[None, ..., None], 0, 1)
    return img.astype(np.uint8)


def _hsv(images: np.ndarray) -> torch.Tensor:
    return rgb_to_hsv(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def test_hsv_round_trip_matches_tensorflow():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    tf = pytest.importorskip("tensorflow")
    ref = tf.image.rgb_to_hsv(x.permute(0, 2, 3, 1).numpy()).numpy()
    np.testing.assert_allclose(rgb_to_hsv(x).permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


def test_colour_ops_equal_openvlas_tensorflow_chain():
    """brightness -> contrast -> saturation -> hue with clipping after each, as dlimp's augment_image
    runs tf.image's ops, for the same draws."""
    tf = pytest.importorskip("tensorflow")
    x = torch.from_numpy(_images(4, 16, seed=1)).permute(0, 3, 1, 2).float() / 255
    u = torch.tensor(
        [[0.5, -0.9, 0.7, -0.3], [-1.0, 1.0, -1.0, 1.0], [0.0, 0.2, 0.9, 0.6], [0.3, -0.1, -0.5, -1.0]]
    )
    b, c, s, h = 0.2, 0.2, 0.2, 0.05
    ours = jitter_colors(x, u, b, c, s, h).permute(0, 2, 3, 1).numpy()
    for i in range(4):
        im = tf.constant(x[i].permute(1, 2, 0).numpy())
        im = tf.clip_by_value(tf.image.adjust_brightness(im, float(u[i, 0]) * b), 0, 1)
        im = tf.clip_by_value(tf.image.adjust_contrast(im, 1 + float(u[i, 1]) * c), 0, 1)
        im = tf.clip_by_value(tf.image.adjust_saturation(im, 1 + float(u[i, 2]) * s), 0, 1)
        im = tf.clip_by_value(tf.image.adjust_hue(im, float(u[i, 3]) * h), 0, 1)
        np.testing.assert_allclose(ours[i], im.numpy(), atol=2e-4)


def test_saturation_and_hue_jitter_are_applied_by_default():
    imgs = _images(6, 24, seed=2)
    out = augment_images(imgs, torch.Generator().manual_seed(0), crop_area=1.0, brightness=0.0, contrast=0.0)
    before, after = _hsv(imgs), _hsv(out)
    dh = ((after[:, 0] - before[:, 0] + 0.5) % 1.0 - 0.5).mean(dim=(1, 2))  # signed hue shift per image
    ds = (after[:, 1] / before[:, 1].clamp_min(1e-3)).median(dim=1).values.median(dim=1).values
    assert (dh.abs() <= 0.05 + 0.01).all() and dh.abs().max() > 0.005  # hue moved, within ±0.05
    assert (ds >= 0.8 - 0.03).all() and (ds <= 1.2 + 0.03).all() and (ds - 1).abs().max() > 0.02
    assert len({round(float(v), 3) for v in dh}) > 1  # one draw per image
    grey = np.full((2, 8, 8, 3), 128, np.uint8)  # no colour: saturation and hue leave it unchanged
    np.testing.assert_array_equal(
        augment_images(grey, torch.Generator().manual_seed(0), crop_area=1.0, brightness=0.0, contrast=0.0),
        grey,
    )


def test_augmentation_is_seeded_from_the_generator():
    imgs = _images(3, 24, seed=3)
    a = augment_images(imgs, torch.Generator().manual_seed(5))
    b = augment_images(imgs, torch.Generator().manual_seed(5))
    c = augment_images(imgs, torch.Generator().manual_seed(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == imgs.shape


def test_no_jitter_and_full_crop_is_the_identity():
    imgs = _images(2, 16, seed=4)
    out = augment_images(imgs, torch.Generator().manual_seed(0), 1.0, 0.0, 0.0, 0.0, 0.0)
    assert np.abs(out.astype(int) - imgs).max() <= 1
