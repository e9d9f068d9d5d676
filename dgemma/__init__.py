"""dgemma: run Google's DiffusionGemma on one consumer GPU.

    import dgemma
    dg = dgemma.load()                      # the small model bundled with dgemma, or a checkpoint path
    print(dg.chat("Why is the sky blue?").answer)

The implementation lives in `dgemma.runtime`, `dgemma.converter` and `dgemma.kernels`.
"""
from __future__ import annotations

from dgemma.runtime.api import ChatReply, ChatSession, DiffusionGemma, default_model_path, load
from dgemma.runtime.budget import load_with_budget
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import (
    CheckpointError,
    ConfigError,
    DGemmaError,
    FormatError,
    GenerationError,
    PlanError,
)
from dgemma.runtime.expert_store import enable_expert_offload
from dgemma.runtime.generate import GenerationResult
from dgemma.runtime.planner import Plan, plan
from dgemma.runtime.weight_stream import enable_weight_streaming

__version__ = "0.1.0"

__all__ = [
    "load", "load_with_budget", "plan", "Plan", "enable_expert_offload", "enable_weight_streaming",
    "DiffusionGemma", "ChatReply", "ChatSession", "GenerationResult", "DGConfig", "default_model_path",
    "DGemmaError", "ConfigError", "CheckpointError", "FormatError", "GenerationError", "PlanError",
]
