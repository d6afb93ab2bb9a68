"""User-facing exception classes for the `sd` package.

Every error a user can cause (bad config, bad checkpoint, an attention backend or torch.compile that this
machine cannot run) is an `SDError` whose message is one paragraph naming the problem and the fix. The CLI
prints `error: <message>` without a traceback and exits with status 2.
"""

from __future__ import annotations


class SDError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ConfigError(SDError):
    """A model config (LDM YAML or preset name) that cannot be read or is not SD 2.1-shaped."""


class CheckpointError(SDError):
    """A checkpoint file that cannot be read or does not match the model (missing, extra, misshapen keys)."""


class AttentionUnavailable(SDError):
    """An attention backend that is unknown or cannot run on this machine/device/dtype."""


class CompileUnavailable(SDError):
    """torch.compile was asked for but this PyTorch cannot provide it (or the mode is unknown)."""
