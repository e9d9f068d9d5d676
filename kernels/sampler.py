"""Fused per-position sampler and the self-conditioning soft embedding, without vocabulary-sized fp32 temporaries.

Sampler: for each row of logits ``l [M, V]`` (M = canvas positions) and temperature t, with
``z = softcap(l) / t`` (softcap optional; the model may already have applied it), computes in one pass over
vocabulary ranges (online softmax) plus a rescan of one range:

- ``entropy``   fp32 [M]: entropy of softmax(z) (nats) = HF ``Categorical(logits=z).entropy()``;
- ``argmax``    int64 [M]: argmax(z), first index on ties (= ``torch.argmax``);
- ``sample``    int64 [M]: **inverse-CDF** sample with one caller-supplied uniform u per row: the smallest i with
  ``sum_{j<=i} exp(z_j - m) > u * sum_j exp(z_j - m)``. Deterministic given u, distributed as
  ``torch.multinomial(softmax(z), 1)`` (not Gumbel-max: that needs a uniform per vocabulary entry);
- ``logsumexp`` fp32 [M]: logsumexp(z);
- optionally writes z itself (e.g. cast to bf16: HF's self-conditioning logits for the next step).

Soft embedding: ``sc_soft_embedding(l, E, s) = (softmax(l) cast to E.dtype) @ E * s`` with s cast to E.dtype
(HF ``DiffusionGemmaTextDecoder`` self-conditioning input). Pass 1 computes each row's logsumexp, pass 2 is a
split-V GEMM whose A tile is ``exp(l - lse)`` built in registers; only [splits, M, H] fp32 partials are stored.

Public API: :func:`sample_logits`, :func:`sample_logits_torch`, :func:`sc_soft_embedding`,
:func:`sc_soft_embedding_torch`, :class:`SampleOutput`.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from ._common import (
    ACT_DTYPES,
    HAVE_TRITON,
    check,
    check_dtype,
    check_same_device,
    next_pow2,
    require_launchable,
    tl_dtype,
)

if HAVE_TRITON:
    from . import _sampler_triton as _k

log = logging.getLogger(__name__)

# Rows the torch twins process at once: bounds their fp32 transients to ROW_CHUNK * V * 4 bytes (16 MiB).
_TWIN_ROW_CHUNK = 16
# Vocabulary columns the soft-embedding twin processes at once.
_TWIN_V_CHUNK = 16384


class SampleOutput(NamedTuple):
    entropy: torch.Tensor  # [M] fp32
    argmax: torch.Tensor  # [M] int64
    sample: torch.Tensor  # [M] int64
    logsumexp: torch.Tensor  # [M] fp32


def _check_sampler_inputs(
    logits: torch.Tensor, temperature: float, uniforms: torch.Tensor, softcap: float | None,
    processed_out: torch.Tensor | None,
) -> None:  # fmt: skip
    check_dtype("logits", logits, ACT_DTYPES)
    check(logits.dim() == 2, f"logits: expected [M, V], got {tuple(logits.shape)}")
    check(logits.shape[1] > 0, "logits: empty vocabulary")
    check(logits.stride(1) == 1, "logits: last dim must be contiguous")
    check(isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0,
          f"temperature must be a finite positive number, got {temperature!r}")  # fmt: skip
    check(softcap is None or (math.isfinite(softcap) and softcap > 0), f"softcap must be positive, got {softcap!r}")
    check(uniforms.dim() == 1 and uniforms.shape[0] == logits.shape[0],
          f"uniforms: expected [{logits.shape[0]}], got {tuple(uniforms.shape)}")  # fmt: skip
    check(uniforms.is_floating_point(), f"uniforms: float dtype expected, got {uniforms.dtype}")
    if processed_out is not None:
        check_dtype("processed_out", processed_out, ACT_DTYPES)
        check(tuple(processed_out.shape) == tuple(logits.shape) and processed_out.stride(1) == 1,
              f"processed_out: expected {tuple(logits.shape)} with a contiguous last dim")  # fmt: skip
    check_same_device(logits=logits, uniforms=uniforms, processed_out=processed_out)


def _processed_torch(l: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    z = l.to(torch.float32)
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def sample_logits_torch(
    logits: torch.Tensor,
    temperature: float,
    uniforms: torch.Tensor,
    *,
    softcap: float | None = None,
    processed_out: torch.Tensor | None = None,
) -> SampleOutput:
    """Torch twin of :func:`sample_logits` (any device); works through ``_TWIN_ROW_CHUNK`` rows at a time."""
    _check_sampler_inputs(logits, temperature, uniforms, softcap, processed_out)
    m = logits.shape[0]
    dev = logits.device
    ent = torch.empty(m, dtype=torch.float32, device=dev)
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    amax = torch.empty(m, dtype=torch.int64, device=dev)
    smp = torch.empty(m, dtype=torch.int64, device=dev)
    u_all = uniforms.to(torch.float32)
    for r0 in range(0, m, _TWIN_ROW_CHUNK):
        r1 = min(m, r0 + _TWIN_ROW_CHUNK)
        z = _processed_torch(logits[r0:r1], temperature, softcap)  # [r, V]
        if processed_out is not None:
            processed_out[r0:r1] = z.to(processed_out.dtype)
        zl = torch.logsumexp(z, dim=-1)  # [r]
        logp = z - zl[:, None]
        p = logp.exp()
        ent[r0:r1] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        lse[r0:r1] = zl
        amax[r0:r1] = z.argmax(-1)
        cdf = torch.cumsum(torch.exp(z - z.max(-1, keepdim=True).values), dim=-1)  # [r, V], unnormalized
        target = u_all[r0:r1, None] * cdf[:, -1:]
        idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        v_idx = torch.arange(z.shape[1], device=dev)
        last_live = torch.where(p > 0, v_idx, torch.zeros_like(v_idx)).amax(-1)
        smp[r0:r1] = torch.minimum(idx, last_live)
    return SampleOutput(ent, amax, smp, lse)


def _sampler_splits(m: int, v: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """(NUM_SPLITS, SPLIT_LEN): enough (row, range) programs to fill the GPU about four times over."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter: a few ranges, to exercise the merge
    tiles = -(-v // block_v)
    splits = max(1, min(tiles, -(-4 * sms // max(m, 1))))
    split_len = -(-tiles // splits) * block_v
    return -(-v // split_len), split_len


def sample_logits(
    logits: torch.Tensor,
    temperature: float,
    uniforms: torch.Tensor,
    *,
    softcap: float | None = None,
    processed_out: torch.Tensor | None = None,
    block_v: int | None = None,
    num_splits: int | None = None,
) -> SampleOutput:
    """Fused sampler on the GPU: ``logits [M, V]`` (fp32/bf16/fp16, last dim contiguous) -> :class:`SampleOutput`.

    ``uniforms [M]``: one U[0, 1) draw per row (the caller's RNG; the sample is deterministic given them).
    ``softcap``: apply ``softcap * tanh(l / softcap)`` first (pass it when the logits are the raw lm_head output).
    ``processed_out [M, V]``: if given, receives z = softcap(l) / t in its dtype (HF's next-step SC logits).
    ``block_v`` / ``num_splits`` override the vocabulary tile and range count (tests, tuning).
    """
    _check_sampler_inputs(logits, temperature, uniforms, softcap, processed_out)
    dev = logits.device
    require_launchable(_k.sampler_partial_kernel if HAVE_TRITON else None, dev)
    m, v = logits.shape
    ent = torch.empty(m, dtype=torch.float32, device=dev)
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    amax = torch.empty(m, dtype=torch.int64, device=dev)
    smp = torch.empty(m, dtype=torch.int64, device=dev)
    if m == 0:
        return SampleOutput(ent, amax, smp, lse)
    bv = block_v or (4096 if dev.type == "cuda" else 64)
    check(bv >= 16 and bv & (bv - 1) == 0, f"block_v {bv} must be a power of two >= 16")
    splits, split_len = _sampler_splits(m, v, bv, dev)
    if num_splits is not None:
        check(num_splits >= 1, "num_splits must be >= 1")
        split_len = -(-(-(-v // num_splits)) // bv) * bv
        splits = -(-v // split_len)
    part_m = torch.empty((m, splits), dtype=torch.float32, device=dev)
    part_s = torch.empty_like(part_m)
    part_b = torch.empty_like(part_m)
    part_i = torch.empty((m, splits), dtype=torch.int32, device=dev)
    u = uniforms.to(torch.float32).contiguous()
    t = float(temperature)
    cap = float(softcap) if softcap is not None else 1.0
    warps = 8 if bv >= 2048 else 4
    proc = processed_out if processed_out is not None else logits
    _k.sampler_partial_kernel[(m * splits,)](
        logits, proc, part_m, part_s, part_b, part_i,
        v, logits.stride(0), proc.stride(0), t, cap, split_len, splits,
        BLOCK_V=bv, HAS_SOFTCAP=softcap is not None, WRITE_PROCESSED=processed_out is not None,
        num_warps=warps,
    )  # fmt: skip
    _k.sampler_finish_kernel[(m,)](
        logits, part_m, part_s, part_b, part_i, u, ent, lse, amax, smp,
        v, logits.stride(0), t, cap, split_len, splits,
        BLOCK_S=max(16, next_pow2(splits)), BLOCK_V=bv, HAS_SOFTCAP=softcap is not None,
        num_warps=warps,
    )  # fmt: skip
    return SampleOutput(ent, amax, smp, lse)


# ---------------------------------------------------------------------------------------------------------------
# self-conditioning soft embedding
# ---------------------------------------------------------------------------------------------------------------


def _check_soft_inputs(logits: torch.Tensor, embedding: torch.Tensor) -> None:
    check_dtype("logits", logits, ACT_DTYPES)
    check_dtype("embedding", embedding, ACT_DTYPES)
    check(logits.dim() == 2 and embedding.dim() == 2, "logits [M, V] and embedding [V, H] expected")
    check(logits.shape[1] == embedding.shape[0],
          f"logits vocab {logits.shape[1]} != embedding rows {embedding.shape[0]}")  # fmt: skip
    check(logits.stride(1) == 1 and embedding.stride(1) == 1, "logits/embedding: last dim must be contiguous")
    check_same_device(logits=logits, embedding=embedding)


def _rounded_scale(embed_scale: float, dtype: torch.dtype) -> float:
    """embed_scale rounded like HF's ``embed_scale.to(weight.dtype)`` (sqrt(2816) -> 53.0 in bf16), as a Python
    float: multiplying by it equals multiplying by the 0-d tensor, without a host-to-device copy (graph-safe)."""
    return float(torch.tensor(embed_scale, dtype=torch.float32).to(dtype))


def _row_logsumexp_torch(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp per row, V-chunked (no [M, V] fp32 copy)."""
    lse = torch.full((logits.shape[0],), -float("inf"), dtype=torch.float32, device=logits.device)
    for c0 in range(0, logits.shape[1], _TWIN_V_CHUNK):
        lse = torch.logaddexp(lse, torch.logsumexp(logits[:, c0 : c0 + _TWIN_V_CHUNK].to(torch.float32), dim=-1))
    return lse


def sc_soft_embedding_torch(logits: torch.Tensor, embedding: torch.Tensor, embed_scale: float) -> torch.Tensor:
    """Torch twin of :func:`sc_soft_embedding`: ``[M, V], [V, H] -> [M, H]`` in the embedding's dtype.

    Probabilities are exact fp32 softmax values rounded to embedding.dtype (HF's ``.to(weight.dtype)``), the
    product accumulates in fp32, is rounded to embedding.dtype and multiplied by embed_scale cast to that dtype.
    V-chunked: transients are [M, _TWIN_V_CHUNK].
    """
    _check_soft_inputs(logits, embedding)
    lse = _row_logsumexp_torch(logits)
    acc = torch.zeros((logits.shape[0], embedding.shape[1]), dtype=torch.float32, device=logits.device)
    for c0 in range(0, logits.shape[1], _TWIN_V_CHUNK):
        p = torch.exp(logits[:, c0 : c0 + _TWIN_V_CHUNK].to(torch.float32) - lse[:, None]).to(embedding.dtype)
        acc += p.to(torch.float32) @ embedding[c0 : c0 + _TWIN_V_CHUNK].to(torch.float32)
    return acc.to(embedding.dtype) * _rounded_scale(embed_scale, embedding.dtype)


def sc_soft_embedding(
    logits: torch.Tensor,
    embedding: torch.Tensor,
    embed_scale: float,
    *,
    dot_dtype: torch.dtype | None = None,
    num_splits: int | None = None,
    block_sizes: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``softmax(logits) @ embedding * embed_scale`` on the GPU, same contract as the twin.

    ``dot_dtype`` (default embedding.dtype) is the dtype the probabilities are rounded to and the tensor-core
    operand type (fp32/fp16 in the CPU interpreter). ``num_splits`` / ``block_sizes`` (BLOCK_M, BLOCK_N,
    BLOCK_K) override the vocabulary split and tiles.
    """
    _check_soft_inputs(logits, embedding)
    dev = logits.device
    require_launchable(_k.soft_embed_kernel if HAVE_TRITON else None, dev)
    dot_dtype = embedding.dtype if dot_dtype is None else dot_dtype
    check(dot_dtype in ACT_DTYPES, f"dot_dtype {dot_dtype} not supported")
    m, v = logits.shape
    h = embedding.shape[1]
    if m == 0:
        return torch.empty((0, h), dtype=embedding.dtype, device=dev)
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    bv = 4096 if dev.type == "cuda" else 64
    _k.row_lse_kernel[(m,)](logits, lse, v, logits.stride(0), BLOCK_V=bv, num_warps=8 if bv >= 2048 else 4)

    bm, bn, bk = block_sizes or ((64, 128, 64) if m > 32 else (16, 128, 64))
    tiles = -(-m // bm) * -(-h // bn)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
        num_splits = max(1, min(-(-v // bk), -(-4 * sms // tiles)))
    split_len = -(-(-(-v // num_splits)) // bk) * bk
    splits = -(-v // split_len)
    part = torch.empty((splits, m, h), dtype=torch.float32, device=dev)
    grid = (splits * tiles,)
    _k.soft_embed_kernel[grid](
        logits, lse, embedding, part,
        m, v, h, logits.stride(0), embedding.stride(0), part.stride(0), part.stride(1), split_len,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_DTYPE=tl_dtype(dot_dtype),
        num_warps=8 if bm >= 64 else 4, num_stages=3,
    )  # fmt: skip
    return part.sum(0).to(embedding.dtype) * _rounded_scale(embed_scale, embedding.dtype)
