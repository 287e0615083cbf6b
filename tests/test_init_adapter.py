"""train.init_adapter / train.init_step (issue 26.5): a run starts from a LoRA adapter the user already
has, written by plain `peft` as the user's finetune.py writes it (with its trainer_state.pt): the
weights load before step 1, training continues from init_step with the schedule at that step and
AdamW's moments restored, a different LoRA rank or base model is refused naming both, and the
adapter files' hash is in the run id."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import base_stage, make_cache, make_model, run_metrics

from vlaforget.errors import TrainingError
from vlaforget.train.loop import run_training

# the modules train.lora targets [attn, mlp] adapts, spelt as plain peft takes them (a regex; the run
# names each module: the check compares the adapted modules, not the spelling)
SHORT_TARGETS = r".*language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def user_adapter(model_dir: Path, out: Path, r=4, alpha=8, global_step=3, seed=0) -> Path:
    """A LoRA adapter saved by plain peft (get_peft_model(...).save_pretrained) on the tiny model, with
    non-zero lora_B (trained-like) and finetune.py's trainer_state.pt after a few AdamW steps."""
    from peft import LoraConfig, get_peft_model

    from vlaforget.models.tiny import TinyBackend

    torch.manual_seed(seed)
    b = TinyBackend.from_dir(str(model_dir))
    pm = get_peft_model(
        b.model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=SHORT_TARGETS,
            init_lora_weights="gaussian",
        ),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        sched.step()
    pm.save_pretrained(str(out))
    torch.save(
        {"global_step": global_step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        out / "trainer_state.pt",
    )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("init") / "data" / "vlaforget"
    root.mkdir(parents=True)
    cache, model = make_cache(root), make_model(root)
    adapter = user_adapter(model, root.parent / "user_adapter")
    return root, cache, model, adapter


def stage(world, name, **train):
    root, cache, model, _ = world
    sc = base_stage(root, cache, model, **train)
    sc.update(out_dir=str(root / "runs" / name), run_id=f"{name}-id")
    return sc


def test_plain_peft_adapter_loads_before_step_1_and_the_run_continues_from_its_step(world):
    from safetensors.torch import load_file

    adapter = world[3]
    # lr 0: the final adapter is exactly the loaded one (AdamW with lr 0 moves nothing)
    sc = stage(world, "lr0", init_adapter=str(adapter), lr=0.0)
    done = run_training(sc)
    want = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(Path(sc["out_dir"]) / "final" / "adapter_model.safetensors"))
    assert set(got) == set(want) and len(want) == 2 * 7 * 8  # A and B of 7 modules x 8 decoder layers
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # init_step null = trainer_state.pt's global_step (3): steps 4..6 of 6 ran
    assert done["init_adapter"]["init_step"] == 3 and done["steps"] == 6
    assert [r["step"] for r in run_metrics(sc) if "train_loss" in r] == [4, 5, 6]
    n_lora = len(want)
    assert done["init_adapter"]["optimizer_states_restored"] == n_lora

    # lr > 0: it trains on from the adapter
    sc2 = stage(world, "trains", init_adapter=str(adapter), lr=1e-2, init_step=2)
    done2 = run_training(sc2)
    got2 = load_file(str(Path(sc2["out_dir"]) / "final" / "adapter_model.safetensors"))
    assert any(not torch.equal(got2[k], want[k]) for k in want)
    assert done2["init_adapter"]["init_step"] == 2 and next(r["step"] for r in run_metrics(sc2)) == 3


def test_first_loss_is_the_adapters_not_a_fresh_loras(world):
    """The adapter's weights are in the forward of step 1: its first loss differs from a fresh
    LoRA's (lora_B = 0: the base model's loss)."""
    init = stage(world, "first_init", init_adapter=str(world[3]), lr=0.0, max_steps=4)
    fresh = stage(world, "first_fresh", lr=0.0, max_steps=1)
    run_training(init)
    run_training(fresh)
    assert run_metrics(init)[0]["train_loss"] != run_metrics(fresh)[0]["train_loss"]


def test_optimizer_moments_are_restored_exactly(world):
    from peft import LoraConfig, get_peft_model

    from vlaforget.models.tiny import TinyBackend
    from vlaforget.train.init_adapter import read_trainer_state, restore_optimizer

    adapter = world[3]
    b = TinyBackend.from_dir(str(world[2]))
    pm = get_peft_model(b.model, LoraConfig(r=4, lora_alpha=8, target_modules=SHORT_TARGETS))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.8, 0.9))
    ts = read_trainer_state(adapter)
    assert restore_optimizer(opt, params, ts, adapter) == len(params)
    saved = ts["optimizer"]["state"]
    for i, p in enumerate(params):
        assert torch.equal(opt.state[p]["exp_avg"], saved[i]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg_sq"], saved[i]["exp_avg_sq"])
    assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[0]["betas"] == (0.8, 0.9)  # this run's
    with pytest.raises(TrainingError, match="optimizer holds"):
        restore_optimizer(torch.optim.AdamW(params[:-1], lr=1.0), params[:-1], ts, adapter)


def test_a_wrong_rank_is_refused_naming_both(world):
    sc = stage(world, "wrong_rank", init_adapter=str(world[3]))
    sc["train"]["lora"] = {**sc["train"]["lora"], "r": 8}
    with pytest.raises(TrainingError) as e:
        run_training(sc)
    msg = str(e.value)
    assert "r=4" in msg and "train.lora.r is 8" in msg and str(world[3]) in msg


def test_other_targets_and_another_base_model_are_refused(world, tmp_path):
    sc = stage(world, "wrong_targets", init_adapter=str(world[3]))
    sc["train"]["lora"] = {**sc["train"]["lora"], "targets": ["attn"]}
    with pytest.raises(TrainingError, match=r"adapts 56 modules, this run's LoRA \(train.lora\) adapts 32"):
        run_training(sc)
    other = tmp_path / "other_base"
    shutil.copytree(world[3], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "openvla/openvla-7b"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainingError) as e:
        run_training(stage(world, "wrong_base", init_adapter=str(other)))
    assert "'openvla/openvla-7b'" in str(e.value) and str(world[2]) in str(e.value)


def test_init_step_not_below_max_steps_is_refused(world):
    with pytest.raises(TrainingError, match="not below train.max_steps"):
        run_training(stage(world, "too_far", init_adapter=str(world[3]), init_step=6))


def test_the_run_id_follows_the_adapter_files_not_their_place(demo_config, tmp_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlaforget import config as vfc
    from vlaforget import stageconfig as vsc
    from vlaforget import study as vfs

    make_model(tmp_root)
    adapter = user_adapter(tmp_root / "models" / "tiny", tmp_root.parent / "adapters" / "a")
    run = vfs.run_name("baseline", demo_config["study"]["suites"][0], "full", 42)

    def run_id(path):
        cfg = copy.deepcopy(demo_config)
        cfg["train"]["init_adapter"] = str(path)
        vfc.validate(cfg)
        return vsc.stage_config(cfg, "train", run)

    plain = vsc.stage_config(demo_config, "train", run)["run_id"]
    sc = run_id(adapter)
    assert sc["run_id"] != plain and set(sc["init_adapter_files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.pt",
    }
    moved = tmp_root.parent / "adapters" / "moved"
    shutil.copytree(adapter, moved)
    assert run_id(moved)["run_id"] == sc["run_id"]  # same files elsewhere: same run
    w = load_file(str(moved / "adapter_model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1e-3
    save_file(w, str(moved / "adapter_model.safetensors"))
    assert run_id(moved)["run_id"] != sc["run_id"]  # changed weights: another run
    torch.save({"global_step": 7}, moved / "trainer_state.pt")
    ids = {run_id(moved)["run_id"], sc["run_id"]}
    assert len(ids) == 2
    with pytest.raises(vfc.ConfigError, match="train.init_adapter"):
        run_id(tmp_root.parent / "adapters" / "nowhere")


def test_the_users_all_linear_targets_train_on_the_tiny_model(world):
    """train.lora.targets lm_head and patch_embed (the two extra module kinds of the user's
    all-linear adapter): the LM head and the patch-embedding Conv2d get LoRA, and the loop trains them."""
    from safetensors.torch import load_file

    from vlaforget.models.tiny import TinyBackend

    b = TinyBackend.from_dir(str(world[2]))
    assert b.lora_targets(["lm_head", "patch_embed"]) == [
        "vision_backbone.embeddings.patch_embeddings.projection",
        "language_model.lm_head",
    ]
    assert not {"language_model.lm_head"} & set(b.lora_targets(["attn", "mlp", "vision", "projector"]))
    sc = stage(
        world,
        "all_linear",
        max_steps=3,
        lora={
            "r": 4,
            "alpha": 8,
            "dropout": 0.0,
            "layers": "all",
            "targets": ["attn", "mlp", "vision", "projector", "lm_head", "patch_embed"],
        },
    )
    run_training(sc)
    keys = load_file(str(Path(sc["out_dir"]) / "final" / "adapter_model.safetensors"))
    assert any("lm_head.lora_B" in k for k in keys) and any(
        "patch_embeddings.projection.lora_A" in k for k in keys
    )
    b0 = keys[next(k for k in keys if "lm_head.lora_B" in k)]
    assert b0.abs().sum() > 0  # trained from lora_B = 0
