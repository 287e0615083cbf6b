"""Data-root policy: root / allowed root resolution, containment, job environment under root."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlaforget import paths


def test_root_resolution_order(monkeypatch):
    monkeypatch.delenv("VLAFORGET_ROOT", raising=False)
    monkeypatch.delenv("VLAFORGET_ALLOWED_ROOT", raising=False)
    assert paths.resolve_root({}) == Path("/opt/data/private/vlaforget")
    assert paths.resolve_allowed_root({}) == Path("/opt/data/private")
    assert paths.resolve_root({"root": "/opt/data/private/x"}) == Path("/opt/data/private/x")
    monkeypatch.setenv("VLAFORGET_ROOT", "/opt/data/private/env")
    assert paths.resolve_root({"root": "/opt/data/private/x"}) == Path("/opt/data/private/env")


@pytest.mark.parametrize(
    "p,ok",
    [
        ("/opt/data/private/a/b", True),
        ("/opt/data/private", True),
        ("/opt/data/private2/a", False),
        ("/opt/data/private/../x", False),
        ("/workspace/openvla", False),
    ],
)
def test_check_under(p, ok):
    allowed = Path("/opt/data/private")
    if ok:
        assert paths.check_under(p, allowed, "root")
    else:
        with pytest.raises(paths.PathPolicyError, match="outside the allowed root"):
            paths.check_under(p, allowed, "root")


def test_job_env_keeps_every_cache_under_root(tmp_root):
    env = paths.job_env(tmp_root)
    for key in ("HF_HOME", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME", "WANDB_DIR", "TMPDIR"):
        assert paths.is_within(Path(env[key]), tmp_root), key
    paths.apply_job_env(tmp_root)
    assert (tmp_root / "hf_cache").is_dir() and (tmp_root / "tmp").is_dir()


def test_layout_places_everything_under_root(tmp_root):
    lay = paths.Layout(tmp_root)
    for p in (
        lay.cache("d"),
        lay.model("b"),
        lay.probe("b", "p"),
        lay.icsm("b", "p"),
        lay.craft("b", "d"),
        lay.run("r"),
        lay.eval("r"),
        lay.locks,
    ):
        assert paths.is_within(p, tmp_root)


def test_ensure_root_creates_and_checks(tmp_root):
    assert paths.ensure_root(tmp_root) == tmp_root and tmp_root.is_dir()
