"""Triton kernels of the fused sampler and the self-conditioning soft embedding. Imported only when Triton is.

Sampler = two kernels over one row's vocabulary, split into NUM_SPLITS contiguous ranges of SPLIT_LEN:

1. ``sampler_partial_kernel`` (grid M * NUM_SPLITS): online-softmax statistics of one range of
   ``z = softcap(l) / t``: max m_j (also the argmax value), first argmax index, s_j = sum exp(z - m_j) and
   b_j = sum exp(z - m_j) (z - m_j) (for the entropy). Optionally writes z (the processed logits) out.
2. ``sampler_finish_kernel`` (grid M): merges the ranges -> logsumexp, entropy, argmax; picks the range where
   the inverse CDF crosses u * sum and rescans only that range for the sampled index.

Reads the logits 1 + 1/NUM_SPLITS times; never writes a vocabulary-sized temporary.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._nvfp4_gemm_triton import dot_acc


@triton.jit
def _tanh(x):
    # tanh via exp (no tanh intrinsic in the interpreter): sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _processed(l, t, cap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(l) / t in fp32 with a correctly rounded division (bit-equal to torch's ``raw / t``)."""
    l = l.to(tl.float32)
    if HAS_SOFTCAP:
        l = cap * _tanh(l / cap)
    return tl.math.div_rn(l, t)


@triton.jit
def sampler_partial_kernel(
    # pointers
    logits_ptr,  # [M, V] fp32 / bf16 / fp16, last dim contiguous
    proc_ptr,  # [M, V] processed-logits output (any float dtype) when WRITE_PROCESSED, else unused
    part_m_ptr,  # [M, NUM_SPLITS] fp32 range max of z
    part_s_ptr,  # [M, NUM_SPLITS] fp32 sum exp(z - m_j)
    part_b_ptr,  # [M, NUM_SPLITS] fp32 sum exp(z - m_j) * (z - m_j)
    part_i_ptr,  # [M, NUM_SPLITS] int32 first index of the range max
    # sizes / scalars
    V,
    stride_lm,
    stride_pm,
    t,  # temperature (fp32)
    cap,  # softcap (fp32; used only when HAS_SOFTCAP)
    SPLIT_LEN,  # vocabulary entries per range, a multiple of BLOCK_V
    NUM_SPLITS,
    # meta
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_PROCESSED: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // NUM_SPLITS
    split = pid % NUM_SPLITS
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, V)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lm
    offs0 = tl.arange(0, BLOCK_V)

    # running statistics of this range (scalars): max, first argmax, sum of exp, sum of exp * (z - max)
    m = -float("inf")
    idx = start
    s = 0.0
    b = 0.0
    for off in range(start, end, BLOCK_V):
        offs = off + offs0
        mask = offs < end
        z = _processed(tl.load(row_ptr + offs, mask=mask, other=0.0), t, cap, HAS_SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        if WRITE_PROCESSED:
            tl.store(proc_ptr + row.to(tl.int64) * stride_pm + offs, z.to(proc_ptr.dtype.element_ty), mask=mask)
        cm = tl.max(z, axis=0)
        cidx = tl.min(tl.where(z == cm, offs, 2147483647), axis=0)
        idx = tl.where(cm > m, cidx, idx)  # strict: an earlier range/tile keeps ties (first index wins)
        new_m = tl.maximum(m, cm)
        safe_m = tl.where(new_m == -float("inf"), 0.0, new_m)  # all -inf so far: keep the sums at zero
        alpha = tl.exp(m - safe_m)
        delta = m - safe_m
        e = tl.exp(z - safe_m)
        d = z - safe_m
        b = alpha * (b + tl.where(s > 0, delta * s, 0.0)) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = new_m

    o = row * NUM_SPLITS + split
    tl.store(part_m_ptr + o, m)
    tl.store(part_s_ptr + o, s)
    tl.store(part_b_ptr + o, b)
    tl.store(part_i_ptr + o, idx)


@triton.jit
def sampler_finish_kernel(
    # pointers
    logits_ptr,  # [M, V], as above (rescanned only in the range the sample falls in)
    part_m_ptr,
    part_s_ptr,
    part_b_ptr,
    part_i_ptr,
    u_ptr,  # [M] fp32 uniforms in [0, 1)
    ent_ptr,  # [M] fp32 out: entropy of softmax(z)
    lse_ptr,  # [M] fp32 out: logsumexp(z)
    amax_ptr,  # [M] int64 out: argmax(z), first index on ties
    sample_ptr,  # [M] int64 out: inverse-CDF sample
    # sizes / scalars
    V,
    stride_lm,
    t,
    cap,
    SPLIT_LEN,
    NUM_SPLITS,
    # meta
    BLOCK_S: tl.constexpr,  # next power of two >= NUM_SPLITS
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)
    js = tl.arange(0, BLOCK_S)
    jm = js < NUM_SPLITS
    pbase = row * NUM_SPLITS + js
    pm = tl.load(part_m_ptr + pbase, mask=jm, other=-float("inf"))
    ps = tl.load(part_s_ptr + pbase, mask=jm, other=0.0)
    pb = tl.load(part_b_ptr + pbase, mask=jm, other=0.0)
    pi = tl.load(part_i_ptr + pbase, mask=jm, other=2147483647)

    # --- merge the ranges: logsumexp, entropy = log s - E_p[z - m], argmax ---------------------------------
    m = tl.max(pm, axis=0)
    live = jm & (ps > 0)
    scale = tl.where(live, tl.exp(pm - m), 0.0)
    w = ps * scale  # each range's share of sum exp(z - m)
    s = tl.sum(w, axis=0)
    bsum = tl.sum(tl.where(live, scale * (pb + (pm - m) * ps), 0.0), axis=0)
    log_s = tl.log(s)
    tl.store(ent_ptr + row, log_s - bsum / s)
    tl.store(lse_ptr + row, m + log_s)
    amax = tl.min(tl.where(jm & (pm == m), pi, 2147483647), axis=0)
    tl.store(amax_ptr + row, amax.to(tl.int64))

    # --- inverse CDF: the range where cumsum(w) first exceeds u * s, then rescan that range ----------------------
    target = tl.load(u_ptr + row) * s
    cum = tl.cumsum(w, axis=0)
    j = tl.sum(tl.where(jm & (cum <= target), 1, 0), axis=0)
    j = tl.minimum(j, tl.max(tl.where(live, js, 0), axis=0))  # rounding guard: never past the last live range
    rem = target - tl.sum(tl.where(js < j, w, 0.0), axis=0)

    start = j * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, V)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lm
    offs0 = tl.arange(0, BLOCK_V)
    run = 0.0
    found = 0
    result = start
    last_nz = start
    off = start
    while (off < end) & (found == 0):
        offs = off + offs0
        mask = offs < end
        z = _processed(tl.load(row_ptr + offs, mask=mask, other=0.0), t, cap, HAS_SOFTCAP)
        e = tl.where(mask, tl.exp(z - m), 0.0)
        c = tl.cumsum(e, axis=0) + run
        hit = (c > rem) & (e > 0)
        first = tl.min(tl.where(hit, offs, 2147483647), axis=0)
        result = tl.where(first < 2147483647, first, result)
        found = tl.where(first < 2147483647, 1, found)
        last_nz = tl.maximum(last_nz, tl.max(tl.where(e > 0, offs, -1), axis=0))
        run += tl.sum(e, axis=0)
        off += BLOCK_V
    result = tl.where(found == 1, result, last_nz)  # u * s rounded past the range total: its last live index
    tl.store(sample_ptr + row, result.to(tl.int64))


@triton.jit
def row_lse_kernel(
    logits_ptr,  # [M, V] last dim contiguous
    lse_ptr,  # [M] fp32 out: logsumexp of the row (in fp32)
    V,
    stride_lm,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lm
    offs0 = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    for off in range(0, V, BLOCK_V):
        offs = off + offs0
        z = tl.load(row_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(z, axis=0))
        safe_m = tl.where(new_m == -float("inf"), 0.0, new_m)
        s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(z - safe_m), axis=0)
        m = new_m
    tl.store(lse_ptr + row, m + tl.log(s))


@triton.jit
def soft_embed_kernel(
    # pointers
    logits_ptr,  # [M, V] (bf16 in the model), last dim contiguous
    lse_ptr,  # [M] fp32 logsumexp per row (row_lse_kernel)
    emb_ptr,  # [V, H] embedding table, last dim contiguous
    part_ptr,  # [NUM_SPLITS, M, H] fp32 out: partial sums of softmax(l) @ E over each vocabulary range
    # sizes
    M,
    V,
    H,
    stride_lm,
    stride_ev,
    stride_ps,
    stride_pm,
    SPLIT_LEN,  # multiple of BLOCK_K
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # probabilities are rounded to this dtype before the product (bf16 = HF)
):
    # --- program -> (range, H tile, M tile); M fastest so the M tiles sharing an E tile run together (L2) -------
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(H, BLOCK_N)
    pid_m = pid % num_pid_m
    rest = pid // num_pid_m
    pid_n = rest % num_pid_n
    split = rest // num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < H
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)

    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, V)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for v0 in range(start, end, BLOCK_K):
        v = v0 + offs_k
        mask_v = v < end
        l = tl.load(logits_ptr + offs_m.to(tl.int64)[:, None] * stride_lm + v[None, :],
                    mask=mask_m[:, None] & mask_v[None, :], other=-float("inf"))  # fmt: skip
        p = tl.exp(l.to(tl.float32) - lse[:, None])  # exact softmax probabilities, no rescaling needed
        e = tl.load(emb_ptr + v.to(tl.int64)[:, None] * stride_ev + offs_n[None, :],
                    mask=mask_v[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
        acc = dot_acc(p, e, acc, DOT_DTYPE)

    out = part_ptr + split.to(tl.int64) * stride_ps + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])
