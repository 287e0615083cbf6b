"""Videos need imageio-ffmpeg: without it the eval stage must stop before any rollout, naming the fix.

(On a machine without imageio-ffmpeg, imageio handed `.mp4` to its tifffile plug-in, which raised
only after every episode of the evaluation had run: found running profiles/demo-gpu on the H200.)"""

from __future__ import annotations

import builtins

import pytest

from vlaforget.errors import UserError
from vlaforget.eval import video


def _without_imageio_ffmpeg(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "imageio_ffmpeg":
            raise ImportError("No module named 'imageio_ffmpeg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_check_passes_where_imageio_ffmpeg_is_installed():
    pytest.importorskip("imageio_ffmpeg")
    video.check_video_backend()


def test_missing_ffmpeg_is_a_user_error_naming_both_fixes(monkeypatch):
    _without_imageio_ffmpeg(monkeypatch)
    with pytest.raises(video.VideoBackendMissing) as ei:
        video.check_video_backend()
    assert isinstance(ei.value, UserError)
    msg = str(ei.value)
    assert "imageio-ffmpeg" in msg and "eval.videos_per_task: 0" in msg


def test_eval_stage_checks_before_building_episodes(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vlaforget.stages import eval as eval_stage

    _without_imageio_ffmpeg(monkeypatch)
    built = []
    monkeypatch.setattr(eval_stage, "build_episodes", lambda *a, **k: built.append(a) or (None, [], {}))
    monkeypatch.setattr(
        eval_stage,
        "load_stage_config",
        lambda path, stage: {
            "eval": {},
            "out_file": str(tmp_path / "e.json"),
            "world": "metaworld",
            "suite": "s",
        },
    )
    monkeypatch.setattr(
        eval_stage.EvalSettings, "of", staticmethod(lambda block: SimpleNamespace(videos_per_task=1))
    )
    args = SimpleNamespace(config="c.yaml", threads=None, device="cpu", num_envs=None)
    with pytest.raises(video.VideoBackendMissing):
        eval_stage.main(args)
    assert built == [], "episodes were built before the video check"
