"""NVFP4 weight quantization, bit-exact with ModelOpt's "max" (RTN) path.

Format (runtime and ModelOpt checkpoints; `nvfp4.md` §1): a linear with out N, in K (K % 16 == 0) stores
- `weight`        uint8 [N, K//2]: E2M1 codes, element k = 2j in the LOW nibble, 2j+1 in the HIGH nibble;
                  code bit 3 = sign, code & 7 indexes the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6};
- `weight_scale`  float8_e4m3fn [N, K//16]: one positive block scale per 16 consecutive inputs;
- `weight_scale_2` float32 (0-d; [E] for stacked experts): the tensor ("global") scale, multiplied;
  W[n, k] = E2M1(q[n, k]) * float(weight_scale[n, k // 16]) * weight_scale_2.

Stacked experts [E, N, K] get one `weight_scale_2` per expert ([E]); HF's fused `gate_up_proj` [E, 2I, H]
therefore shares one global scale between gate and up of an expert, as ModelOpt's export requires.

RTN algorithm (ModelOpt `NVFP4QTensor.quantize`, every step in fp32 and in this order, so results are
bit-identical):
1. ws2 = amax(|W|) / 2688                          (2688 = 6 * 448; an all-zero tensor gets ws2 = 1.0)
2. s_b = block_amax / (6 * ws2); s_b == 0 -> 1.0; clamp to [2^-9, 448]; cast to E4M3 (round-half-even)
3. scaled = W / (float(fp8(s_b)) * ws2)            (divides by the *rounded* block scale)
4. E2M1 round-to-nearest, ties to even mantissa, saturating at 6; sign from `scaled < 0` (so -0.0 -> code 0,
   a small negative rounding to zero -> code 8)
5. pack: byte = q[2j] | q[2j+1] << 4
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..runtime.errors import CheckpointError

log = logging.getLogger(__name__)

BLOCK = 16  # elements per block scale, along K
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GLOBAL_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688.0
E4M3_MIN_SCALE = 2.0**-9  # smallest positive E4M3 subnormal: block scales never underflow to 0

# magnitude of code & 7; codes 8..15 are the negatives (code 8 = -0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# decision boundaries between consecutive magnitudes and whether a value exactly on the boundary rounds up
# (ties to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4)
_BOUNDS_UP_ON_TIE = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))

# Rows processed at once are chosen so that one chunk holds about this many elements: with ~6 fp32/uint8
# temporaries per element this bounds scratch memory to roughly 100 MB whatever the tensor size.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class NVFP4Tensor:
    """A quantized linear weight (or a stack of them) in the runtime / ModelOpt layout."""

    weight: torch.Tensor  # uint8 [..., N, K//2]
    weight_scale: torch.Tensor  # float8_e4m3fn [..., N, K//16]
    weight_scale_2: torch.Tensor  # float32, 0-d for a 2-D weight, [E] for [E, N, K]

    def __post_init__(self) -> None:
        w, s, g = self.weight, self.weight_scale, self.weight_scale_2
        if w.dtype != torch.uint8 or s.dtype != torch.float8_e4m3fn or g.dtype != torch.float32:
            raise CheckpointError(
                f"NVFP4 tensors must be uint8 / float8_e4m3fn / float32, got {w.dtype} / {s.dtype} / {g.dtype}"
            )
        if w.dim() not in (2, 3) or s.shape[:-1] != w.shape[:-1] or s.shape[-1] * 8 != w.shape[-1]:
            raise CheckpointError(f"NVFP4 shapes disagree: weight {tuple(w.shape)}, weight_scale {tuple(s.shape)}")
        want = tuple(w.shape[:-2])
        if tuple(g.shape) != want:
            raise CheckpointError(
                f"weight_scale_2 has shape {tuple(g.shape)}, expected {want} for weight {tuple(w.shape)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (unpacked) shape [..., N, K]."""
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 2)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.weight_scale.numel() + 4 * self.weight_scale_2.numel()


# ---- element codec ---------------------------------------------------------------------------------------


def e2m1_encode(scaled: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to E2M1 codes, uint8 in [0, 15], same shape."""
    a = scaled.abs()
    code = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for bound, up_on_tie in _BOUNDS_UP_ON_TIE:
        # counting the boundaries passed gives the magnitude index (saturating at 7 = 6.0 above 5)
        code += (a >= bound) if up_on_tie else (a > bound)
    code |= (scaled < 0).to(torch.uint8) << 3
    return code


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes in [0, 15] -> values (same shape)."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 codes -> [..., K//2] bytes, even index in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., K//2] bytes -> [..., K] uint8 codes."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


# ---- scales ----------------------------------------------------------------------------------------------


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """weight_scale_2 (or input_scale) = amax / 2688 in fp32; a zero amax (all-zero tensor) gives 1.0.

    ModelOpt would produce 0 here and NaN block scales; compressed-tensors falls back to 1.0 for a non-finite
    global, which is what we store (dequantization of an all-zero tensor is exactly zero either way)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    g = amax / GLOBAL_DIVISOR
    return torch.where(amax > 0, g, torch.ones_like(g))


def input_scale_from_amax(act_amax: torch.Tensor | float) -> torch.Tensor:
    """ModelOpt `input_scale` for an activation whose calibrated per-tensor max is `act_amax`."""
    return global_scale_from_amax(act_amax)


def rtn_block_scales(block_amax: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales for the given per-block amax [..., nb] and per-row global ws2 [...] (fp32).

    ModelOpt's exact order: amax / (6 * ws2), zero -> 1, clamp, round to E4M3."""
    s = block_amax.float() / (E2M1_MAX * ws2.unsqueeze(-1))
    s = torch.where(s == 0, torch.ones_like(s), s)
    # the upper clamp is a no-op when ws2 comes from the tensor's own amax (s <= 448 up to fp32 rounding,
    # which RNE maps back to 448); it matters only for a caller-supplied, smaller global scale
    return s.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)


def _as_rows(w: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int, int]:
    """Check a 2-D / 3-D weight and view it as [R, K] rows; returns (rows, E, N, K) with E = 1 for 2-D."""
    if w.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{name}: cannot quantize dtype {w.dtype} to NVFP4 (expected bf16/fp16/fp32)")
    if w.dim() not in (2, 3):
        raise CheckpointError(f"{name}: NVFP4 needs a 2-D [N, K] or 3-D [E, N, K] weight, got shape {tuple(w.shape)}")
    K = w.shape[-1]
    if K % BLOCK != 0 or K == 0:
        raise CheckpointError(f"{name}: in_features {K} is not a positive multiple of {BLOCK} (shape {tuple(w.shape)})")
    E = w.shape[0] if w.dim() == 3 else 1
    N = w.shape[-2]
    return w.reshape(-1, K), E, N, K


def _rows_per_chunk(K: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // K)


def _check_finite(x: torch.Tensor, name: str, row0: int) -> None:
    """x: per-row reductions [r, ...] of rows starting at flattened row row0 (amax propagates NaN/Inf)."""
    if not bool(torch.isfinite(x).all()):
        row = row0 + int((~torch.isfinite(x)).nonzero()[0, 0])
        raise CheckpointError(f"{name}: non-finite value (NaN/Inf) in (flattened) row {row}; refusing to quantize")


def tensor_amax(w: torch.Tensor, *, name: str = "weight", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """max |w| in fp32: 0-d for [N, K], [E] (per expert) for [E, N, K]. Rejects NaN/Inf."""
    rows, E, N, K = _as_rows(w, name)
    step = _rows_per_chunk(K, chunk_elements)
    row_max = torch.empty(rows.shape[0], dtype=torch.float32, device=w.device)
    for r0 in range(0, rows.shape[0], step):
        # amax propagates NaN and Inf, so checking the reduced row maxima is enough
        m = rows[r0 : r0 + step].abs().amax(dim=-1).float()
        _check_finite(m.unsqueeze(-1), name, r0)
        row_max[r0 : r0 + step] = m
    per = row_max.view(E, N).amax(dim=-1)
    return per if w.dim() == 3 else per[0]


def shared_weight_scale_2(tensors: Sequence[torch.Tensor], *, name: str = "group") -> torch.Tensor:
    """One global scale for a group that a kernel fuses (dense gate+up, q/k/v): max of the members' amax.

    All members must have the same leading dims (0-d result for 2-D members, [E] for 3-D)."""
    if not tensors:
        raise CheckpointError(f"{name}: empty tensor group")
    amaxes = [tensor_amax(t, name=f"{name}[{i}]") for i, t in enumerate(tensors)]
    if len({tuple(a.shape) for a in amaxes}) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise CheckpointError(f"{name}: group members have different expert counts: {shapes}")
    return global_scale_from_amax(torch.stack(amaxes).amax(dim=0))


def _ws2_vector(ws2: torch.Tensor | float, E: int, name: str) -> torch.Tensor:
    """Validate a global scale and return it as [E] fp32 (a single value is shared by all experts)."""
    ws2 = torch.as_tensor(ws2, dtype=torch.float32).detach().cpu()
    if ws2.numel() == 1:
        ws2 = ws2.reshape(1).expand(E)
    if ws2.shape != (E,):
        want = "()" if E == 1 else f"() or ({E},)"
        raise CheckpointError(f"{name}: weight_scale_2 has shape {tuple(ws2.shape)}, expected {want}")
    if not bool((torch.isfinite(ws2) & (ws2 > 0)).all()):
        raise CheckpointError(f"{name}: weight_scale_2 must be finite and positive, got {ws2.tolist()[:8]}")
    return ws2.clone()


def _row_ws2(ws2: torch.Tensor, N: int, device: torch.device) -> torch.Tensor:
    return ws2.to(device).repeat_interleave(N)  # [E*N]


# ---- quantize / dequantize -------------------------------------------------------------------------------


def encode_with_scales(x: torch.Tensor, scale_fp8: torch.Tensor, ws2_rows: torch.Tensor) -> torch.Tensor:
    """Element step for one chunk: x [R, K] float, scale_fp8 [R, K//16], ws2_rows [R] -> codes uint8 [R, K]."""
    R, K = x.shape
    d = scale_fp8.float() * ws2_rows.unsqueeze(-1)  # [R, nb] fp32, the same product dequantization uses
    scaled = x.float().view(R, K // BLOCK, BLOCK) / d.unsqueeze(-1)
    return e2m1_encode(scaled.view(R, K))


def quantize(
    w: torch.Tensor,
    *,
    weight_scale_2: torch.Tensor | float | None = None,
    name: str = "weight",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> NVFP4Tensor:
    """RTN ("max") NVFP4 quantization of [N, K] or stacked [E, N, K] (per-expert global scales).

    weight_scale_2: a fixed global scale (0-d / [E]) instead of amax/2688, e.g. `shared_weight_scale_2(...)`
    for a fused group. Memory: output plus O(chunk_elements) scratch; w may be bf16/fp16/fp32, any device."""
    rows, E, N, K = _as_rows(w, name)
    if weight_scale_2 is None:
        weight_scale_2 = global_scale_from_amax(tensor_amax(w, name=name, chunk_elements=chunk_elements))
    ws2 = _ws2_vector(weight_scale_2, E, name)  # [E]
    ws2_rows = _row_ws2(ws2, N, w.device)
    R = rows.shape[0]
    packed = torch.empty(R, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(R, K // BLOCK, dtype=torch.float8_e4m3fn, device=w.device)
    step = _rows_per_chunk(K, chunk_elements)
    for r0 in range(0, R, step):
        x = rows[r0 : r0 + step].float()  # [r, K]
        bamax = x.view(x.shape[0], K // BLOCK, BLOCK).abs().amax(dim=-1)  # [r, nb]
        _check_finite(bamax, name, r0)
        s = rtn_block_scales(bamax, ws2_rows[r0 : r0 + step])
        scales[r0 : r0 + step] = s
        packed[r0 : r0 + step] = pack_nibbles(encode_with_scales(x, s, ws2_rows[r0 : r0 + step]))
    lead = tuple(w.shape[:-1])
    g = ws2.reshape(tuple(w.shape[:-2])).to(w.device)
    return NVFP4Tensor(packed.view(*lead, K // 2), scales.view(*lead, K // BLOCK), g)


def quantize_with_block_scales(
    w: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float,
    *,
    name: str = "weight",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> NVFP4Tensor:
    """Encode w with caller-chosen E4M3 block scales (e.g. from a scale search) and global scale(s)."""
    rows, E, N, K = _as_rows(w, name)
    if weight_scale.dtype != torch.float8_e4m3fn or tuple(weight_scale.shape) != (*w.shape[:-1], K // BLOCK):
        raise CheckpointError(f"{name}: weight_scale must be float8_e4m3fn {(*w.shape[:-1], K // BLOCK)}, "
                              f"got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    ws2 = _ws2_vector(weight_scale_2, E, name)  # [E]
    ws2_rows = _row_ws2(ws2, N, w.device)
    s_rows = weight_scale.reshape(-1, K // BLOCK)
    if not bool((s_rows.float() > 0).all()) or not bool(torch.isfinite(s_rows.float()).all()):
        raise CheckpointError(f"{name}: block scales must be positive and finite")
    R = rows.shape[0]
    packed = torch.empty(R, K // 2, dtype=torch.uint8, device=w.device)
    step = _rows_per_chunk(K, chunk_elements)
    for r0 in range(0, R, step):
        x = rows[r0 : r0 + step].float()
        _check_finite(x.abs().amax(dim=-1, keepdim=True), name, r0)
        packed[r0 : r0 + step] = pack_nibbles(encode_with_scales(x, s_rows[r0 : r0 + step], ws2_rows[r0 : r0 + step]))
    g = ws2.reshape(tuple(w.shape[:-2])).to(w.device)
    return NVFP4Tensor(packed.view(*w.shape[:-1], K // 2), weight_scale.clone(), g)


def quantize_group(
    tensors: Sequence[torch.Tensor], *, name: str = "group", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> list[NVFP4Tensor]:
    """RTN-quantize tensors that must share one global scale (per expert for 3-D members)."""
    ws2 = shared_weight_scale_2(tensors, name=name)
    return [
        quantize(t, weight_scale_2=ws2, name=f"{name}[{i}]", chunk_elements=chunk_elements)
        for i, t in enumerate(tensors)
    ]


def dequantize(
    q: NVFP4Tensor, dtype: torch.dtype = torch.float32, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """NVFP4 -> dense [..., N, K] in `dtype`; values computed in fp32 as e2m1 * (fp8 scale * ws2)."""
    shape = q.shape
    K = shape[-1]
    E = shape[0] if len(shape) == 3 else 1
    N = shape[-2]
    ws2_rows = q.weight_scale_2.reshape(E).to(q.weight.device).repeat_interleave(N)
    packed = q.weight.reshape(-1, K // 2)
    scales = q.weight_scale.reshape(-1, K // BLOCK)
    out = torch.empty(packed.shape[0], K, dtype=dtype, device=q.weight.device)
    step = _rows_per_chunk(K, chunk_elements)
    for r0 in range(0, packed.shape[0], step):
        vals = e2m1_decode(unpack_nibbles(packed[r0 : r0 + step]))  # [r, K] fp32
        d = scales[r0 : r0 + step].float() * ws2_rows[r0 : r0 + step].unsqueeze(-1)  # [r, nb]
        r = vals.shape[0]
        out[r0 : r0 + step] = (vals.view(r, K // BLOCK, BLOCK) * d.unsqueeze(-1)).view(r, K).to(dtype)
    return out.view(shape)
