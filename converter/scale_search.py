"""Scale search for NVFP4 weights: pick each block's E4M3 scale (and optionally the tensor scale) to minimize
the importance-weighted squared error  sum_k imp[k] * (w[n, k] - q(w)[n, k])^2.

`imp` is a per-input-channel weight, normally the calibration mean of x_k^2 for the layer's input x, so the
objective is the diagonal approximation of the layer-output error E[(x . (w - q))^2]; with imp = 1 it is the
plain weight MSE.

Block scales: the candidates are consecutive E4M3 codes around the RTN scale fp8(amax_block / (6 * ws2))
(positive E4M3 codes 1..126 are monotonic in value, so "code + d" walks the scale grid). The default window
(-3 .. +6 codes, about 0.7x .. 1.5-1.9x the RTN scale) contains the four-over-six choice (block max mapped to
4 instead of 6, i.e. 1.5x), so this sweep is a superset of 4/6 at the block level. The RTN candidate is tried
first and only a strictly smaller error replaces it, so the result is never worse than RTN, per block.

Tensor scale (optional): ws2 = amax/2688 * m for m in `global_multipliers` (m = 1.75 is 4/6's 256-based
normalization), chosen per expert by total error. Output: the same `NVFP4Tensor` as `nvfp4.quantize`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..runtime.errors import CheckpointError
from .nvfp4 import (
    BLOCK,
    DEFAULT_CHUNK_ELEMENTS,
    E2M1_MAX,
    NVFP4Tensor,
    _as_rows,
    _check_finite,
    _row_ws2,
    _ws2_vector,
    _rows_per_chunk,
    dequantize,
    global_scale_from_amax,
    quantize_with_block_scales,
    rtn_block_scales,
    shared_weight_scale_2,
    tensor_amax,
)

log = logging.getLogger(__name__)

# E4M3 code steps around the RTN block scale. Measured on Gaussian / Student-t weights with a window of
# -8..+15: without importance the winners lie in -2..+6 (the +3..+5 cluster is four-over-six's 1.5x); with a
# skewed importance a few percent go below -3, worth <0.5 % of the weighted error. 10 candidates.
DEFAULT_OFFSETS = tuple(range(-3, 7))
DEFAULT_GLOBAL_MULTIPLIERS = (1.0, 1.125, 1.25, 1.5, 1.75)
_E4M3_MAX_CODE = 126  # 0x7E = 448; 0x7F is NaN
_E4M3_MIN_CODE = 1  # 2^-9


def e2m1_round_magnitude(a: torch.Tensor) -> torch.Tensor:
    """|value| of E2M1 round-to-nearest-even of non-negative fp32 `a` (== |e2m1_decode(e2m1_encode(a))|).

    Adding and subtracting 2^22 * step rounds to a multiple of `step` with IEEE ties-to-even, and the grid
    step is 0.5 below 2, 1 below 4 and 2 above; that is exactly E2M1's grid (then saturate at 6)."""
    magic = torch.where(a < 2.0, 4194304.0, torch.where(a < 4.0, 8388608.0, 16777216.0))
    return ((a + magic) - magic).clamp_(max=E2M1_MAX)


def _importance(imp: torch.Tensor | None, E: int, K: int, name: str, device) -> torch.Tensor | None:
    """Validated importance as [E, K] fp32 (rows of a chunk take row // N), or None for uniform."""
    if imp is None:
        return None
    imp = torch.as_tensor(imp, dtype=torch.float32, device=device)
    if imp.shape == (K,):
        imp = imp.expand(E, K)
    if imp.shape != (E, K):
        raise CheckpointError(f"{name}: importance must be [K] = [{K}]" + (f" or [E, K] = [{E}, {K}]" if E > 1 else "")
                              + f", got {tuple(imp.shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise CheckpointError(f"{name}: importance weights must be finite and >= 0")
    return imp


def weighted_block_errors(
    w: torch.Tensor, q: NVFP4Tensor, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_k imp[k] (w - dequant(q))^2 per block: [..., N, K//16] fp32 (a small-tensor helper for tests/reports)."""
    _, E, N, K = _as_rows(w, "weight")
    d = dequantize(q).reshape(-1, K)
    err = (w.reshape(-1, K).float() - d) ** 2
    imp = _importance(importance, E, K, "weight", w.device)
    if imp is not None:
        err = err * imp.repeat_interleave(N, dim=0)
    return err.view(-1, K // BLOCK, BLOCK).sum(-1).view(*w.shape[:-1], K // BLOCK)


def _sweep_chunk(
    x: torch.Tensor, imp: torch.Tensor | None, ws2_rows: torch.Tensor, offsets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best block scales for one chunk. x [r, K] fp32, ws2_rows [r]; returns (fp8 scales [r, nb], err [r, nb])."""
    r, K = x.shape
    nb = K // BLOCK
    a = x.abs().view(r, nb, BLOCK)
    w_imp = imp.reshape(r, nb, BLOCK) if imp is not None else None
    rtn = rtn_block_scales(a.amax(dim=-1), ws2_rows)  # [r, nb] fp8
    rtn_code = rtn.view(torch.uint8).to(torch.int16)
    best_code = rtn_code.clone()
    best_err = torch.full((r, nb), float("inf"), dtype=torch.float32, device=x.device)
    ws2_col = ws2_rows.unsqueeze(-1)
    # RTN first: a later candidate must be strictly better to replace it
    for off in sorted(offsets, key=lambda o: (o != 0, abs(o), o)):
        code = (rtn_code + off).clamp_(_E4M3_MIN_CODE, _E4M3_MAX_CODE)
        d = code.to(torch.uint8).view(torch.float8_e4m3fn).float() * ws2_col  # [r, nb], as dequant computes it
        q = e2m1_round_magnitude(a / d.unsqueeze(-1)) * d.unsqueeze(-1)
        e = (a - q).square_()
        if w_imp is not None:
            e.mul_(w_imp)
        err = e.sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_code = torch.where(better, code, best_code)
    return best_code.to(torch.uint8).view(torch.float8_e4m3fn), best_err


def mse_quantize(
    w: torch.Tensor,
    importance: torch.Tensor | None = None,
    *,
    weight_scale_2: torch.Tensor | float | None = None,
    offsets: Sequence[int] = DEFAULT_OFFSETS,
    search_global: bool = False,
    global_multipliers: Sequence[float] = DEFAULT_GLOBAL_MULTIPLIERS,
    name: str = "weight",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> NVFP4Tensor:
    """NVFP4 with searched block scales for [N, K] or stacked [E, N, K].

    importance: [K] or [E, K] (per expert) non-negative weights, None = uniform.
    weight_scale_2: fixed global scale(s) (e.g. shared by a fused group); default amax/2688 per tensor/expert.
    search_global: also try ws2 * m for m in global_multipliers (needs weight_scale_2=None or a base to scale),
    picking per expert the m with the smallest total weighted error; m = 1.0 is always tried first."""
    rows, E, N, K = _as_rows(w, name)
    if 0 not in offsets:
        offsets = (0, *offsets)
    if weight_scale_2 is None:
        weight_scale_2 = global_scale_from_amax(tensor_amax(w, name=name, chunk_elements=chunk_elements))
    base = _ws2_vector(weight_scale_2, E, name)  # [E]
    mults = [1.0]
    if search_global:
        mults += [float(m) for m in global_multipliers if float(m) != 1.0 and m > 0]
    imp_ek = _importance(importance, E, K, name, w.device)  # [E, K] or None
    R = rows.shape[0]
    # chunk budget: the sweep holds ~6 fp32 temporaries of the chunk at once, like RTN
    step = _rows_per_chunk(K, chunk_elements)
    row_expert = torch.arange(E, device=w.device).repeat_interleave(N)
    best_total = torch.full((E,), float("inf"), dtype=torch.float64)
    best_mult = torch.ones(E, dtype=torch.float32)
    best_scales = torch.empty(R, K // BLOCK, dtype=torch.uint8, device=w.device)  # fp8 bits
    for m in mults:
        ws2 = base * m
        ws2_rows = _row_ws2(_ws2_vector(ws2, E, name), N, w.device)
        scales = torch.empty_like(best_scales)
        total = torch.zeros(E, dtype=torch.float64, device=w.device)
        for r0 in range(0, R, step):
            x = rows[r0 : r0 + step].float()
            _check_finite(x.abs().amax(dim=-1, keepdim=True), name, r0)
            imp = imp_ek[row_expert[r0 : r0 + step]] if imp_ek is not None else None  # [r, K] copy of the chunk
            s, err = _sweep_chunk(x, imp, ws2_rows[r0 : r0 + step], offsets)
            scales[r0 : r0 + step] = s.view(torch.uint8)
            total.index_add_(0, row_expert[r0 : r0 + step], err.sum(dim=-1, dtype=torch.float64))
        total = total.cpu()
        better = total < best_total
        if bool(better.any()):
            best_total = torch.where(better, total, best_total)
            best_mult = torch.where(better, torch.tensor(m, dtype=torch.float32), best_mult)
            rows_better = better.to(w.device).repeat_interleave(N)
            best_scales[rows_better] = scales[rows_better]
    if search_global:
        log.debug("%s: global multipliers chosen %s", name, best_mult.tolist()[:8])
    ws2_final = (base * best_mult).reshape(tuple(w.shape[:-2]))
    scales = best_scales.view(torch.float8_e4m3fn).view(*w.shape[:-1], K // BLOCK)
    return quantize_with_block_scales(w, scales, ws2_final, name=name, chunk_elements=chunk_elements)


def mse_quantize_group(
    tensors: Sequence[torch.Tensor],
    importance: torch.Tensor | None = None,
    *,
    name: str = "group",
    **kwargs,
) -> list[NVFP4Tensor]:
    """Scale-search tensors that share one global scale and one input (dense gate+up, q/k/v): the members are
    searched with the group's shared ws2 (block scales are per row, so members stay independent otherwise)."""
    if kwargs.get("search_global"):
        raise CheckpointError(f"{name}: search_global is not supported for a shared-scale group")
    ws2 = shared_weight_scale_2(tensors, name=name)
    return [
        mse_quantize(t, importance, weight_scale_2=ws2, name=f"{name}[{i}]", **kwargs) for i, t in enumerate(tensors)
    ]


@dataclass(frozen=True)
class ErrorReport:
    rel_rmse: float  # sqrt(sum (w - q)^2 / sum w^2)
    rel_weighted: float  # sqrt(sum imp (w - q)^2 / sum imp w^2)


def error_report(w: torch.Tensor, q: NVFP4Tensor, importance: torch.Tensor | None = None) -> ErrorReport:
    """Relative RMSE and relative importance-weighted RMSE of a quantized tensor (small/medium tensors)."""
    _, E, N, K = _as_rows(w, "weight")
    x = w.reshape(-1, K).float()
    d = dequantize(q).reshape(-1, K)
    rel = float(((x - d).square().sum() / x.square().sum()).sqrt())
    imp = _importance(importance, E, K, "weight", w.device)
    if imp is None:
        return ErrorReport(rel, rel)
    imp = imp.repeat_interleave(N, dim=0)
    relw = float((((x - d).square() * imp).sum() / (x.square() * imp).sum()).sqrt())
    return ErrorReport(rel, relw)
