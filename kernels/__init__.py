"""dgemma.kernels: fused low-bit Triton kernels for the denoising step, each with a plain torch twin.

Every op is a public wrapper that validates its inputs, a private Triton kernel (``_*_triton.py``) and a torch
twin (``*_torch``). Triton is optional: without it (or on CPU) use the twins; :mod:`dgemma.kernels.dispatch`
chooses by device. Tensor contracts are in each module's docstring.

The Triton wrappers ``fused_moe`` and ``rmsnorm`` share their module's name, so they are not re-exported here
(that would shadow the submodules): use ``dgemma.kernels.fused_moe.fused_moe`` /
``dgemma.kernels.rmsnorm.rmsnorm``, or the device-dispatching functions of :mod:`dgemma.kernels.dispatch`.
"""
from __future__ import annotations

from ._common import HAVE_TRITON, KernelInputError, KernelUnavailableError
from .dispatch import KernelOps, backend_name, kernel_ops, use_triton
from .fused_moe import DenseExperts, NVFP4Experts, fused_moe_torch, moe_align_block_size
from .gguf_dequant import SUPPORTED_TYPES as GGUF_TYPES
from .gguf_dequant import gguf_dequantize, gguf_dequantize_torch
from .nvfp4_gemm import dequantize_nvfp4, e2m1_values, nvfp4_linear, nvfp4_linear_torch
from .rmsnorm import rmsnorm_residual, rmsnorm_residual_torch, rmsnorm_torch
from .sampler import SampleOutput, sample_logits, sample_logits_torch, sc_soft_embedding, sc_soft_embedding_torch

__all__ = [
    "HAVE_TRITON",
    "KernelInputError",
    "KernelUnavailableError",
    "KernelOps",
    "backend_name",
    "kernel_ops",
    "use_triton",
    "DenseExperts",
    "NVFP4Experts",
    "fused_moe_torch",
    "moe_align_block_size",
    "GGUF_TYPES",
    "gguf_dequantize",
    "gguf_dequantize_torch",
    "dequantize_nvfp4",
    "e2m1_values",
    "nvfp4_linear",
    "nvfp4_linear_torch",
    "rmsnorm_residual",
    "rmsnorm_residual_torch",
    "rmsnorm_torch",
    "SampleOutput",
    "sample_logits",
    "sample_logits_torch",
    "sc_soft_embedding",
    "sc_soft_embedding_torch",
]
