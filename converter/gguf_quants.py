"""GGUF block quantizers and dequantizers (vectorized numpy/torch, CPU).

Who packs what:
- F32, F16: plain arrays. BF16, Q8_0, Q5_1, MXFP4: gguf-py's quantizers (ggml's `*_ref` rules, byte-identical).
- Q5_0: gguf-py without importance; with importance our weighted scale search (as ggml's imatrix path does).
- Q4_K, Q5_K, Q6_K, NVFP4: ours. Dequantizers for every type are ours; the tests compare them bit for bit with
  `gguf.quants.dequantize`.

Layouts (ggml-common.h); K-quants use 256-element super-blocks:
- block_q4_K, 144 B: d f16, dmin f16, scales[12], qs[128]. Sub-block j (32 elements) = d*sc_j*q - dmin*m_j with
  6-bit sc/m packed as in `_pack_scales_k4`; sub-blocks 2k / 2k+1 are the low / high nibbles of qs[32k:32k+32].
- block_q5_K, 176 B: d, dmin, scales[12], qh[32], qs[128]; bit j of qh[l] is bit 4 of element l of sub-block j.
- block_q6_K, 210 B: ql[128], qh[64], scales[16] (int8), d f16; 16 sub-blocks of 16; x = d*sc*(q - 32).
- block_q5_0, 22 B (32 elements): d f16, qh u32 (bit j = bit 4 of element j), qs[16] (j / j+16 in low / high).
- block_nvfp4, 36 B (64 elements): d[4] UE4M3 (one per 16), qs[32]; sub-block s: element 16s+j (j<8) is the low
  nibble of qs[8s+j], element 16s+8+j its high nibble. Nibbles index kvalues = 2 x E2M1 and the UE4M3 decoder
  returns half the scale ("0.5 convention"), so the product is the true value. The per-tensor / per-expert global
  scale is not in the blocks: the GGUF keeps it in a separate F32 `<name>.scale` tensor (see `nvfp4_global_scale`).

K-quant search (in the spirit of ggml's make_qkx2/make_qx_quants): per sub-block, try a grid of inverse scales,
round, fit scale (and min) by importance-weighted least squares, keep the lowest weighted squared error; then
quantize the sub-block scales to 6 bits (8-bit signed for Q6_K) under fp16 super-block scales and re-round the
elements against the final scales. Element weights: with importance qw (per input column, e.g. mean x^2 of the
activations from calibration) w = qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) over the super-block (ggml's
imatrix path); without it w = rms(sub-block) + |x| (ggml's q4_K/q5_K reference weights).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import gguf
import numpy as np
import torch

from dgemma.runtime.errors import FormatError

logger = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
QK_K = 256
KVALUES_FP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # 2 x E2M1 (ggml kvalues_mxfp4)
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # decision points between |E2M1| grid values
_E2M1_ABS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_GLOBAL_DIV = 6.0 * 448.0  # ModelOpt weight_scale_2 = amax / (6 * 448)

QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.MXFP4, QT.NVFP4)
_CHUNK_ELEMS = 1 << 20  # elements per work chunk: bounds temporaries to a few tens of MB


# ---- sizes -----------------------------------------------------------------------------------------------


def block_size(qtype: QT) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_nbytes(qtype: QT, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` elements; FormatError if the row does not fill whole blocks."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % bs:
        raise FormatError(f"row length {n_per_row} is not a multiple of the {qtype.name} block size {bs}")
    return n_per_row // bs * ts


def tensor_nbytes(qtype: QT, torch_shape: tuple[int, ...]) -> int:
    n_rows = int(np.prod(torch_shape[:-1], dtype=np.int64)) if len(torch_shape) > 1 else 1
    return n_rows * row_nbytes(qtype, torch_shape[-1])


# ---- public entry points -----------------------------------------------------------------------------------


def quantize(
    x: np.ndarray | torch.Tensor,
    qtype: QT,
    *,
    importance: np.ndarray | torch.Tensor | None = None,
    global_scale: np.ndarray | torch.Tensor | float | None = None,
) -> np.ndarray:
    """Quantize a tensor (torch order, rows along the last axis) to GGUF `qtype`.

    Returns what `gguf.quants.quantize` returns: float32 / float16 arrays for F32 / F16, else uint8 of shape
    (*x.shape[:-1], row_nbytes). `importance`: per-input-column weights, shape (C,) or broadcastable to x
    (e.g. (E, 1, C) per expert); used by Q4_K, Q5_K, Q6_K, Q5_0, NVFP4, ignored by the other types.
    `global_scale` (NVFP4 only, required): the F32 `.scale` value(s) the blocks are relative to, a scalar or
    one per leading index (shape (E,) for a 3-D expert tensor); use `nvfp4_global_scale`.
    """
    if qtype not in QUANTIZABLE:
        raise FormatError(f"dgemma cannot quantize to {qtype.name}; supported: {', '.join(t.name for t in QUANTIZABLE)}")
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim == 0 or not t.is_floating_point():
        raise FormatError(f"quantize expects a floating tensor with at least 1 dim, got {tuple(t.shape)} {t.dtype}")
    C = t.shape[-1]
    if qtype == QT.F32:
        return t.detach().to(torch.float32).numpy()
    if qtype == QT.F16:
        return t.detach().to(torch.float32).numpy().astype(np.float16)
    nbytes = row_nbytes(qtype, C)
    x3 = t.detach().reshape(-1, t.shape[-2] if t.ndim > 1 else 1, C)  # (L, R, C)
    qw3 = _importance_3d(importance, tuple(t.shape)) if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_0, QT.NVFP4) else None
    g3 = None
    if qtype == QT.NVFP4:
        if global_scale is None:
            raise FormatError("NVFP4 needs global_scale (the `.scale` tensor value); use nvfp4_global_scale(x)")
        g3 = _global_scale_3d(global_scale, x3.shape[0])
    elif global_scale is not None:
        raise FormatError(f"global_scale only applies to NVFP4, not {qtype.name}")
    out = np.empty((x3.shape[0], x3.shape[1], nbytes), dtype=np.uint8)
    for li, r0, r1, xc, qwc in _chunks(x3, qw3):
        if not torch.isfinite(xc).all():
            raise FormatError(f"cannot quantize to {qtype.name}: the tensor has NaN or Inf values")
        if qtype == QT.Q4_K:
            blk = _q4_k(xc, qwc)
        elif qtype == QT.Q5_K:
            blk = _q5_k(xc, qwc)
        elif qtype == QT.Q6_K:
            blk = _q6_k(xc, qwc)
        elif qtype == QT.NVFP4:
            blk = _nvfp4(xc / g3[li], qwc)
        elif qtype == QT.Q5_0 and qwc is not None:
            blk = _q5_0_weighted(xc, qwc)
        else:  # BF16, Q8_0, Q5_1, MXFP4, Q5_0 without importance: gguf-py's reference quantizers
            blk = gguf.quants.quantize(np.ascontiguousarray(xc.numpy()), qtype)
        out[li, r0:r1] = blk.reshape(r1 - r0, nbytes)
    return out.reshape(*t.shape[:-1], nbytes)


def dequantize(data: np.ndarray, qtype: QT, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Our own dequantizer (float32). `data`: what `quantize` returned (bytes in the last axis), or a flat
    uint8 buffer together with `shape` (torch order, elements)."""
    data = np.asarray(data)
    if qtype == QT.F32:
        out = data.view(np.float32) if data.dtype != np.float32 else data
        return out.reshape(shape) if shape is not None else out
    if qtype == QT.F16:
        out = (data.view(np.float16) if data.dtype != np.float16 else data).astype(np.float32)
        return out.reshape(shape) if shape is not None else out
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    u8 = data.view(np.uint8)
    if shape is None:
        if u8.ndim == 0 or u8.shape[-1] % ts:
            raise FormatError(f"{qtype.name}: last axis of {u8.shape} bytes is not a whole number of {ts}-byte blocks")
        shape = (*u8.shape[:-1], u8.shape[-1] // ts * bs)
    n = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % bs or u8.size != n // bs * ts:
        raise FormatError(f"{qtype.name}: {u8.size} bytes do not hold a tensor of shape {tuple(shape)}")
    blocks = u8.reshape(-1, ts)
    fn = _DEQUANT.get(qtype)
    if fn is None:
        raise FormatError(f"dgemma cannot dequantize {qtype.name}")
    return fn(blocks).reshape(shape)


def nvfp4_global_scale(x: np.ndarray | torch.Tensor, n_lead: int | None = None) -> np.ndarray:
    """The F32 `.scale` for an NVFP4 tensor: amax / (6 * 448) (ModelOpt's weight_scale_2), one value per index
    of the first `n_lead` axes (default: per expert for 3-D, per tensor otherwise), shape (E,) or (1,).
    An all-zero slice gets 1.0 (as ModelOpt does for uncalibrated experts)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if n_lead is None:
        n_lead = 1 if t.ndim == 3 else 0
    lead = t.shape[:n_lead]
    flat = t.detach().reshape(int(np.prod(lead, dtype=np.int64)) if n_lead else 1, -1)
    amax = torch.stack([c.abs().amax().to(torch.float32) for c in flat])  # per slice: no full f32 copy
    g = amax / NVFP4_GLOBAL_DIV
    g = torch.where(g > 0, g, torch.ones_like(g))
    if not torch.isfinite(g).all():
        raise FormatError("cannot compute an NVFP4 global scale: the tensor has NaN or Inf values")
    return g.numpy().astype(np.float32).reshape(lead if n_lead else (1,))


# ---- FP8 (UE4M3) scale codec ------------------------------------------------------------------------------


def ue4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float32 >= 0 -> nearest UE4M3 byte (round half up on the first dropped mantissa bit, like
    ggml_fp32_to_ue4m3), clamped to [0, 448]. Unlike ggml's encoder, [256, 448) keeps its exponent-15 codes
    0x78..0x7D instead of saturating to 0x7E; every decoder reads them (ModelOpt checkpoints use them)."""
    x = x.to(torch.float32).clamp(0.0, 448.0)
    bits = x.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + 7  # biased UE4M3 exponent
    man = ((bits >> 20) & 0x7) + ((bits >> 19) & 1)
    normal = torch.where(man > 7, (e + 1) << 3, (e << 3) | man).clamp_(max=0x7E)
    sub = (x * 512.0 + 0.5).to(torch.int32)  # m/512; m == 8 is code 0x08 = 2^-6, the smallest normal
    out = torch.where(e <= 0, sub, normal)
    return torch.where(x <= 0, torch.zeros_like(out), out).to(torch.uint8)


def ue4m3_decode(code: torch.Tensor) -> torch.Tensor:
    """UE4M3 byte -> true float32 value (not the halved ggml value); 0x00 and 0x7F decode to 0."""
    c = code.to(torch.int32)
    e, m = (c >> 3) & 0xF, (c & 7).to(torch.float32)
    val = torch.where(e == 0, m * 2.0**-9, (1.0 + m / 8.0) * torch.exp2((e - 7).to(torch.float32)))
    return torch.where((c == 0) | (c == 0x7F), torch.zeros_like(val), val)


# ---- chunking / argument normalization -------------------------------------------------------------------


def _importance_3d(qw: np.ndarray | torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Importance as a float32 (L or 1, R or 1, C) tensor matching x viewed as (L, R, C)."""
    if qw is None:
        return None
    q = (qw if isinstance(qw, torch.Tensor) else torch.from_numpy(np.asarray(qw))).detach().to(torch.float32)
    try:
        b = torch.broadcast_shapes(tuple(q.shape), shape)
    except RuntimeError:
        b = None
    if b != tuple(shape):
        raise FormatError(f"importance of shape {tuple(q.shape)} does not broadcast to the tensor shape {shape}")
    if not torch.isfinite(q).all() or (q < 0).any():
        raise FormatError("importance must be finite and >= 0")
    q = q.reshape((1,) * (len(shape) - q.ndim) + tuple(q.shape))
    if len(shape) == 1:
        q3 = q.reshape(1, 1, -1)
    else:
        lead = q.shape[:-2]
        L = int(np.prod(lead, dtype=np.int64)) if lead else 1
        full = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
        if L not in (1, full):  # partially broadcast leading dims: expand them (small: no R axis yet)
            q = q.expand(*shape[:-2], *q.shape[-2:])
            L = full
        q3 = q.reshape(L, q.shape[-2], q.shape[-1])
    # a column with zero importance is still kept faintly: all-zero weights make the fit degenerate
    floor = 1e-6 * q3.mean(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.maximum(q3, floor)


def _global_scale_3d(g: np.ndarray | torch.Tensor | float, L: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(g, dtype=np.float32)).reshape(-1)
    if t.numel() not in (1, L):
        raise FormatError(f"global_scale has {t.numel()} values; expected 1 or {L} (one per leading index)")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise FormatError("global_scale must be finite and > 0")
    return t.expand(L).clone()


def _chunks(
    x3: torch.Tensor, qw3: torch.Tensor | None
) -> Iterator[tuple[int, int, int, torch.Tensor, torch.Tensor | None]]:
    """Yield (l, r0, r1, x float32 (rows, C), importance (rows|1, C) or None) over x viewed as (L, R, C)."""
    L, R, C = x3.shape
    step = max(1, _CHUNK_ELEMS // max(C, 1))
    for li in range(L):
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            xc = x3[li, r0:r1].to(torch.float32).contiguous()
            qwc = None
            if qw3 is not None:
                q = qw3[li if qw3.shape[0] > 1 else 0]
                qwc = q[r0:r1] if q.shape[0] > 1 else q
            yield li, r0, r1, xc, qwc


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the value the block will store)."""
    return x.to(torch.float16).to(torch.float32)


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)


# ---- element weights -----------------------------------------------------------------------------------


def _kquant_weights(xs: torch.Tensor, qw: torch.Tensor | None, rows: int) -> torch.Tensor:
    """Weights for the sub-block fits; xs: (rows*nsb, S, n) super-blocks split into S sub-blocks of n."""
    if qw is None:
        av = xs.pow(2).mean(dim=-1, keepdim=True).sqrt_()
        return av + xs.abs()
    sigma2 = 2.0 * xs.pow(2).mean(dim=(-2, -1), keepdim=True)
    qws = qw.expand(rows, qw.shape[-1]).reshape(xs.shape)
    return qws * (sigma2 + xs.pow(2)).sqrt_()


# ---- sub-block scale searches ------------------------------------------------------------------------------


def _search_asym(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Best (scale >= 0, min >= 0) with x ~ scale*l - min, l in [0, nmax]; x, w: (N, n) -> (N,), (N,)."""
    mn = x.amin(dim=1).clamp_(max=0.0)
    rng = x.amax(dim=1) - mn
    ok = rng > 0
    inv_rng = torch.where(ok, 1.0 / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(rng))
    xs = x - mn[:, None]
    wx = w * x
    sw, sx, sxx = w.sum(1), wx.sum(1), (wx * x).sum(1)
    # start: the plain min/max grid, error evaluated directly
    best_s, best_m = rng / nmax, mn.clone()  # offset form: x ~ s*l + m, m <= 0
    l = torch.round(xs * (nmax * inv_rng)[:, None]).clamp_(0, nmax)
    best_err = (w * (best_s[:, None] * l + best_m[:, None] - x).pow_(2)).sum(1)
    one = torch.ones_like(sw)
    for k in range(nstep + 1):
        l = torch.round(xs * ((nmax + rmin + rdelta * k) * inv_rng)[:, None]).clamp_(0, nmax)
        wl = w * l
        sl, sll, sxl = wl.sum(1), (wl * l).sum(1), (wl * x).sum(1)
        D = sw * sll - sl * sl
        good = D > 0
        Ds = torch.where(good, D, one)
        s = (sw * sxl - sx * sl) / Ds
        m = (sll * sx - sl * sxl) / Ds
        pos = m > 0  # a positive offset is not representable (mins are >= 0): refit the scale alone
        s = torch.where(pos, sxl / torch.where(sll > 0, sll, one), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = sxx - 2 * s * sxl - 2 * m * sx + s * s * sll + 2 * s * m * sl + m * m * sw
        better = good & (s >= 0) & (err < best_err)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
    return best_s, -best_m


def _search_sym(x: torch.Tensor, w: torch.Tensor, nmax: int, nstep: int = 9, delta: float = 0.1) -> torch.Tensor:
    """Best signed scale with x ~ scale*l, l in [-nmax, nmax-1] (ggml make_qx_quants grid); x, w: (N, n) -> (N,)."""
    idx = x.abs().argmax(dim=1, keepdim=True)
    maxv = x.gather(1, idx).squeeze(1)
    ok = maxv != 0
    inv = torch.where(ok, 1.0 / torch.where(ok, maxv, torch.ones_like(maxv)), torch.zeros_like(maxv))
    best_s = torch.zeros_like(maxv)
    best_score = torch.full_like(maxv, -1.0)
    for k in [0] + [k for k in range(-nstep, nstep + 1) if k]:
        l = torch.round(x * (-(nmax + delta * k) * inv)[:, None]).clamp_(-nmax, nmax - 1)
        wl = w * l
        sxl, sll = (wl * x).sum(1), (wl * l).sum(1)
        pos = sll > 0
        sll_s = torch.where(pos, sll, torch.ones_like(sll))
        score = torch.where(pos, sxl * sxl / sll_s, torch.zeros_like(sll))  # = error reduction at the LS scale
        better = pos & (score > best_score)
        best_s = torch.where(better, sxl / sll_s, best_s)
        best_score = torch.where(better, score, best_score)
    return best_s


# ---- K-quants ------------------------------------------------------------------------------------------------


def _kquant_asym(x: torch.Tensor, qw: torch.Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K/Q5_K core. x: (rows, C) -> d, dmin (NB,) f16 values, ls, lm (NB, 8) uint8, L (NB, 8, 32)."""
    rows = x.shape[0]
    xs = x.reshape(-1, 8, 32)  # NB = rows*C/256 super-blocks of 8 sub-blocks
    w = _kquant_weights(xs, qw, rows)
    s, mv = _search_asym(xs.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, rdelta, nstep)
    s, mv = s.view(-1, 8), mv.view(-1, 8)
    d = _f16(s.amax(dim=1) / 63)
    dm = _f16(mv.amax(dim=1) / 63)
    ls = torch.where(d[:, None] > 0, torch.round(s / d.clamp_min(1e-30)[:, None]), 0).clamp_(0, 63)
    lm = torch.where(dm[:, None] > 0, torch.round(mv / dm.clamp_min(1e-30)[:, None]), 0).clamp_(0, 63)
    eff_d = (d[:, None] * ls)[..., None]
    eff_m = (dm[:, None] * lm)[..., None]
    L = torch.where(eff_d > 0, torch.round((xs + eff_m) / torch.where(eff_d > 0, eff_d, 1.0)), 0).clamp_(0, nmax)
    return d, dm, ls.to(torch.uint8).numpy(), lm.to(torch.uint8).numpy(), L.to(torch.uint8).numpy()


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (ggml get_scale_min_k4 layout)."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> np.ndarray:
    d, dm, ls, lm, L = _kquant_asym(x, qw, 15, -1.0, 0.1, 20)
    qs = (L[:, 0::2, :] | (L[:, 1::2, :] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dm), _pack_scales_k4(ls, lm), qs], axis=1)


def _q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> np.ndarray:
    d, dm, ls, lm, L = _kquant_asym(x, qw, 31, -0.5, 0.1, 15)
    lo = L & 0xF
    qs = (lo[:, 0::2, :] | (lo[:, 1::2, :] << 4)).reshape(-1, 128)
    hi = (L >> 4) & 1  # (NB, 8, 32): bit j of qh[l] <- sub-block j
    qh = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dm), _pack_scales_k4(ls, lm), qh, qs], axis=1)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None) -> np.ndarray:
    rows = x.shape[0]
    xs = x.reshape(-1, 16, 16)
    w = _kquant_weights(xs, qw, rows)
    s = _search_sym(xs.reshape(-1, 16), w.reshape(-1, 16), 32).view(-1, 16)
    imax = s.abs().argmax(dim=1, keepdim=True)
    d = _f16(-s.gather(1, imax).squeeze(1) / 128)  # the largest sub-block scale maps to -128
    nz = d != 0
    ls = torch.where(nz[:, None], torch.round(s / torch.where(nz, d, 1.0)[:, None]), 0).clamp_(-128, 127)
    eff = (d[:, None] * ls)[..., None]
    L = torch.where(eff != 0, torch.round(xs / torch.where(eff != 0, eff, 1.0)), 0).clamp_(-32, 31) + 32
    L = L.to(torch.uint8).numpy().reshape(-1, 2, 4, 32)  # (NB, half, quarter, 32)
    ql = np.concatenate(
        [(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2
    ).reshape(-1, 128)
    qh = ((L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    sc = ls.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([ql, qh.reshape(-1, 64), sc, _f16_bytes(d)], axis=1)


def _q5_0_weighted(x: torch.Tensor, qw: torch.Tensor) -> np.ndarray:
    """Q5_0 with importance: weighted symmetric scale search per 32-block (ggml quantize_row_q5_0_impl)."""
    rows, C = x.shape
    sigma2 = x.pow(2).mean(dim=1, keepdim=True)
    w = (qw.expand(rows, C) * (sigma2 + x.pow(2)).sqrt()).reshape(-1, 32)
    xb = x.reshape(-1, 32)
    d = _f16(_search_sym(xb, w, 16))
    nz = d != 0
    q = torch.where(nz[:, None], torch.round(xb / torch.where(nz, d, 1.0)[:, None]), 0).clamp_(-16, 15) + 16
    q = q.to(torch.uint8).numpy()
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # bit j of the little-endian u32 = element j
    return np.concatenate([_f16_bytes(d), qh, qs], axis=1)


# ---- NVFP4 ---------------------------------------------------------------------------------------------------


def _e2m1_index(v: torch.Tensor) -> torch.Tensor:
    """Nearest |E2M1| grid index (0..7) of |v|; ties go to the smaller magnitude."""
    return torch.bucketize(v.abs(), torch.tensor(_E2M1_MIDS, dtype=v.dtype), right=False)


def _nvfp4(x: torch.Tensor, qw: torch.Tensor | None) -> np.ndarray:
    """x: (rows, C) already divided by the global scale. Per 16-element sub-block, try the UE4M3 scales around
    ue4m3(amax/6) (codes -2..+1) and keep the lowest (importance-)weighted squared error."""
    rows, C = x.shape
    xb = x.reshape(-1, 16)
    w = None if qw is None else qw.expand(rows, C).reshape(-1, 16)
    amax = xb.abs().amax(dim=1)
    c0 = ue4m3_encode(amax / 6.0).to(torch.int32)
    grid = torch.tensor(_E2M1_ABS, dtype=torch.float32)
    best_c = c0.clone()
    best_err = torch.full_like(amax, float("inf"))
    best_idx = torch.zeros(xb.shape, dtype=torch.int64)
    for k in (0, -1, 1, -2):
        c = torch.where(amax > 0, (c0 + k).clamp(1, 0x7E), torch.zeros_like(c0))
        S = ue4m3_decode(c)
        idx = _e2m1_index(xb / torch.where(S > 0, S, 1.0)[:, None])
        e = (xb.abs() - grid[idx] * S[:, None]).pow_(2)
        err = (e if w is None else e * w).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, c, best_c)
        best_idx = torch.where(better[:, None], idx, best_idx)
    nib = (best_idx + 8 * ((xb < 0) & (best_idx > 0))).to(torch.uint8).numpy().reshape(-1, 4, 16)
    qs = (nib[:, :, :8] | (nib[:, :, 8:] << 4)).reshape(-1, 32)
    return np.concatenate([best_c.to(torch.uint8).numpy().reshape(-1, 4), qs], axis=1)


# ---- dequantizers (numpy; operation order mirrors gguf-py so results are bit-identical) ------------------------


def _f16_from(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16_from(b[:, :2])


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16_from(b[:, :2])
    qh = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")  # (n, 32)
    lo = np.concatenate([b[:, 6:22] & 0xF, b[:, 6:22] >> 4], axis=1)
    q = (lo | (qh << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16_from(b[:, :2]), _f16_from(b[:, 2:4])
    qh = np.unpackbits(b[:, 4:8], axis=1, bitorder="little")
    lo = np.concatenate([b[:, 8:24] & 0xF, b[:, 8:24] >> 4], axis=1)
    return (d * (lo | (qh << 4)).astype(np.float32)) + m


def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.concatenate([sc[:, 0:4] & 0x3F, (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([sc[:, 4:8] & 0x3F, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    return s, m


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
    s, m = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0xF).reshape(n, 8, 32).astype(np.float32)
    dd = (d * s.astype(np.float32)).reshape(n, 8, 1)
    dm = (dmin * m.astype(np.float32)).reshape(n, 8, 1)
    return (dd * q - dm).reshape(n, QK_K)


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
    s, m = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    ql = b[:, 48:176].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = ((ql & 0xF).reshape(n, 8, 32) | ((qh & 1) << 4)).astype(np.float32)
    dd = (d * s.astype(np.float32)).reshape(n, 8, 1)
    dm = (dmin * m.astype(np.float32)).reshape(n, 8, 1)
    return (dd * q - dm).reshape(n, QK_K)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16_from(b[:, 208:210])
    lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF  # (n,2,2,64)
    lo = lo.reshape(n, 2, 4, 32)  # quarter k of half h = elements 128h + 32k ..
    hi = (qh.reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    dd = (d * sc).reshape(n, 16, 1)
    return (dd * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_KV = np.array(KVALUES_FP4, dtype=np.float32)


def _dq_mxfp4(b: np.ndarray) -> np.ndarray:
    e = b[:, :1].astype(np.uint32)
    # GGML_E8M0_TO_FP32_HALF: 2^(e-128) built from bits (e < 2 lands in the subnormal range)
    d = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32).view(np.float32)
    nib = np.concatenate([b[:, 1:] & 0xF, b[:, 1:] >> 4], axis=1)
    return d * _KV[nib]


def _ue4m3_half_np(c: np.ndarray) -> np.ndarray:
    e = (c >> 3).astype(np.int32) & 0xF
    m = (c & 7).astype(np.float32)
    v = np.where(e == 0, m * np.float32(2.0**-9), (np.float32(1) + m / np.float32(8)) * np.exp2(e - 7).astype(np.float32))
    return np.where((c == 0) | (c == 0x7F), np.float32(0), v * np.float32(0.5)).astype(np.float32)


def _dq_nvfp4(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d = _ue4m3_half_np(b[:, :4]).reshape(n, 4, 1)
    qs = b[:, 4:].reshape(n, 4, 8)
    nib = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # (n, 4, 16)
    return (d * _KV[nib]).reshape(n, 64)


_DEQUANT = {
    QT.BF16: _dq_bf16,
    QT.Q8_0: _dq_q8_0,
    QT.Q5_0: _dq_q5_0,
    QT.Q5_1: _dq_q5_1,
    QT.Q4_K: _dq_q4_k,
    QT.Q5_K: _dq_q5_k,
    QT.Q6_K: _dq_q6_k,
    QT.MXFP4: _dq_mxfp4,
    QT.NVFP4: _dq_nvfp4,
}
