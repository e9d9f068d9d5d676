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

import gguf
import numpy as np
import torch

from dgemma.runtime.errors import FormatError

QT = gguf.GGMLQuantizationType
QK_K = 256
KVALUES_FP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # 2 x E2M1 (ggml kvalues_mxfp4)
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # decision points between |E2M1| grid values
_E2M1_ABS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_GLOBAL_DIV = 6.0 * 448.0  # ModelOpt weight_scale_2 = amax / (6 * 448)

QUANTIZABLE = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.MXFP4, QT.NVFP4)
_CHUNK_ELEMS_SEARCH = 1 << 17  # elements per work chunk of our searches (temporaries stay in cache)
_CHUNK_ELEMS_GGUFPY = 1 << 20
_OURS = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.NVFP4)


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
        names = ", ".join(t.name for t in QUANTIZABLE)
        raise FormatError(f"dgemma cannot quantize to {qtype.name}; supported: {names}")
    x3 = _Rows(x)  # x viewed as (L, R, C), converted to float32 chunk by chunk
    shape, C = x3.shape, x3.C
    if qtype == QT.F32:
        return x3.all()
    if qtype == QT.F16:
        return x3.all().astype(np.float16)
    nbytes = row_nbytes(qtype, C)
    qw3 = _importance_3d(importance, shape) if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_0, QT.NVFP4) else None
    g3 = None
    if qtype == QT.NVFP4:
        if global_scale is None:
            raise FormatError("NVFP4 needs global_scale (the `.scale` tensor value); use nvfp4_global_scale(x)")
        g3 = _global_scale_3d(global_scale, x3.L)
    elif global_scale is not None:
        raise FormatError(f"global_scale only applies to NVFP4, not {qtype.name}")
    out = np.empty((x3.L, x3.R, nbytes), dtype=np.uint8)
    # small chunks keep the search temporaries in cache; gguf-py's quantizers prefer bigger ones
    chunk = _CHUNK_ELEMS_SEARCH if qtype in _OURS else _CHUNK_ELEMS_GGUFPY
    for li, r0, r1, xc, qwc in _chunks(x3, qw3, max(1, chunk // C)):
        if not np.isfinite(xc).all():
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
            blk = gguf.quants.quantize(xc, qtype)
        out[li, r0:r1] = blk.reshape(r1 - r0, nbytes)
    return out.reshape(*shape[:-1], nbytes)


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
    r = _Rows(x)
    if n_lead is None:
        n_lead = 1 if len(r.shape) == 3 else 0
    lead = r.shape[:n_lead]
    flat = r.x.reshape(int(np.prod(lead, dtype=np.int64)) if n_lead else 1, -1)
    # per slice, so the float32 copy stays one expert big
    amax = np.array([np.abs(r.to_f32(c)).max() if c.shape[0] else 0.0 for c in flat], dtype=np.float32)
    if not np.isfinite(amax).all():
        raise FormatError("cannot compute an NVFP4 global scale: the tensor has NaN or Inf values")
    g = amax / np.float32(NVFP4_GLOBAL_DIV)
    return np.where(g > 0, g, np.float32(1)).astype(np.float32).reshape(lead if n_lead else (1,))


# ---- FP8 (UE4M3) scale codec ------------------------------------------------------------------------------


def ue4m3_encode(x: np.ndarray) -> np.ndarray:
    """float32 >= 0 -> nearest UE4M3 byte (round half up on the first dropped mantissa bit, like
    ggml_fp32_to_ue4m3), clamped to [0, 448]. Two deliberate differences from ggml's encoder, both places where
    ggml does not return the nearest code: values that round to [256, 448) keep their exponent-15 codes
    0x78..0x7D (ggml saturates them to 0x7E = 448; every decoder reads them, ModelOpt checkpoints use them), and
    [7.5/512, 2^-6) rounds up to 0x08 = 2^-6 (ggml caps the subnormal mantissa at 7)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 448.0)
    bits = x.view(np.int32)
    e = ((bits >> 23) & 0xFF) - 127 + 7  # biased UE4M3 exponent
    man = ((bits >> 20) & 0x7) + ((bits >> 19) & 1)
    normal = np.minimum(np.where(man > 7, (e + 1) << 3, (e << 3) | man), 0x7E)
    sub = (x * np.float32(512.0) + np.float32(0.5)).astype(np.int32)  # m/512; m == 8 is 0x08 = 2^-6
    out = np.where(e <= 0, sub, normal)
    return np.where(x <= 0, 0, out).astype(np.uint8)


def ue4m3_decode(code: np.ndarray) -> np.ndarray:
    """UE4M3 byte -> true float32 value (ggml's decoder returns half of it); 0x00 and 0x7F decode to 0."""
    c = np.asarray(code).astype(np.int32)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float32)
    normal = (np.float32(1) + m / np.float32(8)) * np.exp2(e - 7).astype(np.float32)
    val = np.where(e == 0, m * np.float32(2.0**-9), normal)
    return np.where((c == 0) | (c == 0x7F), np.float32(0), val).astype(np.float32)


# ---- chunking / argument normalization -------------------------------------------------------------------


def _importance_3d(qw: np.ndarray | torch.Tensor | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Importance as a float32 (L or 1, R or 1, C) array matching x viewed as (L, R, C)."""
    if qw is None:
        return None
    q = qw.detach().to(torch.float32).numpy() if isinstance(qw, torch.Tensor) else np.asarray(qw, dtype=np.float32)
    if len(shape) == 3 and q.shape == (shape[0], shape[2]):
        q = q[:, None, :]  # [E, K]: one importance vector per expert (the calibration layout)
    try:
        b = np.broadcast_shapes(q.shape, shape)
    except ValueError:
        b = None
    if b != tuple(shape):
        raise FormatError(f"importance of shape {q.shape} does not broadcast to the tensor shape {shape}")
    if not np.isfinite(q).all() or (q < 0).any():
        raise FormatError("importance must be finite and >= 0")
    q = q.reshape((1,) * (len(shape) - q.ndim) + q.shape)
    if len(shape) == 1:
        q3 = q.reshape(1, 1, -1)
    else:
        L = int(np.prod(q.shape[:-2], dtype=np.int64)) if q.ndim > 2 else 1
        full = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
        if L not in (1, full):  # partially broadcast leading dims: expand them (cheap: no R axis yet)
            q = np.broadcast_to(q, (*shape[:-2], *q.shape[-2:]))
            L = full
        q3 = q.reshape(L, q.shape[-2], q.shape[-1])
    # a column with zero importance is still kept faintly: all-zero weights make the fit degenerate
    floor = np.float32(1e-6) * np.maximum(q3.mean(axis=-1, keepdims=True), np.float32(1e-30))
    return np.maximum(q3, floor)


def _global_scale_3d(g: np.ndarray | torch.Tensor | float, L: int) -> np.ndarray:
    t = g.detach().to(torch.float32).numpy() if isinstance(g, torch.Tensor) else np.asarray(g, dtype=np.float32)
    t = t.reshape(-1)
    if t.size not in (1, L):
        raise FormatError(f"global_scale has {t.size} values; expected 1 or {L} (one per leading index)")
    if not np.isfinite(t).all() or (t <= 0).any():
        raise FormatError("global_scale must be finite and > 0")
    return np.broadcast_to(t, (L,)).copy()


class _Rows:
    """A numpy array or torch tensor (any float dtype) viewed as (L, R, C) without copying; rows come out as
    float32 numpy chunks."""

    def __init__(self, x: np.ndarray | torch.Tensor):
        if isinstance(x, torch.Tensor):
            ok = x.is_floating_point()
            self.x = x.detach()
        else:
            self.x = np.asarray(x)
            ok = np.issubdtype(self.x.dtype, np.floating)
        self.shape = tuple(self.x.shape)
        if not self.shape or not ok:
            raise FormatError(
                f"quantize expects a floating tensor with at least 1 dim, got {self.shape} {self.x.dtype}"
            )
        self.C = self.shape[-1]
        self.R = self.shape[-2] if len(self.shape) > 1 else 1
        self.x3 = self.x.reshape(-1, self.R, self.C)
        self.L = self.x3.shape[0]

    def to_f32(self, a: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(a, torch.Tensor):
            return a.to(torch.float32).numpy()
        return np.asarray(a, dtype=np.float32)

    def rows(self, li: int, r0: int, r1: int) -> np.ndarray:
        return np.ascontiguousarray(self.to_f32(self.x3[li, r0:r1]))

    def all(self) -> np.ndarray:
        return np.ascontiguousarray(self.to_f32(self.x))


def _chunks(x3: _Rows, qw3: np.ndarray | None, rows_per_chunk: int):
    """Yield (l, r0, r1, x float32 (rows, C), importance (rows|1, C) or None) over x viewed as (L, R, C)."""
    for li in range(x3.L):
        for r0 in range(0, x3.R, rows_per_chunk):
            r1 = min(x3.R, r0 + rows_per_chunk)
            xc = x3.rows(li, r0, r1)
            qwc = None
            if qw3 is not None:
                q = qw3[li if qw3.shape[0] > 1 else 0]
                qwc = q[r0:r1] if q.shape[0] > 1 else q
            yield li, r0, r1, xc, qwc


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 and back (the value the block will store)."""
    return x.astype(np.float16).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _safe_inv(x: np.ndarray) -> np.ndarray:
    ok = x != 0
    return np.where(ok, np.float32(1) / np.where(ok, x, np.float32(1)), np.float32(0)).astype(np.float32)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


# numpy reductions over a short last axis (16, 32) are ~10x slower than elementwise ops: use a BLAS
# matrix-vector product for sums and pairwise halving for min/max
_ONES = {n: np.ones(n, dtype=np.float32) for n in (8, 16, 32, 256)}


def _rowsum(a: np.ndarray) -> np.ndarray:
    ones = _ONES.get(a.shape[-1])
    return a.sum(axis=-1) if ones is None else a @ ones


def _rowreduce(a: np.ndarray, op: np.ufunc) -> np.ndarray:
    w = a.shape[-1]
    if w & (w - 1):
        return op.reduce(a, axis=-1)
    while w > 1:
        w //= 2
        a = op(a[..., :w], a[..., w : 2 * w])
    return a[..., 0]


def _signed_absmax(a: np.ndarray) -> np.ndarray:
    """The entry of largest magnitude per row, with its sign (the positive one on a tie)."""
    hi, lo = _rowreduce(a, np.maximum), _rowreduce(a, np.minimum)
    return np.where(hi >= -lo, hi, lo)


# ---- element weights -----------------------------------------------------------------------------------


def _kquant_weights(xs: np.ndarray, qw: np.ndarray | None, rows: int) -> np.ndarray:
    """Weights for the sub-block fits; xs: (n_superblocks, S, n), each super-block split into S sub-blocks."""
    x2 = xs * xs
    if qw is None:
        return np.sqrt(_rowsum(x2) / np.float32(xs.shape[-1]))[..., None] + np.abs(xs)
    sigma2 = (np.float32(2.0 / (xs.shape[-2] * xs.shape[-1])) * _rowsum(x2.reshape(x2.shape[0], -1)))[:, None, None]
    qws = np.broadcast_to(qw, (rows, qw.shape[-1])).reshape(xs.shape)
    return qws * np.sqrt(sigma2 + x2)


# ---- sub-block scale searches ------------------------------------------------------------------------------


def _search_asym(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Best (scale >= 0, min >= 0) with x ~ scale*l - min, l in [0, nmax]: for each inverse scale of the grid
    (nmax + rmin + k*rdelta)/range, round, then fit scale and min by weighted least squares; keep the lowest
    weighted squared error. x, w: (N, n) -> (N,), (N,)."""
    mn = np.minimum(_rowreduce(x, np.minimum), np.float32(0))
    rng = _rowreduce(x, np.maximum) - mn
    inv_rng = _safe_inv(rng)
    xs = x - mn[:, None]
    wx = w * x
    sw, sx, sxx = _rowsum(w), _rowsum(wx), _rowdot(wx, x)
    l = np.empty_like(x)
    wl = np.empty_like(x)
    # start: the plain min/max grid, error evaluated directly (offset form x ~ s*l + m, m <= 0)
    best_s, best_m = rng / np.float32(nmax), mn.copy()
    np.rint(np.multiply(xs, (nmax * inv_rng)[:, None], out=l), out=l)
    r = best_s[:, None] * l + best_m[:, None] - x
    best_err = np.einsum("ij,ij,ij->i", w, r, r)
    one = np.float32(1)
    for k in range(nstep + 1):
        f = nmax + rmin + rdelta * k
        np.rint(np.multiply(xs, (f * inv_rng)[:, None], out=l), out=l)
        if f > nmax:  # xs/range is in [0, 1]: only a grid wider than nmax can round past it
            np.minimum(l, nmax, out=l)
        np.multiply(w, l, out=wl)
        sl, sll, sxl = _rowsum(wl), _rowdot(wl, l), _rowdot(wl, x)
        D = sw * sll - sl * sl
        good = D > 0
        Ds = np.where(good, D, one)
        s = (sw * sxl - sx * sl) / Ds
        m = (sll * sx - sl * sxl) / Ds
        pos = m > 0  # a positive offset is not representable (mins are >= 0): refit the scale alone
        s = np.where(pos, sxl / np.where(sll > 0, sll, one), s)
        m = np.where(pos, np.float32(0), m)
        err = sxx - 2 * s * sxl - 2 * m * sx + s * s * sll + 2 * s * m * sl + m * m * sw
        better = good & (s >= 0) & (err < best_err)
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, m, best_m)
        best_err = np.where(better, err, best_err)
    return best_s.astype(np.float32), (-best_m).astype(np.float32)


def _search_sym(x: np.ndarray, w: np.ndarray, nmax: int, nstep: int, delta: float) -> np.ndarray:
    """Best signed scale with x ~ scale*l, l in [-nmax, nmax-1] (ggml make_qx_quants grid: the largest |x| maps
    to -(nmax + k*delta)); x, w: (N, n) -> (N,)."""
    inv = _safe_inv(_signed_absmax(x))
    best_s = np.zeros(x.shape[0], dtype=np.float32)
    best_score = np.full(x.shape[0], -1.0, dtype=np.float32)
    l = np.empty_like(x)
    wl = np.empty_like(x)
    one = np.float32(1)
    for k in [0] + [k for k in range(-nstep, nstep + 1) if k]:
        np.rint(np.multiply(x, (-(nmax + delta * k) * inv)[:, None], out=l), out=l)
        np.clip(l, -nmax, nmax - 1, out=l)
        np.multiply(w, l, out=wl)
        sxl, sll = _rowdot(wl, x), _rowdot(wl, l)
        pos = sll > 0
        sll_s = np.where(pos, sll, one)
        score = np.where(pos, sxl * sxl / sll_s, np.float32(0))  # error reduction at the LS scale
        better = pos & (score > best_score)
        best_s = np.where(better, sxl / sll_s, best_s)
        best_score = np.where(better, score, best_score)
    return best_s.astype(np.float32)


# ---- K-quants ------------------------------------------------------------------------------------------------


def _kquant_asym(x: np.ndarray, qw: np.ndarray | None, nmax: int):
    """Shared Q4_K/Q5_K core. x: (rows, C) -> d, dmin (NB,), ls, lm (NB, 8) uint8, L (NB, 8, 32) uint8."""
    xs = x.reshape(-1, 8, 32)  # NB super-blocks of 8 sub-blocks
    w = _kquant_weights(xs, qw, x.shape[0])
    s, mv = _search_asym(xs.reshape(-1, 32), w.reshape(-1, 32), nmax, -1.0, 0.2, 10)
    s, mv = s.reshape(-1, 8), mv.reshape(-1, 8)
    d = _f16(_rowreduce(s, np.maximum) / np.float32(63))
    dm = _f16(_rowreduce(mv, np.maximum) / np.float32(63))
    ls = np.clip(np.rint(s * _safe_inv(d)[:, None]), 0, 63)
    lm = np.clip(np.rint(mv * _safe_inv(dm)[:, None]), 0, 63)
    eff_d = (d[:, None] * ls)[..., None]
    eff_m = (dm[:, None] * lm)[..., None]
    L = np.clip(np.rint((xs + eff_m) * _safe_inv(eff_d)), 0, nmax)
    return d, dm, ls.astype(np.uint8), lm.astype(np.uint8), L.astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (ggml get_scale_min_k4 layout)."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dm, ls, lm, L = _kquant_asym(x, qw, 15)
    qs = (L[:, 0::2, :] | (L[:, 1::2, :] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dm), _pack_scales_k4(ls, lm), qs], axis=1)


def _q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dm, ls, lm, L = _kquant_asym(x, qw, 31)
    lo = L & 0xF
    qs = (lo[:, 0::2, :] | (lo[:, 1::2, :] << 4)).reshape(-1, 128)
    hi = (L >> 4) & 1  # (NB, 8, 32): bit j of qh[l] <- sub-block j
    qh = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dm), _pack_scales_k4(ls, lm), qh, qs], axis=1)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xs = x.reshape(-1, 16, 16)
    w = _kquant_weights(xs, qw, x.shape[0])
    s = _search_sym(xs.reshape(-1, 16), w.reshape(-1, 16), 32, 6, 0.15).reshape(-1, 16)
    d = _f16(-_signed_absmax(s) / np.float32(128))  # the largest |scale| maps to -128
    ls = np.clip(np.rint(s * _safe_inv(d)[:, None]), -128, 127)
    eff = (d[:, None] * ls)[..., None]
    L = (np.clip(np.rint(xs * _safe_inv(eff)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.concatenate(  # (NB, half, quarter, 32): quarters 0/2 and 1/3 share bytes (low / high nibble)
        [(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2
    ).reshape(-1, 128)
    qh = ((L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    sc = ls.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh.reshape(-1, 64), sc, _f16_bytes(d)], axis=1)


def _q5_0_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q5_0 with importance: weighted symmetric scale search per 32-block (as ggml quantize_row_q5_0_impl)."""
    rows, C = x.shape
    x2 = x * x
    sigma2 = x2.mean(axis=1, keepdims=True)
    w = (np.broadcast_to(qw, (rows, C)) * np.sqrt(sigma2 + x2)).reshape(-1, 32)
    xb = x.reshape(-1, 32)
    d = _f16(_search_sym(xb, w, 16, 9, 0.1))
    q = (np.clip(np.rint(xb * _safe_inv(d)[:, None]), -16, 15) + 16).astype(np.uint8)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # bit j of the little-endian u32 = element j
    return np.concatenate([_f16_bytes(d), qh, qs], axis=1)


# ---- NVFP4 ---------------------------------------------------------------------------------------------------

_E2M1_ABS_NP = np.array(_E2M1_ABS, dtype=np.float32)
# every decision point (_E2M1_MIDS) is a multiple of 1/4: ceil(4|v|) indexes the nearest grid value directly
_E2M1_BY_QUARTER = np.searchsorted(np.array(_E2M1_MIDS) * 4, np.arange(22), side="left").astype(np.uint8)


def _e2m1_index(v: np.ndarray) -> np.ndarray:
    """Nearest |E2M1| grid index (0..7) of v >= 0; ties go to the smaller magnitude."""
    return _E2M1_BY_QUARTER[np.minimum(np.ceil(v * np.float32(4)), 21).astype(np.intp)]


def _nvfp4(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """x: (rows, C) already divided by the global scale. Per 16-element sub-block, try the UE4M3 scales around
    ue4m3(amax/6) (codes -2..+1) and keep the lowest (importance-)weighted squared error; each element takes
    the nearest E2M1 value (ties to the smaller magnitude)."""
    rows, C = x.shape
    xb = x.reshape(-1, 16)
    ax = np.abs(xb)
    w = None if qw is None else np.broadcast_to(qw, (rows, C)).reshape(-1, 16)
    amax = _rowreduce(ax, np.maximum)
    c0 = ue4m3_encode(amax / np.float32(6)).astype(np.int32)
    best_c = c0.copy()
    best_err = np.full(amax.shape, np.inf, dtype=np.float32)
    best_idx = np.zeros(xb.shape, dtype=np.uint8)
    for k in (0, -1, 1, -2):
        c = np.where(amax > 0, np.clip(c0 + k, 1, 0x7E), 0)
        S = ue4m3_decode(c)
        idx = _e2m1_index(ax * _safe_inv(S)[:, None])
        e = ax - _E2M1_ABS_NP[idx] * S[:, None]
        err = np.einsum("ij,ij->i", e, e) if w is None else np.einsum("ij,ij,ij->i", e, e, w)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_c = np.where(better, c, best_c)
        best_idx = np.where(better[:, None], idx, best_idx)
    nib = (best_idx | (((xb < 0) & (best_idx > 0)).astype(np.uint8) << 3)).reshape(-1, 4, 16)
    qs = (nib[:, :, :8] | (nib[:, :, 8:] << 4)).reshape(-1, 32)
    return np.concatenate([best_c.astype(np.uint8).reshape(-1, 4), qs], axis=1)


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
    normal = (np.float32(1) + m / np.float32(8)) * np.exp2(e - 7).astype(np.float32)
    v = np.where(e == 0, m * np.float32(2.0**-9), normal)
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
