"""Start a run from a LoRA adapter the user already has (train.init_adapter, train.init_step).

The user's own finetune.py (eggplantsalt/icms) resumes with `resume_adapter_dir` /
`resume_global_step`: `PeftModel.from_pretrained(vla, dir, is_trainable=True)`, and, where the folder
holds its `trainer_state.pt` ({"global_step", "optimizer", "scheduler"}), AdamW's state. Here the
adapter's weights are loaded into the run's own LoRA (train.lora), which must have the adapter's
shape: the same rank, alpha and adapted modules (read from the adapter's weight file, so an adapter
saved with `target_modules="all-linear"` and one saved with module names compare alike), on the same
base model. A mismatch is refused naming both sides.

What is restored from trainer_state.pt: AdamW's per-parameter moments (exp_avg, exp_avg_sq, step),
checked tensor by tensor against the run's LoRA parameters. Not restored: its learning rate and
scheduler (the run's schedule continues from init_step, train/schedule.py), its betas / eps /
weight decay (the run's config), the data order (a fresh sampler), fp16 loss scale.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError

log = logging.getLogger("vlaforget.train")

TRAINER_STATE = "trainer_state.pt"  # the user's finetune.py: {"global_step", "optimizer", "scheduler"}
_PREFIX, _LORA = "base_model.model.", re.compile(r"\.lora_([AB])(?:\.[^.]+)?\.weight$")


def short_model_name(name: Any) -> str | None:
    """'openvla-7b' for 'openvla/openvla-7b', '/x/openvla-7b', '.../models--openvla--openvla-7b/
    snapshots/<sha>' (the HF hub cache layout); None for no name."""
    if not name:
        return None
    s = str(name).rstrip("/")
    m = re.search(r"models--[^/]+?--([^/]+?)(?:/snapshots/[^/]+)?$", s)
    return (m.group(1) if m else s.rsplit("/", 1)[-1]).lower() or None


def adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    return load_peft_weights(str(adapter_dir), device="cpu")


def lora_modules(keys) -> dict[str, dict[str, str]]:
    """{module name: {"A": key, "B": key}} of PEFT LoRA weight keys (the adapter file's, without the
    adapter name, or the run's named_parameters, with it)."""
    out: dict[str, dict[str, str]] = {}
    for k in keys:
        m = _LORA.search(k)
        if not m:
            continue
        mod = k[: m.start()]
        mod = mod.removeprefix(_PREFIX)
        out.setdefault(mod, {})[m.group(1)] = k
    return out


def _examples(names, n=3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def check_and_load(model, adapter_dir: str | Path, model_block: dict) -> dict:
    """Load the adapter at adapter_dir into `model`'s LoRA (a PeftModel with adapter "default"),
    refusing a different base model or LoRA shape. Returns what was loaded (for done.json)."""
    from peft.utils import set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise TrainingError(
            f"train.init_adapter {adapter_dir} holds no PEFT adapter (adapter_config.json missing)"
        )
    have = json.loads(cfg_file.read_text())
    want = model.peft_config["default"]
    where = f"train.init_adapter {adapter_dir}"

    # the base model: the adapter's base_model_name_or_path against this run's model
    base = have.get("base_model_name_or_path")
    ours = {
        short_model_name(model_block.get("path")),
        short_model_name(model_block.get("base")),
        short_model_name(getattr(getattr(model, "config", None), "_name_or_path", None)),
    } - {None}
    if base and ours and short_model_name(base) not in ours:
        raise TrainingError(
            f"{where} was trained on base model '{base}'; this run's model is "
            f"'{model_block.get('path')}' (model.base {model_block.get('base')}): set "
            "model.path to the adapter's base, or train.init_adapter to an adapter of this model"
        )
    # rank and alpha (the LoRA scaling alpha / r)
    if int(have.get("r", -1)) != int(want.r):
        raise TrainingError(
            f"{where} has LoRA rank r={have.get('r')}; this run's train.lora.r is {want.r}: "
            f"set train.lora.r: {have.get('r')} (the adapter's rank)"
        )
    if float(have.get("lora_alpha", -1)) != float(want.lora_alpha):
        raise TrainingError(
            f"{where} has lora_alpha={have.get('lora_alpha')}; this run's train.lora.alpha is "
            f"{want.lora_alpha}: set train.lora.alpha: {have.get('lora_alpha')}"
        )
    # the adapted modules, from the weights themselves
    state = adapter_weights(adapter_dir)
    theirs = lora_modules(state)
    mine = lora_modules(n for n, _ in model.named_parameters())
    missing, extra = set(mine) - set(theirs), set(theirs) - set(mine)
    if missing or extra:
        raise TrainingError(
            f"{where} adapts {len(theirs)} modules, this run's LoRA (train.lora) adapts {len(mine)}: only in "
            f"the adapter: {_examples(extra) or 'none'}; only in this run: "
            f"{_examples(missing) or 'none'}. Set train.lora.targets / layers to the adapter's modules "
            "(the user's finetune.py, target_modules='all-linear' under peft 0.11.1, = attn, mlp, vision, "
            "projector, lm_head, patch_embed)"
        )
    params = dict(model.named_parameters())
    for mod, ab in mine.items():
        for side, key in ab.items():
            got = state[theirs[mod][side]].shape
            if tuple(got) != tuple(params[key].shape):
                raise TrainingError(
                    f"{where}: {mod}.lora_{side} has shape {tuple(got)} in the adapter, "
                    f"{tuple(params[key].shape)} in this run: the adapter was trained on another "
                    f"base model ('{base}') than this run's '{model_block.get('path')}'"
                )
    res = set_peft_model_state_dict(model, state)
    miss = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    if miss:
        raise TrainingError(f"{where}: {len(miss)} LoRA weights were not loaded (e.g. {miss[0]})")
    log.info(
        "init adapter: LoRA loaded from %s (r=%s, %d modules, base %s)", adapter_dir, want.r, len(mine), base
    )
    return {"dir": str(adapter_dir), "r": int(want.r), "modules": len(mine), "base_model": base}


def read_trainer_state(adapter_dir: str | Path) -> dict | None:
    p = Path(adapter_dir) / TRAINER_STATE
    if not p.is_file():
        return None
    return torch.load(p, map_location="cpu", weights_only=True)


def init_step_of(ts, adapter_dir: str | Path | None, trainer_state: dict | None) -> int:
    """train.init_step, or (null) the trainer_state.pt's global_step as the user's run_method_train.sh
    takes it, else 0. A given step that differs from the file's is used, with a warning (finetune.py's)."""
    saved = None if trainer_state is None else trainer_state.get("global_step")
    if ts.init_step is None:
        return int(saved or 0)
    if saved is not None and int(saved) != int(ts.init_step):
        log.warning(
            "train.init_step %d differs from %s/%s global_step %d: using %d",
            ts.init_step,
            adapter_dir,
            TRAINER_STATE,
            int(saved),
            ts.init_step,
        )
    return int(ts.init_step)


def restore_optimizer(optimizer, params: list[torch.Tensor], trainer_state: dict, adapter_dir) -> int:
    """AdamW's moments from the user's trainer_state.pt into `optimizer` (over `params`, the run's
    LoRA parameters in model order, as finetune.py builds its AdamW), keeping this run's lr, betas,
    eps and weight decay. Returns the number of parameter states restored."""
    saved = trainer_state.get("optimizer") or {}
    st, groups = saved.get("state") or {}, saved.get("param_groups") or []
    ids = [i for g in groups for i in g.get("params", [])]
    where = f"{adapter_dir}/{TRAINER_STATE}"
    if len(ids) != len(params):
        raise TrainingError(
            f"{where}: its optimizer holds {len(ids)} parameters, this run trains {len(params)} "
            "LoRA tensors: it belongs to another LoRA shape; remove the file to start the "
            "optimizer fresh (the adapter's weights are still loaded)"
        )
    for n, (i, p) in enumerate(zip(ids, params)):
        s = st.get(i)
        for k in ("exp_avg", "exp_avg_sq"):
            if s is not None and k in s and tuple(s[k].shape) != tuple(p.shape):
                raise TrainingError(
                    f"{where}: optimizer state {n} ({k}) has shape {tuple(s[k].shape)}, the run's "
                    f"parameter {n} {tuple(p.shape)}: the parameter order or shapes differ; "
                    "remove the file to start the optimizer fresh"
                )
    keep = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    ours = optimizer.state_dict()
    flat = [i for g in ours["param_groups"] for i in g["params"]]
    optimizer.load_state_dict(
        {
            "state": {flat[n]: st[i] for n, i in enumerate(ids) if i in st},
            "param_groups": ours["param_groups"],
        }
    )
    for g, k in zip(optimizer.param_groups, keep):  # this run's hyper-parameters, not the file's
        g.update(k)
    log.info(
        "init adapter: AdamW moments of %d tensors restored from %s (lr, schedule and "
        "hyper-parameters are this run's)",
        sum(i in st for i in ids),
        where,
    )
    return sum(i in st for i in ids)
