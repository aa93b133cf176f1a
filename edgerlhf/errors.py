"""Errors that end a stage with one clear line (cause + fix) instead of a traceback."""

from __future__ import annotations


class EdgeRLHFError(Exception):
    """Base class: the message is the single line shown to the user."""

    exit_code = 1


class ConfigError(EdgeRLHFError):
    """params.yaml is invalid: unknown key, wrong type, out of range."""

    exit_code = 2


class DataError(EdgeRLHFError):
    """Input data is malformed (names file and line)."""

    exit_code = 3


class ArtifactError(EdgeRLHFError):
    """An upstream artifact is missing or corrupt (names the stage to run)."""

    exit_code = 4


class HardwareError(EdgeRLHFError):
    """The device cannot run what params ask for (e.g. int8 on an old GPU, OOM)."""

    exit_code = 5


class HubError(EdgeRLHFError):
    """The model or dataset hub is unreachable or the id does not exist."""

    exit_code = 6
