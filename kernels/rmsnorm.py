"""RMSNorm (architecture.md §3.1): ``y = x * (mean(x^2) + eps)^-1/2 * w`` in fp32, cast back to x's dtype.

Variants: without weight (``weight=None``: the V / router / SC post norms) and fused with the residual add
(``rmsnorm_residual``: ``residual + rmsnorm(x, w)``, as after ``post_attention_layernorm``), where the norm is
cast to x's dtype before the add, exactly like HF adding two activation-dtype tensors.

Public API: :func:`rmsnorm`, :func:`rmsnorm_torch`, :func:`rmsnorm_residual`, :func:`rmsnorm_residual_torch`.
"""
from __future__ import annotations

import torch

from ._common import ACT_DTYPES, HAVE_TRITON, check, check_dtype, check_same_device, next_pow2, require_launchable

if HAVE_TRITON:
    from . import _rmsnorm_triton as _k

_MAX_D = 65536  # one row lives in registers


def _check(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float) -> None:
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() >= 1 and x.shape[-1] > 0, f"x: expected [..., D], got {tuple(x.shape)}")
    check(eps >= 0.0, f"eps must be >= 0, got {eps}")
    if weight is not None:
        check_dtype("weight", weight, ACT_DTYPES)
        check(tuple(weight.shape) == (x.shape[-1],), f"weight: shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype,
              f"residual: {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")  # fmt: skip
    check_same_device(x=x, weight=weight, residual=residual)


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """Twin (= HF ``DiffusionGemmaRMSNorm.forward``): fp32 math with ``pow(ms + eps, -0.5)``, one cast."""
    _check(x, weight, None, eps)
    xf = x.to(torch.float32)
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.to(torch.float32)
    return y.to(x.dtype)


def rmsnorm_residual_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """Twin of :func:`rmsnorm_residual`: ``residual + rmsnorm(x, weight)`` in x's dtype."""
    _check(x, weight, residual, eps)
    return residual + rmsnorm_torch(x, weight, eps)


def _launch(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check(x, weight, residual, eps)
    require_launchable(_k.rmsnorm_kernel if HAVE_TRITON else None, x.device)
    d = x.shape[-1]
    check(d <= _MAX_D, f"rmsnorm: row length {d} > {_MAX_D}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, d)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        block = next_pow2(d)
        _k.rmsnorm_kernel[(rows,)](
            x2, weight if weight is not None else x2, r2 if r2 is not None else x2, y,
            d, x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), float(eps),
            BLOCK_D=block, HAS_WEIGHT=weight is not None, HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return y.reshape(x.shape)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim on the GPU; ``weight=None`` is the scale-less variant."""
    return _launch(x, weight, None, eps)


def rmsnorm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """``residual + rmsnorm(x, weight)`` in one pass on the GPU (norm cast to x's dtype before the add)."""
    return _launch(x, weight, residual, eps)
