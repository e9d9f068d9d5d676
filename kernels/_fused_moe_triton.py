"""Triton kernels of the fused MoE (grouped GEMMs over expert-sorted tokens). Imported only when Triton is.

Contract (vLLM ``fused_moe_kernel`` style), with P = T * topk routed (token, slot) pairs:

- ``sorted_ids [P_pad]`` int32: pair ids ``t * topk + k`` grouped by expert, each expert's run padded to a
  multiple of BLOCK_M with the sentinel P (never a valid pair);
- ``expert_ids [P_pad / BLOCK_M]`` int32: the expert of each BLOCK_M block, -1 for blocks past the end;
- ``num_post [1]`` int32: number of used entries of sorted_ids (a multiple of BLOCK_M); the grid covers the
  worst case P_pad and programs past num_post return at once (no host sync, CUDA-graph friendly).
- A -1 block writes zeros for any valid pair it holds (none, as built by ``moe_align_block_size``).

Weights are NVFP4 (``W_NVFP4=True``: packed [E, N, K/2] uint8, read as int32 words when BLOCK_K >= 128 — see
``nvfp4_tile_ptrs``; scales [E, N, K/16] e4m3 bits; global [E] fp32) or dense ([E, N, K] in any float dtype;
the scale pointers are then unused). Strides are in elements of the pointer's type (bytes for NVFP4).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._nvfp4_gemm_triton import dot_acc, nvfp4_load_tile, nvfp4_tile_ptrs


@triton.jit
def _expert_tile_ptrs(
    w_ptr, s_ptr, e64, offs_n, stride_we, stride_wn, stride_se, stride_sn,
    BLOCK_K: tl.constexpr, W_NVFP4: tl.constexpr,
):  # fmt: skip
    """Pointers to the first K tile of expert e's weight rows offs_n: (weights, block scales)."""
    rows = offs_n.to(tl.int64)[:, None]
    if W_NVFP4:
        return nvfp4_tile_ptrs(w_ptr, s_ptr, e64 * stride_we + rows * stride_wn, e64 * stride_se + rows * stride_sn,
                               BLOCK_K)  # fmt: skip
    else:
        wp = w_ptr + e64 * stride_we + rows * stride_wn + tl.arange(0, BLOCK_K)[None, :]
        return wp, s_ptr


@triton.jit
def _expert_tile(wp, sp, mask_n, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_NVFP4: tl.constexpr):
    """[BLOCK_N, BLOCK_K] weight tile at (wp, sp): decoded NVFP4 (block-scaled fp32) or the dense values."""
    if W_NVFP4:
        return nvfp4_load_tile(wp, sp, mask_n, None, None, BLOCK_N, BLOCK_K, False)
    else:
        return tl.load(wp, mask=mask_n[:, None], other=0.0)


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(z)) == x * sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3): no tanh intrinsic needed.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * z)


@triton.jit
def moe_gate_up_kernel(
    # pointers
    x_ptr,  # [T, H] activations
    w_ptr,  # gate_up weight: NVFP4 [E, 2I, H/2] uint8 | dense [E, 2I, H]
    s_ptr,  # NVFP4 block scales [E, 2I, H/16] (uint8 e4m3 bits); unused when dense
    gs_ptr,  # NVFP4 global scales [E] fp32; unused when dense
    h_ptr,  # [P, I] out: gelu_tanh(gate) * up, dtype of x
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_ptr,
    # sizes
    P,  # T * topk
    I,  # expert intermediate size (gate rows 0..I-1, up rows I..2I-1)
    H,  # hidden size (the K of this GEMM), multiple of BLOCK_K
    TOPK,
    # strides (elements; the K stride of every operand is 1)
    stride_xt,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_hp,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_NVFP4: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    # --- program -> (block of sorted pairs, tile of I); consecutive programs share the block's x rows ---------
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(I, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BM] t * topk + k, or the sentinel P
    valid = pair < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    out_ptrs = h_ptr + pair.to(tl.int64)[:, None] * stride_hp + offs_n[None, :]
    out_mask = valid[:, None] & mask_n[None, :]

    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=h_ptr.dtype.element_ty), mask=out_mask)
        return
    e64 = expert.to(tl.int64)

    # --- K loop: gate and up tiles of the same expert, one x tile ---------------------------------------------
    tok = (pair // TOPK).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    wg_ptrs, sg_ptrs = _expert_tile_ptrs(w_ptr, s_ptr, e64, offs_n, stride_we, stride_wn, stride_se, stride_sn,
                                         BLOCK_K, W_NVFP4)  # fmt: skip
    wu_ptrs, su_ptrs = _expert_tile_ptrs(w_ptr, s_ptr, e64, offs_n + I, stride_we, stride_wn, stride_se, stride_sn,
                                         BLOCK_K, W_NVFP4)  # fmt: skip
    W_STEP: tl.constexpr = (BLOCK_K // 8 if BLOCK_K >= 128 else BLOCK_K // 2) if W_NVFP4 else BLOCK_K
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _k0 in range(0, H, BLOCK_K):
        a = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
        wg = _expert_tile(wg_ptrs, sg_ptrs, mask_n, BLOCK_N, BLOCK_K, W_NVFP4)
        wu = _expert_tile(wu_ptrs, su_ptrs, mask_n, BLOCK_N, BLOCK_K, W_NVFP4)
        acc_g = dot_acc(a, tl.trans(wg), acc_g, DOT_DTYPE)
        acc_u = dot_acc(a, tl.trans(wu), acc_u, DOT_DTYPE)
        x_ptrs += BLOCK_K
        wg_ptrs += W_STEP
        wu_ptrs += W_STEP
        if W_NVFP4:
            sg_ptrs += BLOCK_K // 16
            su_ptrs += BLOCK_K // 16

    # --- epilogue: global scale, GELU-tanh(gate) * up -----------------------------------------------------------
    if W_NVFP4:
        gs = tl.load(gs_ptr + e64)
        acc_g = acc_g * gs
        acc_u = acc_u * gs
    h = _gelu_tanh(acc_g) * acc_u
    tl.store(out_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def moe_down_kernel(
    # pointers
    h_ptr,  # [P, I] gelu(gate) * up, from moe_gate_up_kernel
    w_ptr,  # down weight: NVFP4 [E, H, I/2] uint8 | dense [E, H, I]
    s_ptr,  # NVFP4 block scales [E, H, I/16]; unused when dense
    gs_ptr,  # NVFP4 global scales [E] fp32; unused when dense
    rw_ptr,  # [P] fp32 routing weights (already including any per-expert scale)
    out_ptr,  # [P, H] out: routing weight * expert output, combined over topk afterwards
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_ptr,
    # sizes
    P,
    H,  # output size (N of this GEMM)
    I,  # the K of this GEMM, multiple of BLOCK_K
    # strides (elements; K strides are 1)
    stride_hp,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_op,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_NVFP4: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(H, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < P
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    out_ptrs = out_ptr + pair64[:, None] * stride_op + offs_n[None, :]
    out_mask = valid[:, None] & mask_n[None, :]

    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty), mask=out_mask)
        return
    e64 = expert.to(tl.int64)

    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + pair64[:, None] * stride_hp + offs_k[None, :]
    w_ptrs, s_ptrs = _expert_tile_ptrs(w_ptr, s_ptr, e64, offs_n, stride_we, stride_wn, stride_se, stride_sn,
                                       BLOCK_K, W_NVFP4)  # fmt: skip
    W_STEP: tl.constexpr = (BLOCK_K // 8 if BLOCK_K >= 128 else BLOCK_K // 2) if W_NVFP4 else BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _k0 in range(0, I, BLOCK_K):
        a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        w = _expert_tile(w_ptrs, s_ptrs, mask_n, BLOCK_N, BLOCK_K, W_NVFP4)
        acc = dot_acc(a, tl.trans(w), acc, DOT_DTYPE)
        a_ptrs += BLOCK_K
        w_ptrs += W_STEP
        if W_NVFP4:
            s_ptrs += BLOCK_K // 16

    # --- epilogue: expert global scale x routing weight ----------------------------------------------------------
    rw = tl.load(rw_ptr + pair64, mask=valid, other=0.0)
    if W_NVFP4:
        acc = acc * tl.load(gs_ptr + e64)
    acc = acc * rw[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
