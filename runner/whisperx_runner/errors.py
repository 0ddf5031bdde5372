"""Errors that end a prediction, each with the reason and exit code it reports."""

from __future__ import annotations

# Exit codes (docs/architecture.md): the Job's podFailurePolicy fails the Job on 2 without
# retrying, and 143 is what Kubernetes expects from a process that obeyed SIGTERM.
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_CANCELED = 143


class RunnerError(Exception):
    """A failure that is not the input's fault: retrying the prediction may help."""

    reason = "RunnerFailed"
    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InputError(RunnerError):
    """The input or its audio can never succeed (bad field, 404, not audio, too large)."""

    reason = "InvalidInput"
    exit_code = EXIT_INVALID


class ModelNotFoundError(RunnerError):
    """A model is missing from the model directory and hub downloads are off."""

    reason = "ModelNotFound"


class ConfigError(RunnerError):
    """The runner's environment is malformed (a deployment error)."""

    reason = "RunnerMisconfigured"
