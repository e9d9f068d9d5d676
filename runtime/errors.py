"""Errors that dgemma raises for bad input. Every user-facing failure is one of these."""
from __future__ import annotations


class DGemmaError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug in dgemma)."""


class ConfigError(DGemmaError):
    """A config.json / generation_config.json field is missing, malformed or unsupported."""


class CheckpointError(DGemmaError):
    """A checkpoint's tensors are missing, unexpected, of the wrong shape/dtype, or its file is corrupt."""


class FormatError(DGemmaError):
    """A file is not in the expected format (truncated safetensors, bad GGUF, wrong architecture...)."""


class GenerationError(DGemmaError):
    """Impossible sampler settings or inputs to generation (prompt longer than the context, ...)."""


class PlanError(DGemmaError):
    """A memory plan that cannot fit the requested budget."""
