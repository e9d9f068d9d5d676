"""Triton RMSNorm kernel (one program per row; the whole row in registers). Imported only when Triton is."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(
    # pointers
    x_ptr,  # [R, D] input, last dim contiguous
    w_ptr,  # [D] weight (HAS_WEIGHT), any float dtype
    res_ptr,  # [R, D] residual (HAS_RESIDUAL)
    y_ptr,  # [R, D] output, dtype of x
    # sizes
    D,
    stride_xr,
    stride_rr,
    stride_yr,
    eps,
    # meta
    BLOCK_D: tl.constexpr,  # next power of two >= D
    HAS_WEIGHT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """y = [residual +] cast(x * (mean(x^2) + eps)^-1/2 [* w]) with the norm in fp32 and one cast to x's dtype
    before the residual add (HF: ``residual + norm(x)`` adds two tensors of the activation dtype)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_xr + offs, mask=mask, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, axis=0) / D
    y = x * tl.math.rsqrt(ms + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_rr + offs, mask=mask, other=0.0)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_yr + offs, y, mask=mask)
