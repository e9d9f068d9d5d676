"""Fused MoE over NVFP4 (or dense) experts: align tokens by expert, two grouped GEMMs, combine per token.

Math (architecture.md §3.5), for token t, its k-th selected expert e and routing weight w[t, k] (which already
includes ``router.per_expert_scale[e]``)::

    g, u   = split(x[t] @ gate_up[e].T)          # gate = rows 0..I-1, up = rows I..2I-1
    y      = (gelu_tanh(g) * u) @ down[e].T
    out[t] = sum_k w[t, k] * y

Precision contract (kernel and twin alike): fp32 products and accumulation; ``gelu_tanh(g) * u`` is stored in
x's dtype (it is the second GEMM's operand); each pair's weighted output is stored in x's dtype as [T, topk, H]
and summed over topk in fp32 in slot order, then cast to x's dtype once.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, P = T * topk routed pairs.
Public API: :class:`NVFP4Experts`, :class:`DenseExperts`, :func:`moe_align_block_size`, :func:`fused_moe`
(Triton, CUDA) and :func:`fused_moe_torch` (twin, any device, loops over experts).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

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
from .nvfp4_gemm import check_nvfp4_weight, dequantize_nvfp4

if HAVE_TRITON:
    from . import _fused_moe_triton as _k

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NVFP4Experts:
    """A layer's experts in NVFP4 (ModelOpt layout, experts stacked, gate and up fused gate-first).

    gate_up [E, 2I, H/2] uint8, gate_up_scale [E, 2I, H/16] float8_e4m3fn, gate_up_scale_2 [E] float32 (gate and
    up share one global per expert); down [E, H, I/2] uint8, down_scale [E, H, I/16] float8_e4m3fn,
    down_scale_2 [E] float32.
    """

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor
    gate_up_scale_2: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor
    down_scale_2: torch.Tensor

    def __post_init__(self) -> None:
        check(self.gate_up.dim() == 3 and self.down.dim() == 3, "NVFP4Experts: gate_up/down must be [E, N, K/2]")
        two_i, h = check_nvfp4_weight(self.gate_up, self.gate_up_scale, self.gate_up_scale_2, "gate_up")
        h_out, i = check_nvfp4_weight(self.down, self.down_scale, self.down_scale_2, "down")
        e = self.gate_up.shape[0]
        check(two_i % 2 == 0 and two_i // 2 == i, f"NVFP4Experts: gate_up rows {two_i} != 2 * down in_features {i}")
        check(h_out == h, f"NVFP4Experts: down rows {h_out} != gate_up in_features {h}")
        check(self.down.shape[0] == e, f"NVFP4Experts: {e} gate_up experts vs {self.down.shape[0]} down experts")
        for name in ("gate_up_scale_2", "down_scale_2"):
            t = getattr(self, name)
            check(tuple(t.shape) == (e,), f"NVFP4Experts.{name}: shape {tuple(t.shape)} != ({e},)")
        check_same_device(**{f: getattr(self, f) for f in self.__dataclass_fields__})

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate_up.shape[2] * 2

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2] * 2


@dataclass(frozen=True)
class DenseExperts:
    """Unquantized experts (HF layout): gate_up [E, 2I, H], down [E, H, I], any float dtype."""

    gate_up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        check_dtype("gate_up", self.gate_up, ACT_DTYPES)
        check_dtype("down", self.down, ACT_DTYPES)
        check(self.gate_up.dim() == 3 and self.down.dim() == 3, "DenseExperts: gate_up/down must be 3-D")
        e, two_i, h = self.gate_up.shape
        check(tuple(self.down.shape) == (e, h, two_i // 2) and two_i % 2 == 0,
              f"DenseExperts: down {tuple(self.down.shape)} does not match gate_up {tuple(self.gate_up.shape)}")  # fmt: skip
        check(self.gate_up.stride(-1) == 1 and self.down.stride(-1) == 1, "DenseExperts: last dim must be contiguous")
        check_same_device(gate_up=self.gate_up, down=self.down)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.down.shape[2]


Experts = Union[NVFP4Experts, DenseExperts]


def _check_routing(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: Experts) -> None:
    check(isinstance(experts, (NVFP4Experts, DenseExperts)), f"experts: unsupported type {type(experts).__name__}")
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2, f"x: expected [T, H], got {tuple(x.shape)}")
    check(x.shape[1] == experts.hidden_size, f"x: hidden {x.shape[1]} != experts' hidden {experts.hidden_size}")
    check(topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0],
          f"topk_ids: expected [T={x.shape[0]}, topk], got {tuple(topk_ids.shape)}")  # fmt: skip
    check(not topk_ids.is_floating_point() and not topk_ids.is_complex(), f"topk_ids: integer dtype, got {topk_ids.dtype}")
    check(tuple(topk_weights.shape) == tuple(topk_ids.shape),
          f"topk_weights: shape {tuple(topk_weights.shape)} != topk_ids {tuple(topk_ids.shape)}")  # fmt: skip
    check(topk_weights.is_floating_point(), f"topk_weights: float dtype expected, got {topk_weights.dtype}")
    check_same_device(x=x, topk_weights=topk_weights, topk_ids=topk_ids, experts=experts.gate_up)
    if topk_ids.device.type == "cpu" and topk_ids.numel():  # free on CPU; on CUDA it would cost a host sync
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        check(0 <= lo and hi < experts.num_experts, f"topk_ids: values in [{lo}, {hi}], expected [0, {experts.num_experts})")


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group routed pairs by expert, each expert's run padded to a multiple of ``block_m``. Device-side, no sync.

    Returns ``sorted_ids`` int32 [P_pad] (pair ids t * topk + k; padding = P), ``expert_ids`` int32
    [P_pad / block_m] (-1 for the unused tail blocks) and ``num_post`` int32 [1] (used length of sorted_ids).
    P_pad = the worst case round_up(P + min(E, P) * (block_m - 1), block_m), so shapes depend only on
    (T, topk, E, block_m). Within an expert, pairs keep ascending pair-id order.
    """
    check(topk_ids.dim() == 2, f"topk_ids: expected [T, topk], got {tuple(topk_ids.shape)}")
    check(block_m > 0 and num_experts > 0, "block_m and num_experts must be positive")
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [P]
    p = flat.numel()
    p_pad = -(-(p + min(num_experts, p) * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)  # [E] padded run ends
    order = torch.argsort(flat, stable=True)  # pair ids grouped by expert, ascending within
    sorted_e = flat[order]
    rank = torch.arange(p, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    pos = (ends - padded)[sorted_e] + rank
    sorted_ids = torch.full((max(p_pad, block_m),), p, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(sorted_ids.numel() // block_m, device=dev) * block_m
    total = ends[-1:]  # [1]
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    expert_ids = torch.where(block_start < total, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, total.to(torch.int32)


def _moe_config(p: int, e: int, h: int, i: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K gate_up, BLOCK_K down, num_warps, num_stages).

    BLOCK_M follows the mean pairs per expert (P/E = 16 at canvas 256, top-8 of 128): small blocks waste little
    padding and each expert's weights are read about once. Spill-free per ptxas; not tuned on hardware.
    """
    avg = p / max(e, 1)
    bm = 16 if avg <= 24 else (32 if avg <= 48 else 64)
    return bm, 64, pick_block_k(h), pick_block_k(i), 4, 3


def fused_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: Experts,
    *,
    dot_dtype: torch.dtype | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Fused MoE on the GPU: ``x [T, H] -> [T, H]`` in x's dtype (see the module docstring for the math).

    ``topk_weights`` [T, topk] (cast to fp32) must already include any per-expert output scale. The NVFP4
    global scales are applied in the GEMM epilogues. ``dot_dtype`` (default x's dtype) is the tensor-core
    operand type (fp32/fp16 under Triton's CPU interpreter). ``block_m`` overrides the token block size.
    """
    _check_routing(x, topk_weights, topk_ids, experts)
    dev = x.device
    require_launchable(_k.moe_gate_up_kernel if HAVE_TRITON else None, dev)
    dot_dtype = x.dtype if dot_dtype is None else dot_dtype
    check(dot_dtype in ACT_DTYPES, f"dot_dtype {dot_dtype} not supported")
    t, topk = topk_ids.shape
    e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    p = t * topk
    if p == 0:
        return torch.zeros_like(x)
    bm, bn, bk1, bk2, warps, stages = _moe_config(p, e, h, i)
    if block_m is not None:
        check(block_m in (16, 32, 64, 128), f"block_m {block_m} must be 16, 32, 64 or 128")
        bm = block_m
    check(h % bk1 == 0 and i % bk2 == 0, f"hidden {h} and intermediate {i} must be multiples of 16")

    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, e, bm)
    x = x.contiguous() if x.stride(1) != 1 else x
    rw = topk_weights.to(torch.float32).contiguous().reshape(-1)  # [P]
    hbuf = torch.empty((p, i), dtype=x.dtype, device=dev)  # gelu(gate) * up per pair
    pair_out = torch.empty((p, h), dtype=x.dtype, device=dev)  # weighted expert output per pair
    n_blocks = expert_ids.numel()

    nv = isinstance(experts, NVFP4Experts)
    if nv:
        w1, s1, g1 = experts.gate_up, experts.gate_up_scale.view(torch.uint8), experts.gate_up_scale_2.float()
        w2, s2, g2 = experts.down, experts.down_scale.view(torch.uint8), experts.down_scale_2.float()
        for name, w in (("gate_up", w1), ("down", w2)):  # the kernels may read packed rows as int32 words
            check(w.data_ptr() % 4 == 0 and w.stride(0) % 4 == 0 and w.stride(1) % 4 == 0,
                  f"{name}: packed rows must be 4-byte aligned")  # fmt: skip
    else:  # scale pointers unused by the dense instantiation; pass the weights to keep the signature
        w1, s1, g1 = experts.gate_up, experts.gate_up, rw
        w2, s2, g2 = experts.down, experts.down, rw
    tdot = tl_dtype(dot_dtype)

    grid1 = (n_blocks * triton_cdiv(i, bn),)
    _k.moe_gate_up_kernel[grid1](
        x, w1, s1, g1, hbuf, sorted_ids, expert_ids, num_post,
        p, i, h, topk,
        x.stride(0), w1.stride(0), w1.stride(1), s1.stride(0), s1.stride(1), hbuf.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk1, W_NVFP4=nv, DOT_DTYPE=tdot,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    grid2 = (n_blocks * triton_cdiv(h, bn),)
    _k.moe_down_kernel[grid2](
        hbuf, w2, s2, g2, rw, pair_out, sorted_ids, expert_ids, num_post,
        p, h, i,
        hbuf.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), pair_out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk2, W_NVFP4=nv, DOT_DTYPE=tdot,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    # Combine: deterministic fp32 sum over the topk slots (no atomics), one cast.
    return pair_out.view(t, topk, h).sum(dim=1, dtype=torch.float32).to(x.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _expert_weights_f32(experts: Experts, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, H], down [H, I]) of expert e in fp32, global scales included (one expert at a time)."""
    if isinstance(experts, NVFP4Experts):
        w1 = dequantize_nvfp4(experts.gate_up[e], experts.gate_up_scale[e], experts.gate_up_scale_2[e])
        w2 = dequantize_nvfp4(experts.down[e], experts.down_scale[e], experts.down_scale_2[e])
        return w1, w2
    return experts.gate_up[e].to(torch.float32), experts.down[e].to(torch.float32)


def fused_moe_torch(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: Experts,
) -> torch.Tensor:
    """Torch twin of :func:`fused_moe` for NVFP4 or dense experts, on any device; loops over the used experts.

    Same precision contract as the kernel; dequantizes one expert at a time (never the whole stack).
    """
    _check_routing(x, topk_weights, topk_ids, experts)
    t, topk = topk_ids.shape
    h, i = experts.hidden_size, experts.intermediate_size
    xf = x.to(torch.float32)
    rw = topk_weights.to(torch.float32)
    pair_out = torch.zeros((t, topk, h), dtype=x.dtype, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        w1, w2 = _expert_weights_f32(experts, int(e))
        gu = xf[tok] @ w1.t()  # [n, 2I]
        hid = (F.gelu(gu[:, :i], approximate="tanh") * gu[:, i:]).to(x.dtype).to(torch.float32)
        y = (hid @ w2.t()) * rw[tok, slot, None]  # [n, H]
        pair_out[tok, slot] = y.to(x.dtype)
    return pair_out.sum(dim=1, dtype=torch.float32).to(x.dtype)
