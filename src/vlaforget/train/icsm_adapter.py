"""The view of the ICSM artifacts that the HSW and Thermostat plug-ins use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.icsm import IcsmArtifacts, load_icsm


@dataclass
class IcsmView:
    art: IcsmArtifacts

    @classmethod
    def load(cls, d) -> "IcsmView":  # noqa: UP037 (quotes kept: unquoting changes the code hash)
        return cls(load_icsm(d))

    @property
    def rep_layers(self) -> list[int]:
        return self.art.reps

    @property
    def C_T(self) -> dict[int, torch.Tensor]:
        return {r: self.art.layers[r].C_T for r in self.art.reps}

    @property
    def basis(self) -> dict[int, torch.Tensor]:
        return {r: self.art.layers[r].U for r in self.art.reps}

    def layer_bases(self, variant: str, num_layers: int, sensitivity: bool = True) -> dict:
        """decoder layer -> (U_f, U_p) of its group's representative layer."""
        out = {}
        for g in self.art.hook_groups(variant, num_layers).values():
            uf, up = self.art.subspaces(int(g["rep"]), use_sensitivity_order=sensitivity)
            for layer in g["layers"]:
                out[int(layer)] = (uf, up)
        return out


def icsm_for_run(sc: dict, given: dict, train_ds, shared: dict):
    """(IcsmView, probe or None) of a run whose method uses ICSM (HSW, Thermostat), loaded once per
    run (`shared`). Checks, before the first step, that the probe is not in the run's training data."""
    from pathlib import Path

    if "icsm" in shared:
        return shared["icsm"], shared.get("probe")
    if not sc.get("icsm_dir") or not (Path(sc["icsm_dir"]) / "meta.json").exists():
        from ..errors import TrainingError

        raise TrainingError(
            f"method '{sc['method_name']}' needs the ICSM artifacts at {sc.get('icsm_dir')}"
            " (meta.json missing): run the icsm rule first"
        )
    shared["icsm"] = IcsmView.load(sc["icsm_dir"])
    if "probe_samples" not in given and sc.get("probe_dir"):
        from ..data.probe import check_not_trained_on, load_probe

        shared["probe"] = load_probe(sc["probe_dir"])
        if getattr(train_ds, "cache_dir", None) is not None:
            check_not_trained_on(
                shared["probe"], train_ds
            )  # ICSM statistics and drift on data no run trains on
    return shared["icsm"], shared.get("probe")
