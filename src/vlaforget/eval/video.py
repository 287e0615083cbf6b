"""MP4 videos of rollouts (imageio + imageio-ffmpeg, H.264), written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_path


class VideoBackendMissing(UserError, RuntimeError):
    """Videos were asked for, but imageio has no ffmpeg to write MP4 with."""


def check_video_backend() -> None:
    """Raise VideoBackendMissing unless imageio can write MP4 (imageio-ffmpeg's bundled ffmpeg).

    Without it imageio hands `.mp4` to another plug-in, which fails only once an evaluation's
    episodes have all run; the eval stage calls this first, so no rollout is lost."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise VideoBackendMissing(
            f"eval.videos_per_task > 0 but MP4 videos cannot be written ({type(e).__name__}: {e}): "
            "install imageio-ffmpeg (`pip install imageio-ffmpeg`, in envs/*.yaml), or set "
            "eval.videos_per_task: 0"
        ) from e


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 30) -> Path:
    """Write uint8 [H, W, 3] frames to an MP4 at `path` (tmp file + rename: never half-written)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not len(frames):
        raise ValueError(f"no frames to write to {path}")
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:  # yuv420p needs even sides: pad by one row / column
        frames = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for f in frames]
    with atomic_path(path, suffix=".mp4") as tmp:  # imageio picks the container from the name
        writer = imageio.get_writer(
            str(tmp),
            fps=fps,
            codec="libx264",
            quality=8,
            macro_block_size=2,
            pixelformat="yuv420p",
            ffmpeg_log_level="error",
        )
        try:
            for f in frames:
                writer.append_data(f)
        finally:
            writer.close()
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Frames of an MP4 as uint8 [T, H, W, 3] (tests, figures)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()
