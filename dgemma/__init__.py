"""dgemma: run Google's DiffusionGemma on one consumer GPU.

    import dgemma
    dg = dgemma.load()                      # the small model bundled with dgemma, or a checkpoint path
    print(dg.chat("Why is the sky blue?").answer)

The implementation lives in `dgemma.runtime`, `dgemma.converter` and `dgemma.kernels`.
"""
from __future__ import annotations

from dgemma.runtime.api import ChatReply, ChatSession, DiffusionGemma, default_model_path, load
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import (
    CheckpointError,
    ConfigError,
    DGemmaError,
    FormatError,
    GenerationError,
    PlanError,
)
from dgemma.runtime.generate import GenerationResult

__version__ = "0.1.0"

__all__ = [
    "load", "DiffusionGemma", "ChatReply", "ChatSession", "GenerationResult", "DGConfig", "default_model_path",
    "DGemmaError", "ConfigError", "CheckpointError", "FormatError", "GenerationError", "PlanError",
]
