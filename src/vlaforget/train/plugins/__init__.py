"""Method plug-ins for the one training loop: HSW (gradient surgery), Thermostat (closed-loop β/γ),
CRaFT (retention loss + dual variable + conflict projection).

The loop calls start(step) once before the first optimizer step, then, in order, for each step:
    extra_losses(batch, out)   -> dict of added loss terms (per micro-batch)
    backward(losses, scale)    -> True if the plug-in did the backward pass itself
    before_step()              -> after all micro-batches' backward, before the NaN guard
    overflowed()               -> True if the plug-in's own backward overflowed (fp16): step skipped
    every_step(step)           -> after the optimizer step (periodic controllers)
    logs(), annotate(rec)      -> scalars for metrics.jsonl / W&B; then a last look at the record
and state_dict()/load_state_dict() for exact resume. With no plug-in enabled the loop is the
baseline; the math lives in vlaforget.methods (unit-tested there).

Plug-ins never name or write each other: they talk through the loop-owned context only.
`ctx.gains` (Gains) carries the HSW gains a controller wants (the Thermostat posts, HSW adopts them
before its next use); `side_pass(plugins, owner)` tells the others that `owner` runs a backward of
its own (CRaFT's retention gradient), and a plug-in that shapes gradients (`shapes_gradients`,
HSW) stands aside meanwhile (`side_backward(True/False)`).

One module per plug-in, `train/plugins/<name>.py`, named like its block of the method config
(`method.<name>.enabled`); each defines `build(ctx, sc, given, train_ds, shared)` -> the plug-in.
The loop loads only the enabled ones (by name, `load`), so a plug-in's code is part of the code
hash of exactly the runs that enable it (codedeps.code_hash; docs/DEVELOPMENT.md).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Gains:
    """The gradient-surgery gains (β, γ) a controller asks for, owned by the loop: `post` bumps
    `version`; a consumer adopts a version it has not seen yet (HSW: at its next forward / log)."""

    beta: float | None = None
    gamma: float | None = None
    version: int = 0

    def post(self, beta: float, gamma: float) -> None:
        self.beta, self.gamma, self.version = float(beta), float(gamma), self.version + 1


@dataclass
class TrainContext:
    backend: Any
    model: torch.nn.Module  # PEFT (and maybe DDP) wrapped
    device: torch.device
    stage_cfg: dict
    trainable: list  # [(name, param)] in a fixed order
    autocast: Any  # callable returning an autocast context
    world_size: int = 1
    rank: int = 0
    plugins: dict = field(default_factory=dict)
    log_step: bool = True  # whether the current step is logged (statistics cost host syncs)
    scaler: Any = None  # torch.amp.GradScaler when the loop scales losses (fp16), else None
    gains: Gains = field(default_factory=Gains)  # the controller's wanted HSW gains (Thermostat -> HSW)


class Plugin:
    name = "plugin"
    shapes_gradients = False  # True: hooks rewrite the action gradient in backward (HSW); see side_pass

    def forward(self, batch, model, last: bool) -> Any:
        """Run the micro-batch's forward itself (e.g. CRaFT's fused task + anchor forward) and return
        an object with .logits for the task rows, or None for the loop's plain forward. `last`: the
        step's last micro-batch."""
        return None  # subclasses return an output

    def backward(self, losses: dict, scale: float) -> bool:
        """Run the micro-batch's backward itself (CRaFT fused: L_act * scale + L_ret in one pass);
        True when done, False for the loop's plain backward of losses["act"] * scale."""
        return False

    def start(self, step: int) -> None:
        """Once, after resume and before the first optimizer step of this process (e.g. the
        Thermostat's calibration)."""

    def before_step(self) -> None:
        """After all micro-batches' backward (grads unscaled), before the NaN guard and optimizer."""

    def overflowed(self) -> bool:
        """After before_step: True when this plug-in's own backward overflowed under fp16 loss scaling
        (the loop then skips the step and backs the scale off). Clears the flag."""
        return False

    def side_backward(self, on: bool) -> None:
        """Another plug-in starts (on) / ends a backward of its own (not the action loss's, e.g.
        CRaFT's retention gradient): a plug-in that shapes gradients stands aside meanwhile."""

    def skip_step(self) -> None:
        """The step was skipped by the NaN guard."""

    def every_step(self, step: int) -> None:
        pass

    def logs(self) -> dict:
        return {}

    def annotate(self, rec: dict) -> None:
        """The step's logged record after every plug-in's logs(): add fields derived from the loop's
        own (e.g. CRaFT's L_act = train_loss)."""

    def dry_logs(self) -> dict:
        """Statistics of a dry-run batch (train.dry_run_batches: no optimizer step, no every_step)."""
        return self.logs()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def side_pass(plugins: dict, owner: Plugin):
    """While `owner` runs a backward of its own, every other plug-in is told (side_backward)."""
    others = [p for p in plugins.values() if p is not owner]
    for p in others:
        p.side_backward(True)
    try:
        yield
    finally:
        for p in others:
            p.side_backward(False)


def forward_micro(plugins: dict, backend, batch, model, last: bool):
    """The micro-batch's forward: the first plug-in that runs it itself (CRaFT fused), else the plain one."""
    for p in plugins.values():
        out = p.forward(batch, model, last)
        if out is not None:
            return out
    return backend.forward(batch, model=model)


def module_name(name: str) -> str:
    return f"{__name__}.{name}"


def load(name: str):
    """The module of plug-in `name` (train/plugins/<name>.py)."""
    return importlib.import_module(module_name(name))


def enabled(method_cfg: dict) -> list[str]:
    """Names of the plug-ins a method config enables, in the config's block order."""
    return [k for k, v in (method_cfg or {}).items() if isinstance(v, dict) and v.get("enabled")]


_CLASSES = {"HSWPlugin": "hsw", "ThermostatPlugin": "thermostat", "CraftPlugin": "craft"}


def __getattr__(attr: str):  # `from vlaforget.train.plugins import HSWPlugin` (tests, notebooks)
    if attr in _CLASSES:
        return getattr(load(_CLASSES[attr]), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
