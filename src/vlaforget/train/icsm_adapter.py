"""The view of the ICSM artifacts that the HSW and Thermostat plug-ins use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.icsm import IcsmArtifacts, load_icsm


@dataclass
class IcsmView:
    art: IcsmArtifacts

    @classmethod
    def load(cls, d) -> "IcsmView":
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
