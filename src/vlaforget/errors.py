"""The user-facing error types: one base class, `UserError`, that the CLI catches and prints as
`vlaforget <stage>: error: <message>` (exit 2, no traceback). Every subclass's message names the
cause and the fix. Each also keeps the builtin base it always had (ValueError, FileNotFoundError,
RuntimeError), so `except ValueError` sites keep working.

The base layer: this module imports nothing of vlaforget. Error types that belong to one package
(PathPolicyError in paths.py, RolloutError in eval/rollout.py, ...) stay
there and subclass UserError; the ones shared by several packages live here.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing piece the user can fix; the message says how."""

    user_facing = True  # kept for code that still asks getattr(e, "user_facing")


class ConfigError(UserError, ValueError):
    """The study config is invalid; the message names the key and the fix (config.py raises it)."""


class TrainingError(UserError, RuntimeError):
    """A training run cannot continue (diverged, a bad resume, a method that cannot apply); the
    message names the fix (train/ raises it)."""


class MissingInput(UserError, FileNotFoundError):
    """An upstream artifact is missing; the message names the stage to run."""


class MethodConfigError(UserError, ValueError):
    """A method setting does not fit the model / data; the message names the key and the fix."""
