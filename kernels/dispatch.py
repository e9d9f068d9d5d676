"""Pick the Triton kernel or its torch twin for each op, from the tensors' device and the weight format.

Rule: CUDA tensors + Triton installed -> Triton kernels; anything else (CPU, MPS, no Triton) -> torch twins.
Nothing is read from the environment. The runtime calls these functions (or :func:`kernel_ops` once per device)
and never chooses a backend itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import fused_moe as _moe
from . import gguf_dequant as _gguf
from . import nvfp4_gemm as _nv
from . import rmsnorm as _rms
from . import sampler as _smp
from ._common import HAVE_TRITON, check

log = logging.getLogger(__name__)


def use_triton(device: torch.device | str) -> bool:
    """True when ops on ``device`` run as Triton kernels (a CUDA device and Triton installed)."""
    return HAVE_TRITON and torch.device(device).type == "cuda"


def backend_name(device: torch.device | str) -> str:
    return "triton" if use_triton(device) else "torch"


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 weight_scale_2: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``x @ W.T`` for an NVFP4 weight (see :mod:`dgemma.kernels.nvfp4_gemm`)."""
    fn = _nv.nvfp4_linear if use_triton(x.device) else _nv.nvfp4_linear_torch
    return fn(x, weight, weight_scale, weight_scale_2)


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              experts: _moe.NVFP4Experts | _moe.DenseExperts) -> torch.Tensor:  # fmt: skip
    """MoE experts for NVFP4 or dense weights (see :mod:`dgemma.kernels.fused_moe`)."""
    fn = _moe.fused_moe if use_triton(x.device) else _moe.fused_moe_torch
    return fn(x, topk_weights, topk_ids, experts)


def sample_logits(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor, *,
                  softcap: float | None = None, processed_out: torch.Tensor | None = None) -> _smp.SampleOutput:  # fmt: skip
    """Fused sampler (see :mod:`dgemma.kernels.sampler`)."""
    fn = _smp.sample_logits if use_triton(logits.device) else _smp.sample_logits_torch
    return fn(logits, temperature, uniforms, softcap=softcap, processed_out=processed_out)


def sc_soft_embedding(logits: torch.Tensor, embedding: torch.Tensor, embed_scale: float) -> torch.Tensor:
    """``softmax(logits) @ E * embed_scale`` without a second [M, V] fp32 tensor."""
    fn = _smp.sc_soft_embedding if use_triton(logits.device) else _smp.sc_soft_embedding_torch
    return fn(logits, embedding, embed_scale)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    fn = _rms.rmsnorm if use_triton(x.device) else _rms.rmsnorm_torch
    return fn(x, weight, eps)


def rmsnorm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                     eps: float = 1e-6) -> torch.Tensor:  # fmt: skip
    fn = _rms.rmsnorm_residual if use_triton(x.device) else _rms.rmsnorm_residual_torch
    return fn(x, residual, weight, eps)


def gguf_dequantize(raw: torch.Tensor, qtype: Any, shape: tuple[int, ...],
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:  # fmt: skip
    fn = _gguf.gguf_dequantize if use_triton(raw.device) else _gguf.gguf_dequantize_torch
    return fn(raw, qtype, shape, dtype)


def gguf_linear(
    x: torch.Tensor,
    raw: torch.Tensor,
    qtype: Any,
    out_features: int,
    in_features: int,
    *,
    scale: torch.Tensor | float | None = None,
    chunk_rows: int = 2048,
) -> torch.Tensor:
    """``x @ W.T`` for a GGUF-quantized W [out_features, in_features] stored as ``raw`` bytes (rows contiguous).

    Dequantizes ``chunk_rows`` rows at a time into one reused scratch tile of x's dtype (never the whole weight),
    then multiplies; ``scale`` is the optional second-level ``.scale`` (GGUF NVFP4). fp32 activations on CUDA
    are fine; the product runs in x's dtype.
    """
    qk, nbytes = _gguf.block_layout(qtype)
    check(in_features % qk == 0, f"in_features {in_features} not a multiple of the block size {qk}")
    check(x.shape[-1] == in_features, f"x: last dim {x.shape[-1]} != in_features {in_features}")
    check(chunk_rows > 0, "chunk_rows must be positive")
    row_bytes = in_features // qk * nbytes
    flat = raw.reshape(-1)
    check(flat.numel() == out_features * row_bytes,
          f"raw: {flat.numel()} bytes, expected {out_features * row_bytes} for [{out_features}, {in_features}]")  # fmt: skip
    x2 = x.reshape(-1, in_features)
    y = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
    rows = min(chunk_rows, out_features)
    scratch = torch.empty((rows, in_features), dtype=x.dtype, device=x.device)
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        part = flat[r0 * row_bytes : r1 * row_bytes]
        if use_triton(x.device):
            w = _gguf.gguf_dequantize(part, qtype, (r1 - r0, in_features), x.dtype, out=scratch[: r1 - r0])
        else:
            w = scratch[: r1 - r0]
            w.copy_(_gguf.gguf_dequantize_torch(part, qtype, (r1 - r0, in_features), torch.float32))
        torch.matmul(x2, w.t(), out=y[:, r0:r1])
    if scale is not None:
        y *= torch.as_tensor(scale, dtype=torch.float32, device=y.device).reshape(()).to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)


@dataclass(frozen=True)
class KernelOps:
    """The op set for one device; obtain with :func:`kernel_ops`."""

    backend: str
    nvfp4_linear: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]
    sample_logits: Callable[..., _smp.SampleOutput]
    sc_soft_embedding: Callable[..., torch.Tensor]
    rmsnorm: Callable[..., torch.Tensor]
    rmsnorm_residual: Callable[..., torch.Tensor]
    gguf_dequantize: Callable[..., torch.Tensor]


def kernel_ops(device: torch.device | str) -> KernelOps:
    """Resolve every op once for ``device`` (so the hot path does no per-call checks)."""
    if use_triton(device):
        return KernelOps("triton", _nv.nvfp4_linear, _moe.fused_moe, _smp.sample_logits, _smp.sc_soft_embedding,
                         _rms.rmsnorm, _rms.rmsnorm_residual, _gguf.gguf_dequantize)  # fmt: skip
    return KernelOps("torch", _nv.nvfp4_linear_torch, _moe.fused_moe_torch, _smp.sample_logits_torch,
                     _smp.sc_soft_embedding_torch, _rms.rmsnorm_torch, _rms.rmsnorm_residual_torch,
                     _gguf.gguf_dequantize_torch)  # fmt: skip
