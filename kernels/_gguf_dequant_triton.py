"""Triton dequantization kernels for GGUF block types. Imported only when Triton is.

Every kernel maps a [BLOCKS, QK] tile (BLOCKS consecutive quant blocks of QK elements) to output values; element
formulas follow gguf-py 0.19.0 ``gguf/quants.py`` ``dequantize_blocks`` (and ggml's ``dequantize_row_*``),
including the fp32 operation order, so the interpreter reproduces gguf-py bit for bit. GGUF blocks are only
2-byte aligned (34, 22, 17, 36 ... bytes), so inputs are gathered bytewise; outputs are stored contiguously.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _u8(raw_ptr, off, mask):
    return tl.load(raw_ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(raw_ptr, off, mask):
    """Little-endian fp16 at byte offset ``off`` (any alignment) -> fp32."""
    bits = _u8(raw_ptr, off, mask) | (_u8(raw_ptr, off + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _tile(n_blocks, QK: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """(block index [BLOCKS, 1] int64, element index [1, QK], mask [BLOCKS, QK], block byte base [BLOCKS, 1])."""
    b = (tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS))[:, None]
    i = tl.arange(0, QK)[None, :]
    mask = (b < n_blocks) & (i < QK)
    return b, i, mask, b * BLOCK_BYTES


@triton.jit
def _kvalue_x2(code):
    """kvalues_mxfp4 = 2 * E2M1: code (int32 0..15) -> {0, 1, 2, 3, 4, 6, 8, 12} with bit 3 the sign, as fp32."""
    mag = code & 7
    v = tl.where(mag < 4, mag, tl.where(mag == 4, 4, tl.where(mag == 5, 6, tl.where(mag == 6, 8, 12))))
    return tl.where(code >= 8, -v, v).to(tl.float32)


@triton.jit
def _store(out_ptr, b, i, mask, val, QK: tl.constexpr):
    tl.store(out_ptr + b * QK + i, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_q8_0_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block: d fp16 | 32 x int8
    b, i, mask, base = _tile(n_blocks, 32, BLOCKS, 34)
    d = _f16(raw_ptr, base, b < n_blocks)
    q = _u8(raw_ptr, base + 2 + i, mask).to(tl.int8).to(tl.float32)
    _store(out_ptr, b, i, mask, d * q, 32)


@triton.jit
def dequant_q5_0_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block: d fp16 | qh u32 (bit i = 5th bit of element i) | 16 bytes: element j low nibble, j + 16 high nibble
    b, i, mask, base = _tile(n_blocks, 32, BLOCKS, 22)
    d = _f16(raw_ptr, base, b < n_blocks)
    hbit = (_u8(raw_ptr, base + 2 + i // 8, mask) >> (i % 8)) & 1
    lo = (_u8(raw_ptr, base + 6 + i % 16, mask) >> ((i // 16) * 4)) & 0xF
    q = ((lo | (hbit << 4)) - 16).to(tl.float32)
    _store(out_ptr, b, i, mask, d * q, 32)


@triton.jit
def _k_scale_min(raw_ptr, base, s, mask):
    """6-bit scale and min of sub-block s (0..7) from the 12 packed bytes at base + 4 (Q4_K / Q5_K)."""
    s4 = s % 4
    bd = _u8(raw_ptr, base + 4 + s4, mask)
    bm = _u8(raw_ptr, base + 8 + s4, mask)
    bmd = _u8(raw_ptr, base + 12 + s4, mask)
    sc = tl.where(s < 4, bd & 0x3F, (bmd & 0x0F) | ((bd >> 2) & 0x30))
    mn = tl.where(s < 4, bm & 0x3F, (bmd >> 4) | ((bm >> 2) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def dequant_q4_k_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block (144 B): d fp16 | dmin fp16 | 12 B scales/mins | 128 B qs (4 groups of 32 bytes, low nibbles then high)
    b, i, mask, base = _tile(n_blocks, 256, BLOCKS, 144)
    bm = b < n_blocks
    d = _f16(raw_ptr, base, bm)
    dmin = _f16(raw_ptr, base + 2, bm)
    s = i // 32
    sc, mn = _k_scale_min(raw_ptr, base, s, mask)
    q = ((_u8(raw_ptr, base + 16 + (i // 64) * 32 + i % 32, mask) >> ((s % 2) * 4)) & 0xF).to(tl.float32)
    _store(out_ptr, b, i, mask, (d * sc) * q - dmin * mn, 256)


@triton.jit
def dequant_q5_k_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block (176 B): d | dmin | 12 B scales/mins | 32 B qh (bit s of byte l = 5th bit of element 32 s + l) | 128 B qs
    b, i, mask, base = _tile(n_blocks, 256, BLOCKS, 176)
    bm = b < n_blocks
    d = _f16(raw_ptr, base, bm)
    dmin = _f16(raw_ptr, base + 2, bm)
    s = i // 32
    sc, mn = _k_scale_min(raw_ptr, base, s, mask)
    lo = (_u8(raw_ptr, base + 48 + (i // 64) * 32 + i % 32, mask) >> ((s % 2) * 4)) & 0xF
    hb = (_u8(raw_ptr, base + 16 + i % 32, mask) >> s) & 1
    q = (lo | (hb << 4)).to(tl.float32)
    _store(out_ptr, b, i, mask, (d * sc) * q - dmin * mn, 256)


@triton.jit
def dequant_q6_k_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block (210 B): 128 B ql | 64 B qh | 16 x int8 scales | d fp16. Element i = 128 a + r:
    # low 4 bits = nibble r // 64 of ql[64 a + r % 64]; high 2 bits = bits 2 (r // 32) of qh[32 a + r % 32]
    b, i, mask, base = _tile(n_blocks, 256, BLOCKS, 210)
    d = _f16(raw_ptr, base + 208, b < n_blocks)
    a = i // 128
    r = i % 128
    lo = (_u8(raw_ptr, base + a * 64 + r % 64, mask) >> ((r // 64) * 4)) & 0xF
    hi = (_u8(raw_ptr, base + 128 + a * 32 + r % 32, mask) >> ((r // 32) * 2)) & 3
    q = ((lo | (hi << 4)) - 32).to(tl.float32)
    sc = _u8(raw_ptr, base + 192 + i // 16, mask).to(tl.int8).to(tl.float32)
    _store(out_ptr, b, i, mask, (d * sc) * q, 256)


@triton.jit
def dequant_mxfp4_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block (17 B): E8M0 exponent e | 16 B: element j low nibble, j + 16 high nibble; value kvalue * 2^(e - 128)
    b, i, mask, base = _tile(n_blocks, 32, BLOCKS, 17)
    e = _u8(raw_ptr, base, b < n_blocks)
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)  # ggml_e8m0_to_fp32_half
    d = bits.to(tl.float32, bitcast=True)
    code = (_u8(raw_ptr, base + 1 + i % 16, mask) >> ((i // 16) * 4)) & 0xF
    _store(out_ptr, b, i, mask, d * _kvalue_x2(code), 32)


@triton.jit
def _ue4m3_half(x):
    """ggml_ue4m3_to_fp32 * 0.5 (gguf-py NVFP4.ue4m3_to_fp32): bits 6..3 exponent (bias 7), 2..0 mantissa."""
    ex = (x >> 3) & 0xF
    man = (x & 7).to(tl.float32)
    sub = man * 0.001953125  # 2^-9
    pow2 = ((ex + 120) << 23).to(tl.float32, bitcast=True)  # 2^(ex - 7) built exactly from its bits
    normal = (1.0 + man / 8.0) * pow2
    raw = tl.where(ex == 0, sub, normal)
    return tl.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)


@triton.jit
def dequant_nvfp4_kernel(raw_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr):
    # block (36 B, 64 elements): 4 UE4M3 scales | 32 B; sub-block s uses bytes 8 s .. 8 s + 7: element 16 s + j is
    # the low nibble of byte 8 s + j for j < 8, the high nibble of byte 8 s + j - 8 otherwise
    b, i, mask, base = _tile(n_blocks, 64, BLOCKS, 36)
    s = i // 16
    j = i % 16
    d = _ue4m3_half(_u8(raw_ptr, base + s, mask))
    code = (_u8(raw_ptr, base + 4 + 8 * s + j % 8, mask) >> ((j // 8) * 4)) & 0xF
    _store(out_ptr, b, i, mask, d * _kvalue_x2(code), 64)
