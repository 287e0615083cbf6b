"""Simulator wrappers with one small protocol: reset() -> obs, step(a) -> (obs, success, done).

`metaworld.MetaWorldEnv` is the embedded world (scripted experts, CPU rendering). Import it from
`vlaforget.envs.metaworld`; this package does not import MuJoCo eagerly.
Frames are decoded and resized by vlaforget.imaging.
"""

from __future__ import annotations
