"""Exception types of the core library.

Every error a user can cause derives from :class:`MopeqError` and carries a message that says what to do.
The service maps ``UserInputError`` subclasses to 4xx responses / failed jobs with that message.
"""

from __future__ import annotations


class MopeqError(Exception):
    """Base class of all errors raised by mopeq_core."""


class UserInputError(MopeqError):
    """Something the caller asked for cannot be done; the message says why and what to change."""


class ModelNotFoundError(UserInputError):
    """The model id or path does not resolve to a model."""


class UnsafeCheckpointError(UserInputError):
    """The checkpoint only has pickle weights (.bin/.pt); we load safetensors only."""


class RemoteCodeRequiredError(UserInputError):
    """The model needs ``trust_remote_code`` and the caller did not allow it."""


class NotMoEError(UserInputError):
    """The model has no Mixture-of-Experts layer to quantize."""


class UnsupportedArchitectureError(UserInputError):
    """transformers does not know the architecture, or its experts have a layout we cannot read."""


class InfeasibleBudgetError(UserInputError):
    """The requested budget is outside the feasible range; ``feasible`` holds (min, max)."""

    def __init__(self, message: str, feasible: tuple[float, float] | None = None, unit: str = ""):
        super().__init__(message)
        self.feasible = feasible
        self.unit = unit


class CalibrationDataError(UserInputError):
    """The calibration or evaluation file is missing, empty or malformed."""


class ArtifactError(MopeqError):
    """A quantized artifact is malformed, truncated or inconsistent; the message names the file."""


class ExportError(UserInputError):
    """The requested export format cannot express this allocation."""


class CancelledError(MopeqError):
    """The run was cancelled by its caller between or inside stages."""
