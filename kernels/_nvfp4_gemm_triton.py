"""Triton kernels for NVFP4 weights: in-register tile decode and the W4A16 GEMM. Imported only when Triton is.

Layout (ModelOpt / dgemma runtime, see ``nvfp4_gemm.py``): packed ``w [N, K/2]`` uint8, element k = 2j in the
low nibble of byte j and k = 2j + 1 in the high nibble; block scales ``s [N, K/16]`` float8_e4m3fn passed as
uint8; a float32 global scale applied to the fp32 accumulator in the epilogue.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e2m1_to_f32(code):
    """E2M1 code (uint8, 0..15) -> fp32 value, exactly.

    The 4 code bits placed at fp16 bit positions 15 (sign) and 11..9 (2 exponent + 1 mantissa bits) form an fp16
    equal to value * 2^-14 (code 1 lands on the fp16 subnormal 2^-15), so one integer shift/or, one bitcast, one
    convert and one multiply decode all 16 codes without a table or a branch.
    """
    c = code.to(tl.int16)
    bits = ((c & 8) << 12) | ((c & 7) << 9)
    return bits.to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def nvfp4_weight_tile(packed, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decode one weight tile: packed [BLOCK_N, BLOCK_K/2] uint8, scales [BLOCK_N, BLOCK_K/16] uint8 (e4m3 bits)
    -> block-scaled weights [BLOCK_N, BLOCK_K] fp32 (the tensor's global scale is *not* applied here).

    e2m1 * e4m3 has at most 5 significant bits and lies in [2^-10, 2688], so the result is exact in fp32, bf16
    and fp16 alike: casting it to the dot dtype loses nothing.
    """
    lo = e2m1_to_f32(packed & 0xF)
    hi = e2m1_to_f32(packed >> 4)
    w = tl.interleave(lo, hi)  # [BN, BK]: even k from the low nibble, odd k from the high one
    s = scales.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # [BN, BK/16]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 16, 16)) * tl.reshape(s, (BLOCK_N, BLOCK_K // 16, 1))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def nvfp4_weight_tile_i32(words, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Like nvfp4_weight_tile, from the packed bytes viewed as little-endian int32 words [BLOCK_N, BLOCK_K/8]
    (8 codes per word, code j in bits 4j..4j+3 = element 8w + j). Loading words lets the compiler use 16-byte
    vector loads for the weight stream (a uint8 tile gets 8-byte ones)."""
    n0 = e2m1_to_f32(words & 0xF)
    n1 = e2m1_to_f32((words >> 4) & 0xF)
    n2 = e2m1_to_f32((words >> 8) & 0xF)
    n3 = e2m1_to_f32((words >> 12) & 0xF)
    n4 = e2m1_to_f32((words >> 16) & 0xF)
    n5 = e2m1_to_f32((words >> 20) & 0xF)
    n6 = e2m1_to_f32((words >> 24) & 0xF)
    n7 = e2m1_to_f32((words >> 28) & 0xF)
    # tl.join appends a new *last* axis, so the outermost join selects the lowest bit of the flattened index:
    # leaves in tree order hold codes 0, 4, 2, 6, 1, 5, 3, 7 (bit-reversed) to flatten to 0..7.
    w = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    s = scales.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # [BN, BK/16]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 16, 16)) * tl.reshape(s, (BLOCK_N, BLOCK_K // 16, 1))
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def nvfp4_tile_ptrs(w_ptr, s_ptr, w_row_off, s_row_off, BLOCK_K: tl.constexpr):
    """Pointers to the first K tile of the NVFP4 rows whose byte offsets are w_row_off / s_row_off ([BN, 1] int64).

    Wide tiles (BLOCK_K >= 128: 64 packed bytes per row) are read as int32 words, which Triton turns into 16-byte
    loads; narrower tiles are read as bytes (measured with ptxas: words would fall back to 4-byte copies there,
    bytes get 8-byte ones). Every row offset must be a multiple of 4 bytes for the word path (K % 8 == 0).
    """
    if BLOCK_K >= 128:
        wp = w_ptr.to(tl.pointer_type(tl.int32)) + w_row_off // 4 + tl.arange(0, BLOCK_K // 8)[None, :]
    else:
        wp = w_ptr + w_row_off + tl.arange(0, BLOCK_K // 2)[None, :]
    sp = s_ptr + s_row_off + tl.arange(0, BLOCK_K // 16)[None, :]
    return wp, sp


@triton.jit
def nvfp4_load_tile(wp, sp, mask_n, kmask_w, kmask_s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    K_MASKED: tl.constexpr):  # fmt: skip
    """Load + decode one tile: [BLOCK_N, BLOCK_K] block-scaled fp32 weights; kmask_* ([1, cols]) mask the K tail
    when K_MASKED (the tail columns then decode to 0: zero bytes and zero scales)."""
    if K_MASKED:
        packed = tl.load(wp, mask=mask_n[:, None] & kmask_w, other=0)
        scales = tl.load(sp, mask=mask_n[:, None] & kmask_s, other=0)
    else:
        packed = tl.load(wp, mask=mask_n[:, None], other=0)
        scales = tl.load(sp, mask=mask_n[:, None], other=0)
    if BLOCK_K >= 128:
        return nvfp4_weight_tile_i32(packed, scales, BLOCK_N, BLOCK_K)
    else:
        return nvfp4_weight_tile(packed, scales, BLOCK_N, BLOCK_K)


@triton.jit
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc += a @ b with operands cast to DOT_DTYPE; fp32 operands use exact ("ieee") products, not TF32."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def nvfp4_gemm_kernel(
    # pointers
    x_ptr,  # [M, K] activations (fp32 / fp16 / bf16)
    w_ptr,  # [N, K/2] uint8 packed E2M1, K-contiguous
    s_ptr,  # [N, K/16] uint8 = float8_e4m3fn bits
    s2_ptr,  # [1] fp32 global scale (a pointer: no host sync to read it)
    y_ptr,  # [M, N] output, dtype of x
    # sizes
    M,
    N,
    K,
    # strides (elements; for the packed weights and scales an element is a byte)
    stride_xm,
    stride_xk,
    stride_wn,  # bytes between weight rows (a multiple of 4: rows may be read as int32 words)
    stride_sn,
    stride_ym,
    stride_yn,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: the K loop needs no masks (wider vector loads)
    DOT_DTYPE: tl.constexpr,
):
    # --- program -> tile; M varies fastest so programs sharing a weight tile run together (L2 reuse) ----------
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs, s_ptrs = nvfp4_tile_ptrs(w_ptr, s_ptr, rows * stride_wn, rows * stride_sn, BLOCK_K)
    W_COLS: tl.constexpr = BLOCK_K // 8 if BLOCK_K >= 128 else BLOCK_K // 2  # packed columns: words or bytes
    PER_COL: tl.constexpr = BLOCK_K // W_COLS  # codes per packed column: 8 or 2
    offs_kw = tl.arange(0, W_COLS)[None, :]
    offs_ks = tl.arange(0, BLOCK_K // 16)[None, :]

    # --- main loop: one packed weight tile per K step, decoded in registers ---------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = nvfp4_load_tile(w_ptrs, s_ptrs, mask_n, offs_kw, offs_ks, BLOCK_N, BLOCK_K, False)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            w = nvfp4_load_tile(w_ptrs, s_ptrs, mask_n, offs_kw < (K - k0) // PER_COL, offs_ks < (K - k0) // 16,
                                BLOCK_N, BLOCK_K, True)  # fmt: skip
        acc = dot_acc(a, tl.trans(w), acc, DOT_DTYPE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += W_COLS
        s_ptrs += BLOCK_K // 16

    # --- epilogue: global scale, cast, store --------------------------------------------------------------
    acc = acc * tl.load(s2_ptr)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
