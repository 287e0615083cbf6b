"""config/user_recipe.yaml (issue 26.4) reproduces the user's last OpenVLA-7B run on the 4090 and
v100x8 profiles: every setting of the user's config (tests/data/user_method_icsm_hsw_thermostat.yaml,
verbatim from eggplantsalt/icms) and of its launcher profile (scripts/run_method_train.sh) is compared
with what the train job of that run reads -- its stage config, resolved from config/config.yaml, the
profile's overlay and the recipe, as the workflow resolves it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from vlaforget import config as vfc
from vlaforget import stageconfig as vsc
from vlaforget import study as vfs

USER = yaml.safe_load((Path(__file__).parent / "data" / "user_method_icsm_hsw_thermostat.yaml").read_text())
# scripts/run_method_train.sh: what the launcher passes over the config, per server_profile
LAUNCHER = {
    "4090_1gpu": {
        "nproc": 1,
        "batch_size": 2,
        "grad_accum": 4,
        "probe_batch": 4,
        "thermo_update": 50,
        "thermo_warmup": 100,
    },
    "v100_8gpu": {
        "nproc": 8,
        "batch_size": 1,
        "grad_accum": 8,
        "probe_batch": 4,
        "thermo_update": 200,
        "thermo_warmup": 100,
    },
}
RUN = vfs.run_name("icsm_hsw_thermostat", USER["dataset_name"], "full", 42)
# keys config/user_recipe.yaml expects issue 26.1 (HSW) / 26.2 (Thermostat) to add: checked once the
# schema has them, listed as pending until then
PENDING = {"hsw": ("layers",), "thermostat": ("warmup_steps", "k_beta", "k_gamma", "base_scale")}


def expected(launcher: dict) -> dict:
    """The user's run as this project's keys (dotted; `method.*` = the run's method blocks)."""
    return {
        "train.lora.r": USER["lora_rank"],
        "train.lora.dropout": USER["lora_dropout"],
        "train.lora.alpha": min(USER["lora_rank"], 16),  # finetune.py: lora_alpha=min(lora_rank, 16)
        # target_modules="all-linear" as peft 0.11.1 resolves it on OpenVLA (tests/test_openvla_backend.py)
        "train.lora.targets": ["attn", "mlp", "vision", "projector", "lm_head", "patch_embed"],
        "train.lora.layers": "all",
        "train.lr": float(USER["learning_rate"]),
        "train.lr_schedule": USER["lr_scheduler"],
        "train.min_lr": float(USER["min_learning_rate"]),
        "train.warmup_steps": USER["lr_warmup_steps"],
        "train.weight_decay": 0.01,  # torch.optim.AdamW's default (finetune.py passes only lr)
        "train.max_grad_norm": None,
        "train.batch_size": launcher["batch_size"],
        "train.grad_accum": launcher["grad_accum"],
        "train.nproc": launcher["nproc"],
        "train.max_steps": USER["max_steps"],
        "train.save_steps": USER["save_steps"],
        "train.image_aug": USER["image_aug"],
        "train.eval_every": USER["eval_every_steps"] if USER["enable_periodic_eval"] else 0,
        "train.eval_episodes_per_task": USER["eval_num_trials_per_task"],
        "periodic_eval.center_crop": USER["eval_center_crop"],
        "periodic_eval.suite": USER["dataset_name"],
        "train.early_stopping_patience": USER["early_stopping_patience"]
        if USER["early_stopping_enabled"]
        else 0,
        # the user's min_delta is in percentage points of success rate (success_rate parsed from
        # "(x%)"); periodic_evaluator here returns a fraction
        "train.early_stopping_min_delta": USER["early_stopping_min_delta"] / 100.0,
        "suite": USER["dataset_name"],
        "probe.dataset": USER["probe_dataset_name"],
        "method.hsw.enabled": USER["method_enabled"],
        "method.thermostat.enabled": USER["method_enabled"],
        "method.hsw.beta": USER["hsw_beta"],
        "method.hsw.gamma": USER["hsw_gamma"],
        "method.hsw.eps": float(USER["hsw_eps"]),
        "method.hsw.layers": USER["hsw_layer_ids"],
        "method.thermostat.every": launcher["thermo_update"],
        "method.thermostat.probe_batch": launcher["probe_batch"],
        "method.thermostat.warmup_steps": launcher["thermo_warmup"],
        "method.thermostat.beta_min": USER["thermostat_min_beta"],
        "method.thermostat.beta_max": USER["thermostat_max_beta"],
        "method.thermostat.gamma_min": USER["thermostat_min_gamma"],
        "method.thermostat.gamma_max": USER["thermostat_max_gamma"],
        "method.thermostat.k_beta": USER["thermostat_k_beta"],
        "method.thermostat.k_gamma": USER["thermostat_k_gamma"],
        "method.thermostat.base_scale": USER["thermostat_base_scale"],
        "model.cache_dir": USER["cache_dir"],
    }


def schema_method_keys() -> dict[str, set]:
    s = yaml.safe_load(vfc.SCHEMA_PATH.read_text())["definitions"]["method"]["properties"]
    return {b: set(s[b]["properties"]) for b in ("hsw", "thermostat")}


def resolve(files: list[str]) -> tuple[dict, dict, list[str]]:
    """(study config, the user's run's train stage config, pending keys): config/config.yaml + files, as
    the workflow merges them; keys of PENDING the schema does not know yet are left out and named."""
    cfg: dict = {}
    for f in ["config.yaml", *files]:
        cfg = vfc.deep_merge(cfg, vfc.load_yaml(REPO / "config" / f, yaml12_floats=True))
    known, pending = schema_method_keys(), []
    for name, m in cfg["methods"].items():
        for block, keys in PENDING.items():
            for k in keys:
                if k in (m.get(block) or {}) and k not in known[block]:
                    del m[block][k]
                    pending.append(f"methods.{name}.{block}.{k}")
    vfc.validate(cfg)
    return cfg, vsc.stage_config(cfg, "train", RUN), sorted(set(pending))


def value(cfg: dict, sc: dict, dotted: str):
    if dotted == "probe.dataset":
        return cfg["probe"]["dataset"]
    if dotted == "model.cache_dir":
        return cfg["model"]["cache_dir"]
    node = sc
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.fixture
def real_env(monkeypatch):
    monkeypatch.setenv("VLAFORGET_ALLOWED_ROOT", "/opt/data/private")
    monkeypatch.setenv("VLAFORGET_ROOT", "/opt/data/private/vlaforget")


def mismatches(cfg: dict, sc: dict, pending: list[str], want: dict) -> dict:
    """{key: (resolved, user's)} for every expected key that differs (pending keys left out)."""
    wrong = {}
    for key, v in want.items():
        if any(key == "method." + p.split(".", 2)[2] for p in pending):
            continue
        got = value(cfg, sc, key)
        ok = (
            got == pytest.approx(v, rel=1e-12) if isinstance(v, float) or isinstance(got, float) else got == v
        )
        if not ok:
            wrong[key] = (got, v)
    return wrong


CASES = [
    (["profile_4090.yaml", "user_recipe.yaml"], "4090_1gpu"),
    (["profile_v100x8.yaml", "user_recipe.yaml"], "4090_1gpu"),  # the user's 4090 run on a V100 per run
    (["profile_v100x8.yaml", "user_recipe.yaml", "user_recipe_v100x8.yaml"], "v100_8gpu"),
]


@pytest.mark.parametrize("files,launcher", CASES)
def test_the_recipe_resolves_to_the_users_run(real_env, files, launcher):
    cfg, sc, pending = resolve(files)
    wrong = mismatches(cfg, sc, pending, expected(LAUNCHER[launcher]))
    assert not wrong, f"resolved != the user's run (key: (resolved, user's)): {wrong}"
    assert sc["method_name"] == "icsm_hsw_thermostat" and sc["train"]["max_steps"] == 10000
    # the resolved config is what the job reads: the typed settings accept it
    from vlaforget.settings import MethodSettings, TrainSettings

    TrainSettings.of(sc["train"])
    if not pending:
        MethodSettings.of(sc["method"])
    # precision is the profile's: bf16 as the user's on the 4090, fp16 (loss scaling) on a V100
    assert sc["train"]["precision"] == ("bf16" if "profile_4090.yaml" in files else "fp16")


@pytest.mark.parametrize("files,launcher", CASES[:1])
def test_the_method_keys_of_issue_26_1_and_26_2_are_known(real_env, files, launcher):
    """The recipe's HSW layer list and Thermostat warm-up / k / base_scale need the keys items 26.1 and
    26.2 add; until they are in the schema the test above leaves them out and this one names them."""
    _, _, pending = resolve(files)
    if pending:
        pytest.skip(
            f"not in the schema yet (26.1 / 26.2 add them; the values are checked once they are): {pending}"
        )


def test_a_recipe_that_drifts_from_the_user_fails(real_env, monkeypatch):
    """The comparison can fail: a recipe with one value off is named."""
    bad = yaml.safe_load((REPO / "config" / "user_recipe.yaml").read_text())
    bad["train"]["lr"] = 5e-4
    bad["train"]["early_stopping_min_delta"] = 0.1  # the user's number without the unit conversion
    real = vfc.load_yaml
    monkeypatch.setattr(
        vfc,
        "load_yaml",
        lambda p, yaml12_floats=False: (
            copy.deepcopy(bad) if Path(p).name == "user_recipe.yaml" else real(p, yaml12_floats)
        ),
    )
    cfg, sc, pending = resolve(["profile_4090.yaml", "user_recipe.yaml"])
    assert set(mismatches(cfg, sc, pending, expected(LAUNCHER["4090_1gpu"]))) == {
        "train.lr",
        "train.early_stopping_min_delta",
    }


def test_the_recipe_changes_the_runs_but_not_the_study_defaults(real_env):
    """The study's defaults stay (config/config.yaml); the recipe is a separate run id."""
    study, study_sc, _ = resolve(["profile_4090.yaml"])
    _, recipe_sc, _ = resolve(["profile_4090.yaml", "user_recipe.yaml"])
    t = study["train"]
    assert (t["lora"]["r"], t["lr"], t["lr_schedule"], t["max_steps"]) == (32, 5e-4, "constant", 20000)
    assert study_sc["run_id"] != recipe_sc["run_id"]


def test_the_user_maps_both_hsw_layers_to_group_b_and_last_two_resolves_at_any_depth():
    """finetune.py: `rep = rep_layers[0] if layer_id in group_a else rep_layers[-1]` with group_a =
    [L-4, L-3] (non-negative ids) -- hsw_layer_ids [-2, -1] are never in it, so both take group B's
    basis, which is right: layers[-2], layers[-1] are L-2 and L-1, group B. [-2, -1] resolves to
    the last two layers at OpenVLA-7B's 32 layers and at the tiny model's depth alike."""
    from vlaforget.methods.icsm import layer_groups

    for n_layers in (32, 8, 4):
        group_a, rep_layers = [n_layers - 4, n_layers - 3], [n_layers - 3, n_layers - 1]
        reps = {lid: (rep_layers[0] if lid in group_a else rep_layers[-1]) for lid in USER["hsw_layer_ids"]}
        assert reps == {-2: n_layers - 1, -1: n_layers - 1}
        resolved = [lid % n_layers for lid in USER["hsw_layer_ids"]]
        assert resolved == [n_layers - 2, n_layers - 1]
        assert layer_groups(n_layers)["B"] == {"layers": resolved, "rep": n_layers - 1}
