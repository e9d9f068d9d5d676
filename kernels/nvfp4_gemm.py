"""NVFP4 weight-only GEMM (W4A16): ``y = x @ W.T`` with W stored as packed E2M1 + E4M3 block scales + a global scale.

Weight layout (ModelOpt ``nvfp4``, what dgemma's converter writes), for out_features N, in_features K (K % 16 == 0):

- ``weight``         uint8 ``[N, K/2]``: element k = 2j is the LOW nibble of byte j, k = 2j + 1 the HIGH nibble;
  each nibble an E2M1 code (bit 3 = sign, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6).
- ``weight_scale``   torch.float8_e4m3fn ``[N, K/16]``: one scale per 16 consecutive inputs.
- ``weight_scale_2`` float32 scalar (0-d or [1]): the per-tensor global scale (multiply).

``W[n, k] = e2m1(code[n, k]) * float(weight_scale[n, k // 16]) * weight_scale_2``.

Public API: :func:`nvfp4_linear` (Triton, CUDA), :func:`nvfp4_linear_torch` (twin, any device),
:func:`dequantize_nvfp4` / :func:`e2m1_values` (reference numerics used by both twins and tests).
"""
from __future__ import annotations

import logging

import torch

from ._common import (
    ACT_DTYPES,
    HAVE_TRITON,
    check,
    check_dtype,
    check_same_device,
    pick_block_k,
    require_launchable,
    tl_dtype,
)

if HAVE_TRITON:
    from . import _nvfp4_gemm_triton as _k

log = logging.getLogger(__name__)

# E2M1 code -> value; index = the 4-bit code (bit 3 sign).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Weight rows the torch twin dequantizes at once: its fp32 transient is at most 1024 * K * 4 bytes (11.5 MB at K 2816).
_TWIN_ROW_CHUNK = 1024


def e2m1_values(device: torch.device | str = "cpu") -> torch.Tensor:
    """[16] float32 lookup table of the E2M1 codes."""
    return torch.tensor(_E2M1, dtype=torch.float32, device=device)


def check_nvfp4_weight(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, prefix: str = "weight"
) -> tuple[int, int]:
    """Validate one NVFP4 matrix (optionally with leading expert dims); returns (N, K)."""
    check_dtype(prefix, weight, (torch.uint8,))
    check_dtype(f"{prefix}_scale", weight_scale, (torch.float8_e4m3fn,))
    check_dtype(f"{prefix}_scale_2", weight_scale_2, (torch.float32,))
    check(weight.dim() >= 2, f"{prefix}: expected [..., N, K/2], got shape {tuple(weight.shape)}")
    n, k = weight.shape[-2], weight.shape[-1] * 2
    check(k % 16 == 0, f"{prefix}: in_features {k} must be a multiple of 16")
    check(
        tuple(weight_scale.shape) == (*weight.shape[:-1], k // 16),
        f"{prefix}_scale: shape {tuple(weight_scale.shape)} != {(*weight.shape[:-1], k // 16)} for {prefix} "
        f"{tuple(weight.shape)} (one e4m3 scale per 16 inputs)",
    )
    check(weight.stride(-1) == 1 and weight_scale.stride(-1) == 1, f"{prefix}/{prefix}_scale: last dim must be contiguous")
    return n, k


def dequantize_nvfp4(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference dequantization ``[..., N, K/2] -> [..., N, K]`` (the whole tensor; for tests and small matrices).

    With ``weight_scale_2=None`` the global scale is left out (block-scaled values only, exact in bf16/fp16).
    """
    codes = torch.stack((weight & 0xF, weight >> 4), dim=-1).flatten(-2).long()  # [..., N, K]
    vals = e2m1_values(weight.device)[codes]
    scales = weight_scale.to(torch.float32).repeat_interleave(16, dim=-1)
    out = vals * scales
    if weight_scale_2 is not None:
        s2 = torch.as_tensor(weight_scale_2, dtype=torch.float32, device=out.device)
        # scalar for one matrix; [E] for an expert stack [E, N, K] -> broadcast as [E, 1, 1]
        out = out * (s2.reshape(()) if s2.numel() == 1 else s2.reshape(*s2.shape, 1, 1))
    return out.to(dtype)


def _flatten_x(x: torch.Tensor, k: int) -> torch.Tensor:
    check(x.dim() >= 1 and x.shape[-1] == k, f"x: last dim {tuple(x.shape)[-1:]} != in_features {k}")
    return x.reshape(-1, k)


def nvfp4_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
) -> torch.Tensor:
    """Torch twin of :func:`nvfp4_linear`: ``[..., K] -> [..., N]`` in x's dtype.

    Math: fp32 products of x with the block-scaled weights, fp32 accumulation, times the global scale, then one
    cast to x.dtype. Dequantizes ``_TWIN_ROW_CHUNK`` weight rows at a time (never a full bf16/fp32 weight copy).
    """
    check_dtype("x", x, ACT_DTYPES)
    n, k = check_nvfp4_weight(weight, weight_scale, weight_scale_2)
    check(weight.dim() == 2, f"weight: expected [N, K/2], got {tuple(weight.shape)}")
    check(weight_scale_2.numel() == 1, "weight_scale_2: expected one scalar")
    check_same_device(x=x, weight=weight, weight_scale=weight_scale, weight_scale_2=weight_scale_2)
    x2 = _flatten_x(x, k).to(torch.float32)  # [M, K]
    y = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
    for r0 in range(0, n, _TWIN_ROW_CHUNK):
        r1 = min(n, r0 + _TWIN_ROW_CHUNK)
        w = dequantize_nvfp4(weight[r0:r1], weight_scale[r0:r1])  # [rows, K] fp32, block-scaled
        torch.matmul(x2, w.t(), out=y[:, r0:r1])
    y *= weight_scale_2.to(torch.float32).reshape(())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _gemm_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the W4A16 GEMM.

    Small M (decode-like) -> 16/32-row tiles; canvas-sized M (256) -> 64-row tiles so each weight tile is decoded
    for 64 rows at once while the 4 M-programs share it through L2 (M varies fastest in the grid). Checked
    spill-free with ptxas for sm_89/90/120 (scripts/kernel_report.py); not tuned on hardware.
    """
    block_k = pick_block_k(k)
    if m <= 16:
        return 16, 64, block_k, 4, 4
    if m <= 32:
        return 32, 64, block_k, 4, 4
    return 64, 64, block_k, 8, 3  # 8 warps: 128 registers (4 warps would need 230, 2 CTAs/SM on sm_89)


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    *,
    dot_dtype: torch.dtype | None = None,
    block_sizes: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """W4A16 GEMM on the GPU: ``x [..., K] (bf16/fp16/fp32) -> [..., N]`` in x's dtype.

    The packed weight is read once per tile and decoded in registers (never expanded in memory); fp32
    accumulation; the global scale multiplies the accumulator. ``dot_dtype`` (default: x's dtype) is the
    tensor-core operand type; Triton's CPU interpreter needs fp32/fp16 (its bf16 dot is wrong).
    ``block_sizes`` = (BLOCK_M, BLOCK_N, BLOCK_K) overrides the tile choice (tests, tuning).
    """
    check_dtype("x", x, ACT_DTYPES)
    n, k = check_nvfp4_weight(weight, weight_scale, weight_scale_2)
    check(weight.dim() == 2, f"weight: expected [N, K/2], got {tuple(weight.shape)}")
    check(weight_scale_2.numel() == 1, "weight_scale_2: expected one scalar")
    dev = check_same_device(x=x, weight=weight, weight_scale=weight_scale, weight_scale_2=weight_scale_2)
    dot_dtype = x.dtype if dot_dtype is None else dot_dtype
    check(dot_dtype in ACT_DTYPES, f"dot_dtype {dot_dtype} not supported")
    require_launchable(_k.nvfp4_gemm_kernel if HAVE_TRITON else None, dev)

    x2 = _flatten_x(x, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=dev)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bm, bn, bk, warps, stages = _gemm_config(m, n, k)
    if block_sizes is not None:
        bm, bn, bk = block_sizes
        check(all(b >= 16 and b & (b - 1) == 0 for b in (bm, bn, bk)),
              f"block sizes {block_sizes} must be powers of 2 >= 16")  # fmt: skip
    s2 = weight_scale_2.reshape(1).to(torch.float32)
    grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn),)
    check(weight.data_ptr() % 4 == 0 and weight.stride(0) % 4 == 0,
          "weight: rows must start at 4-byte aligned addresses (the kernel may read them as int32 words)")  # fmt: skip
    _k.nvfp4_gemm_kernel[grid](
        x2, weight, weight_scale.view(torch.uint8), s2, y,
        m, n, k,
        x2.stride(0), x2.stride(1),
        weight.stride(0),
        weight_scale.stride(0),
        y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=(k % bk == 0),
        DOT_DTYPE=tl_dtype(dot_dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
