"""Issue 13 item 6: `vlaforget preflight` lists every missing piece of a real-study run in one message,
each with its fix, in seconds: model folder, tokenizer, remote code and its import (transformers / timm),
norm_stats, each suite's RLDS builder dir, LIBERO + verified assets, the VQA set."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
from conftest import REPO

from vlaforget import preflight as P
from vlaforget.config import load_config

SUITES = ["libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops"]


@pytest.fixture
def real_cfg(tmp_root):
    allowed = tmp_root.parent
    over = {"data": {"rlds_dir": str(allowed / "rlds")}, "model": {"path": str(allowed / "openvla-7b")}}
    return load_config(REPO / "config" / "config.yaml", overrides=over)


def model_dir(cfg, *, weights=True, tokenizer=True, code=True, norm_stats=True):
    d = __import__("pathlib").Path(cfg["model"]["path"])
    d.mkdir(parents=True, exist_ok=True)
    conf = {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
    }
    if norm_stats:
        conf["norm_stats"] = {"bridge_orig": {}, "libero_spatial_no_noops": {}}
    (d / "config.json").write_text(json.dumps(conf))
    if weights:
        (d / "model-00001-of-00003.safetensors").write_bytes(b"x")
    if tokenizer:
        (d / "tokenizer_config.json").write_text("{}")
        (d / "tokenizer.model").write_bytes(b"x")
    if code:
        (d / "configuration_prismatic.py").write_text("X = 1\n")
        (d / "modeling_prismatic.py").write_text("from .configuration_prismatic import X\n")
    return d


def rlds(cfg, suites=SUITES, complete=True):
    root = __import__("pathlib").Path(cfg["data"]["rlds_dir"])
    for s in suites:
        v = root / s / "1.0.0"
        v.mkdir(parents=True)
        (v / "features.json").write_text("{}")
        if complete:
            (v / "dataset_info.json").write_text("{}")
            (v / f"{s}-train.tfrecord-00000-of-00001").write_bytes(b"x")


@pytest.fixture
def good_stack(monkeypatch):
    """transformers 4.40.1 + timm 0.9.16 importable (fakes; the real ones may not be installed)."""
    fake_tf = types.ModuleType("transformers")
    fake_tf.AutoModelForVision2Seq = object
    monkeypatch.setitem(sys.modules, "transformers", fake_tf)
    monkeypatch.setitem(sys.modules, "timm", types.ModuleType("timm"))
    versions = {"transformers": "4.40.1", "tokenizers": "0.19.1", "timm": "0.9.16", "mujoco": "3.3.0"}
    monkeypatch.setattr(P, "_version", lambda d: versions.get(d))
    return versions


@pytest.fixture
def libero_ok(monkeypatch):
    monkeypatch.setattr(P, "check_libero", lambda cfg, rep: None)


def what(rep):
    return "\n".join(w for w, _ in rep.problems)


def test_ready_when_everything_is_there(real_cfg, good_stack, libero_ok):
    model_dir(real_cfg)
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert rep.problems == [], rep.message()
    assert any("libero_spatial_no_noops" in n for n in rep.notes)  # unnorm keys found


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("3.3.0", True),
        ("3.3.2", True),
        ("3.3.3", False),
        ("3.4.0", False),
        ("3.9.0", False),
        ("3.2.7", False),
        (None, False),
    ],
)
def test_mujoco_outside_the_validated_range_is_refused(real_cfg, good_stack, libero_ok, version, ok):
    """MuJoCo >= 3.3.3 renders LIBERO's floors darker, >= 3.4.0 breaks libero_spatial task 5 (issue 28)."""
    model_dir(real_cfg)
    rlds(real_cfg)
    good_stack["mujoco"] = version
    rep = P.preflight(real_cfg)
    if ok:
        assert rep.problems == [], rep.message()
    else:
        assert len(rep.problems) == 1, rep.message()
        ((w, fix),) = rep.problems
        assert "mujoco" in w and (version is None or version in w)
        assert "pip install mujoco==3.3.0" in fix
        assert "pip install mujoco==3.3.0" in rep.message()


def test_one_message_lists_every_missing_piece_with_its_fix(real_cfg, good_stack, libero_ok):
    model_dir(real_cfg, weights=False, tokenizer=False, code=False, norm_stats=False)
    rlds(real_cfg, suites=SUITES[:2])
    real_cfg["eval"]["forgetting"]["vqa_jsonl"] = str(real_cfg["data"]["rlds_dir"]) + "/vqa.jsonl"
    t0 = time.time()
    rep = P.preflight(real_cfg)
    assert time.time() - t0 < 10
    w = what(rep)
    assert "no *.safetensors" in w and "tokenizer files" in w and "remote-code files" in w
    assert "norm_stats" in w and "vqa_jsonl" in w
    for s in SUITES[2:]:
        assert f"suite '{s}'" in w
    assert all(fix for _, fix in rep.problems)
    msg = rep.message()
    assert msg.count("fix:") == len(rep.problems) >= 7


def test_missing_model_folder(real_cfg, good_stack, libero_ok):
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert "does not exist" in what(rep) and "openvla-7b" in what(rep)


def test_hub_id_not_in_cache_names_the_download(real_cfg, good_stack, libero_ok):
    real_cfg["model"]["path"] = "openvla/openvla-7b"
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert any("huggingface-cli download openvla/openvla-7b" in fix for _, fix in rep.problems), rep.message()


def test_incomplete_rlds_builder_dir(real_cfg, good_stack, libero_ok):
    model_dir(real_cfg)
    rlds(real_cfg, complete=False)
    rep = P.preflight(real_cfg)
    assert what(rep).count("is incomplete") == 4 and "dataset_info.json" in what(rep)


def test_remote_code_that_fails_to_import(real_cfg, good_stack, libero_ok):
    d = model_dir(real_cfg)
    (d / "modeling_prismatic.py").write_text("import timm.no_such_module\n")
    rlds(real_cfg)
    assert "fails to import" in what(P.preflight(real_cfg))


def test_too_new_transformers_names_the_fix(real_cfg, good_stack, libero_ok, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "transformers", types.ModuleType("transformers")
    )  # no AutoModelForVision2Seq
    good_stack["transformers"] = "5.24.0"
    model_dir(real_cfg)
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert "AutoModelForVision2Seq" in what(rep)
    assert any("make real-env" in fix for _, fix in rep.problems)


def test_timm_out_of_range_and_broken_torchvision(real_cfg, good_stack, libero_ok, monkeypatch, tmp_path):
    good_stack["timm"] = "1.0.3"
    broken = tmp_path / "site"
    (broken / "timm").mkdir(parents=True)
    (broken / "timm" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.delitem(sys.modules, "timm")
    monkeypatch.syspath_prepend(str(broken))
    model_dir(real_cfg)
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert "timm 1.0.3 is outside" in what(rep)
    assert "torchvision::nms" in what(rep)
    assert any("TORCH_INDEX" in fix for _, fix in rep.problems)


def test_libero_missing_in_this_python(real_cfg, good_stack, monkeypatch):
    from vlaforget.envs import libero as L

    def nope():
        raise L.LiberoUnavailable("no libero")

    monkeypatch.setattr(L, "libero_package_dir", nope)
    model_dir(real_cfg)
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert "LIBERO is not importable" in what(rep)


def test_libero_assets_that_do_not_match_the_manifest(real_cfg, good_stack, monkeypatch, tmp_path):
    from vlaforget.envs import libero as L

    pkg = tmp_path / "libero" / "libero"
    (pkg / "assets").mkdir(parents=True)
    monkeypatch.setattr(L, "libero_package_dir", lambda: pkg)
    model_dir(real_cfg)
    rlds(real_cfg)
    rep = P.preflight(real_cfg)
    assert "do not match the hash manifest" in what(rep)


def test_cli_exit_status_and_message(tmp_root, capsys):
    allowed = tmp_root.parent
    cfg = allowed / "c.yaml"
    cfg.write_text(f"data: {{rlds_dir: {allowed}/nowhere}}\nmodel: {{path: {allowed}/nomodel}}\n")
    rc = P.main(types.SimpleNamespace(configfile=[str(REPO / "config" / "config.yaml"), str(cfg)]))
    out = capsys.readouterr().out
    assert rc == 1 and "problem(s); nothing was run" in out and "fix:" in out


def test_probe_stage_load_under_too_new_transformers_names_the_fix(monkeypatch, tmp_path):
    """The probe stage used to die with a bare `ImportError: cannot import name 'AutoModelForVision2Seq'`."""
    from vlaforget.models.openvla import OpenVLABackend, OpenVLAUnavailable

    fake = types.ModuleType("transformers")
    fake.__version__ = "5.24.0"
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(OpenVLAUnavailable, match=r"transformers==4\.40\.1.*") as e:
        OpenVLABackend.load({"path": str(tmp_path), "dtype": "fp32"})
    assert "make real-env" in str(e.value)


def test_model_stage_fails_on_a_wrong_stack_instead_of_warning(real_cfg, monkeypatch):
    from vlaforget.models.openvla import OpenVLAUnavailable
    from vlaforget.stages import model as build

    model_dir(real_cfg)
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    monkeypatch.setattr(P, "_version", lambda d: {"transformers": "5.24.0", "timm": None}.get(d))
    sc = {"model": {"path": real_cfg["model"]["path"], "cache_dir": None}}
    with pytest.raises(OpenVLAUnavailable, match="AutoModelForVision2Seq"):
        build.check_openvla(sc)


def test_torchvision_runtime_error_while_loading_names_the_fix(monkeypatch, tmp_path):
    """`operator torchvision::nms does not exist` is a RuntimeError: the old ImportError hint missed it."""
    from vlaforget.models.openvla import OpenVLABackend, OpenVLAUnavailable

    class Auto:
        @staticmethod
        def from_pretrained(*a, **k):
            raise RuntimeError("operator torchvision::nms does not exist")

    fake = types.ModuleType("transformers")
    fake.AutoModelForVision2Seq = fake.AutoProcessor = Auto
    monkeypatch.setitem(sys.modules, "transformers", fake)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OpenVLAUnavailable, match="torchvision matching torch"):
        OpenVLABackend.load({"path": str(tmp_path), "dtype": "fp32"})


# ----------------------------------------------------------------------------- issue 26.6: the model where it is


def hub_cache(cache, repo="openvla/openvla-7b", sha="abc123", cfg=None):
    """An HF hub cache layout: {cache}/models--org--name/snapshots/<sha>/ (+ refs/main = sha), with the
    model's files (model_dir's) when cfg is given, else config.json only."""
    from pathlib import Path

    repo_dir = Path(cache) / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / sha
    if cfg is not None:
        model_dir({**cfg, "model": {**cfg["model"], "path": str(snap)}})
    else:
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return repo_dir, snap


def test_a_hub_id_resolves_in_place_in_a_given_hf_cache(tmp_path):
    from vlaforget.models.openvla import OpenVLAUnavailable, resolve_model_path

    cache = tmp_path / "hf_cache"
    repo_dir, snap = hub_cache(cache, "org/name", "abc")
    assert resolve_model_path("org/name", str(cache)) == snap  # the cache's own snapshot, not a copy
    assert resolve_model_path(str(repo_dir)) == snap  # model.path = the cache's repo folder
    with pytest.raises(OpenVLAUnavailable, match="model.cache_dir"):
        resolve_model_path("org/name", str(tmp_path / "empty_cache"))
    assert sorted(p.name for p in cache.iterdir()) == ["models--org--name"]  # nothing written next to it


def test_the_users_existing_cache_is_read_in_place(tmp_root, good_stack, libero_ok):
    """model.cache_dir = the user's openvla_icms/hf_cache: preflight finds openvla-7b there, the stage
    configs read it from there, nothing goes to {root}/hf_cache, and no id changes."""
    from vlaforget import stageconfig as vsc
    from vlaforget import study as vfs

    allowed = tmp_root.parent
    user_cache = allowed / "openvla_icms" / "hf_cache"
    over = {"data": {"rlds_dir": str(allowed / "rlds")}, "model": {"path": "openvla/openvla-7b"}}
    plain = load_config(REPO / "config" / "config.yaml", overrides=over)
    cfg = load_config(
        REPO / "config" / "config.yaml",
        overrides={**over, "model": {**over["model"], "cache_dir": str(user_cache)}},
    )
    _, snap = hub_cache(user_cache, cfg=cfg)
    rlds(cfg)
    rep = P.preflight(cfg)
    assert rep.problems == [], rep.message()
    assert any(f"read in place from {snap}" in n for n in rep.notes)
    assert P.preflight(plain).problems != []  # without the key: not in {root}/hf_cache
    assert not (tmp_root / "hf_cache").exists()
    run = vfs.run_name("icsm_hsw_thermostat", "libero_spatial_no_noops", "full", 42)
    for stage, key in (("model", "openvla-7b"), ("probe", "x"), ("train", run)):
        sc = vsc.stage_config(cfg, stage, key)
        if "model" in sc:
            assert sc["model"]["cache_dir"] == str(user_cache)
    assert vsc.stage_config(cfg, "train", run)["run_id"] == vsc.stage_config(plain, "train", run)["run_id"]
