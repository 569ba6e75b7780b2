"""Errors a user can act on: each one says what is wrong and what to try."""

from __future__ import annotations


class EfficientBioAIError(Exception):
    """A problem with the user's input or environment, reported without a traceback by the CLI.

    ``problem`` says what is wrong (naming the config key, file or layer); ``fix`` says what to try.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  how to fix: {fix}")


class ConfigError(EfficientBioAIError):
    """The configuration file is missing, malformed or names something that does not exist."""


class ModelLoadError(EfficientBioAIError):
    """A model could not be loaded: wrong file type, missing architecture, checkpoint mismatch."""


class ExportError(EfficientBioAIError):
    """A model could not be exported to ONNX or converted to an engine."""


class FidelityError(EfficientBioAIError):
    """The compressed model differs from the original by more than the configured limit."""
