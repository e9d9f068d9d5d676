"""NVFP4 numerics: bit-exact against a deliberately simple scalar reference, hand-worked cases, round trips,
and (when installed) compressed-tensors' own CPU quantizer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dgemma.converter import nvfp4 as nv
from dgemma.runtime.errors import CheckpointError, DGemmaError

F32 = np.float32
GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ---- independent scalar reference (loops, Python/numpy scalars; no torch quantization code) -------------


def ref_e4m3(v: float) -> tuple[float, int]:
    """Round a positive value (already clamped to [2^-9, 448]) to E4M3, RNE; returns (value, byte)."""
    m, e = math.frexp(v)  # v = m * 2^e, m in [0.5, 1)
    e -= 1  # v = (2m) * 2^e, 2m in [1, 2)
    step = 2.0**-9 if e < -6 else 2.0 ** (e - 3)  # subnormals share the 2^-9 step
    q = round(v / step) * step  # Python round(): ties to even; v / step is exact (power-of-two step)
    if q < 2.0**-6:
        return q, int(q / 2.0**-9)  # exponent field 0
    m, e = math.frexp(q)
    e -= 1
    mant = int((q / 2.0**e - 1.0) * 8)
    return q, ((e + 7) << 3) | mant


def ref_e2m1(x: float) -> int:
    """Nearest E2M1 code, ties to the even code (= even mantissa), saturating; sign from x < 0."""
    a = abs(x)
    if a >= 6.0:
        idx = 7
    else:
        dist = [abs(a - g) for g in GRID]
        best = min(dist)
        cands = [i for i, d in enumerate(dist) if d == best]
        idx = cands[0] if len(cands) == 1 else [i for i in cands if i % 2 == 0][0]
    return idx | (8 if x < 0 else 0)


def ref_quantize_2d(w: np.ndarray, ws2: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns (packed uint8 [N, K/2], scale bytes uint8 [N, K/16], ws2) following nvfp4.md §1.3 literally."""
    w = w.astype(F32)
    N, K = w.shape
    if ws2 is None:
        amax = F32(max(abs(float(v)) for v in w.ravel()))
        ws2 = F32(amax / F32(2688.0)) if amax > 0 else F32(1.0)
    ws2 = F32(ws2)
    packed = np.zeros((N, K // 2), np.uint8)
    sbytes = np.zeros((N, K // 16), np.uint8)
    for n in range(N):
        codes = []
        for b in range(K // 16):
            blk = w[n, b * 16 : (b + 1) * 16]
            bamax = F32(max(abs(float(v)) for v in blk))
            s = F32(bamax / F32(F32(6.0) * ws2))
            if s == 0:
                s = F32(1.0)
            s = min(max(float(s), 2.0**-9), 448.0)
            sval, sbyte = ref_e4m3(s)
            sbytes[n, b] = sbyte
            d = F32(F32(sval) * ws2)
            codes += [ref_e2m1(float(F32(v / d))) for v in blk]
        for j in range(K // 2):
            packed[n, j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    return packed, sbytes, float(ws2)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def _mixed_weights(seed: int, n: int, k: int) -> torch.Tensor:
    """Gaussian rows with per-row magnitudes spread over 1e-6..1e2, a zero block, a tiny block, exact ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-6, 2, n).unsqueeze(1)
    w[1, 16:32] = 0.0
    w[2, :16] *= 1e-9  # a block whose scale underflows to the E4M3 subnormal range
    return w


# ---- bit-exact vs the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,seed", [((7, 48), 0), ((13, 80), 1), ((5, 160), 2)])
def test_bit_identical_to_scalar_reference(shape, seed, dtype):
    w = _mixed_weights(seed, *shape).to(dtype)
    q = nv.quantize(w)
    ref_packed, ref_scales, ref_ws2 = ref_quantize_2d(w.float().numpy())
    assert float(q.weight_scale_2) == ref_ws2
    assert np.array_equal(_bytes(q.weight_scale), ref_scales), "block scale bytes differ"
    diff = np.count_nonzero(_bytes(q.weight) != ref_packed)
    print(f"{shape} {dtype}: {ref_packed.size} packed bytes, {diff} differ")
    assert diff == 0


def test_bit_identical_with_rows_of_one_scale_each():
    # every row has its own magnitude so the tensor amax leaves most blocks far below 448: exercises rounding
    # of block scales across the whole E4M3 range, including subnormals
    w = _mixed_weights(3, 31, 32)
    w[5] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)  # ties after scaling? (depends on d)
    q = nv.quantize(w)
    rp, rs, _ = ref_quantize_2d(w.numpy())
    assert np.array_equal(_bytes(q.weight_scale), rs)
    assert np.array_equal(_bytes(q.weight), rp)
    assert (_bytes(q.weight_scale) < 8).any(), "test should cover subnormal E4M3 scales"


def test_ref_e4m3_matches_torch_cast_on_every_code():
    # sanity of the reference itself: every positive E4M3 value and the midpoints between neighbours
    vals = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    for i, v in enumerate(vals):
        assert ref_e4m3(v) == (v, i + 1)
        if i + 1 < len(vals):
            mid = (v + vals[i + 1]) / 2
            want_code = i + 1 if (i + 1) % 2 == 0 else i + 2  # tie goes to the even code
            assert ref_e4m3(mid)[1] == want_code
            assert int(torch.tensor([mid]).to(torch.float8_e4m3fn).view(torch.uint8)) == want_code


# ---- hand-worked cases -----------------------------------------------------------------------------------


def _codes(q: nv.NVFP4Tensor) -> list[int]:
    return nv.unpack_nibbles(q.weight).flatten().tolist()


def test_grid_values_and_nibble_order():
    # ws2 = 1 and block max 6 -> block scale fp8(1.0), divisor exactly 1: scaled values are the inputs
    row = [6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 0.5]
    q = nv.quantize(torch.tensor([row]), weight_scale_2=1.0)
    assert _bytes(q.weight_scale).tolist() == [[0x38]]  # E4M3 1.0 = exponent 7, mantissa 0
    assert _codes(q) == [7, 1, 2, 3, 4, 5, 6, 0, 9, 10, 11, 12, 13, 14, 15, 1]
    # even element in the low nibble: byte 0 = code(6.0)=7 | code(0.5)=1 << 4
    assert q.weight[0, 0].item() == 0x17 and q.weight[0, 1].item() == (2 | 3 << 4)
    assert nv.dequantize(q)[0].tolist() == row


def test_ties_round_to_even():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    want = [0, 2, 2, 4, 4, 6, 6]  # -> 0, 1, 1, 2, 2, 4, 4
    row = ties + [-t for t in ties] + [6.0, -0.0]
    q = nv.quantize(torch.tensor([row]), weight_scale_2=1.0)
    c = _codes(q)
    assert c[:7] == want
    assert c[7:14] == [w | 8 for w in want]  # -0.25 rounds to -0 (code 8), like ModelOpt's sign = x < 0
    assert c[15] == 0  # -0.0 is not < 0: code 0
    # just off the ties the rounding is to nearest
    up = [float(np.nextafter(F32(t), F32(10))) for t in ties]
    dn = [float(np.nextafter(F32(t), F32(0))) for t in ties]
    q = nv.quantize(torch.tensor([up + [6.0] * 9]), weight_scale_2=1.0)
    assert _codes(q)[:7] == [1, 2, 3, 4, 5, 6, 7]
    q = nv.quantize(torch.tensor([dn + [6.0] * 9]), weight_scale_2=1.0)
    assert _codes(q)[:7] == [0, 1, 2, 3, 4, 5, 6]


def test_saturation():
    # block scale fp8(1.0) forced, values past 6 saturate to +-6
    w = torch.tensor([[7.0, 100.0, -1e6, 5.5, -5.01, 6.0001] + [1.0] * 10])
    s = torch.ones(1, 1).to(torch.float8_e4m3fn)
    q = nv.quantize_with_block_scales(w, s, 1.0)
    assert _codes(q)[:6] == [7, 7, 15, 7, 15, 7]
    # RTN with a caller-given global scale too small for the tensor: block scale clamps at 448 and saturates
    w = torch.tensor([[12.0] + [0.5] * 15])
    q = nv.quantize(w, weight_scale_2=1.0 / 2688)
    assert _bytes(q.weight_scale).tolist() == [[0x7E]]  # 448
    d = nv.dequantize(q)
    assert d[0, 0].item() == pytest.approx(6 * 448 / 2688)
    # RTN where the block scale rounds down (1.0625 -> fp8 1.0): block max maps to 6.375 and saturates to 6
    w = torch.tensor([[6.375] + [1.0] * 15])
    q = nv.quantize(w, weight_scale_2=1.0)
    assert _bytes(q.weight_scale).tolist() == [[0x38]] and _codes(q)[0] == 7


def test_tiny_and_subnormal_block_scales():
    big = [2688.0] + [1.0] * 15  # scale 448 with ws2 = 1
    cases = {
        6 * 2.0**-8: 0x02,  # s = 2^-8 = 2 * 2^-9 (subnormal)
        6 * 3 * 2.0**-10: 0x02,  # s = 1.5 * 2^-9: tie between codes 1 and 2 -> even code 2
        6 * 5 * 2.0**-10: 0x02,  # s = 2.5 * 2^-9: tie -> 2
        6 * 7 * 2.0**-10: 0x04,  # s = 3.5 * 2^-9: tie -> 4
        6 * 1e-5: 0x01,  # below 2^-9: clamped to the smallest subnormal, never 0
        6 * 2.0**-6: 0x08,  # smallest normal
    }
    rows = [big] + [[v] + [v / 7] * 15 for v in cases]
    q = nv.quantize(torch.tensor(rows), weight_scale_2=1.0)
    got = _bytes(q.weight_scale)[:, 0].tolist()
    assert got[0] == 0x7E
    assert got[1:] == list(cases.values())
    # the clamped block: its elements are divided by 2^-9 and still round to a sensible code
    d = nv.dequantize(q)
    assert d[5, 0].item() == pytest.approx(2.0**-9 * round(6e-5 / 2.0**-9 * 2) / 2)


def test_zero_blocks_and_zero_tensor():
    w = torch.randn(3, 48)
    w[1, 16:32] = 0.0
    q = nv.quantize(w)
    assert _bytes(q.weight_scale)[1, 1] == 0x38  # all-zero block gets scale 1.0
    assert (nv.unpack_nibbles(q.weight)[1, 16:32] == 0).all()
    z = nv.quantize(torch.zeros(2, 32, dtype=torch.bfloat16))
    assert float(z.weight_scale_2) == 1.0  # instead of ModelOpt's 0 / NaN
    assert (_bytes(z.weight_scale) == 0x38).all() and (z.weight == 0).all()
    assert (nv.dequantize(z) == 0).all()
    # one all-zero expert in a stack
    e = torch.randn(3, 5, 32)
    e[1] = 0
    qe = nv.quantize(e)
    assert qe.weight_scale_2[1].item() == 1.0 and (nv.dequantize(qe)[1] == 0).all()


def test_negative_zero_decodes_to_zero():
    codes = torch.tensor([[8, 0] * 8], dtype=torch.uint8)
    v = nv.e2m1_decode(codes)
    assert (v == 0).all() and torch.signbit(v[0, 0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad):
    w = torch.randn(5, 32)
    w[3, 17] = bad
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        nv.quantize(w, name="layers.0.q_proj")
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        nv.quantize(w, weight_scale_2=1.0)  # no amax pass: caught per block


def test_bad_shapes_and_dtypes():
    with pytest.raises(DGemmaError, match="multiple of 16"):
        nv.quantize(torch.randn(4, 24))
    with pytest.raises(DGemmaError, match="2-D"):
        nv.quantize(torch.randn(32))
    with pytest.raises(DGemmaError, match="dtype"):
        nv.quantize(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(DGemmaError, match="weight_scale_2"):
        nv.quantize(torch.randn(2, 4, 32), weight_scale_2=torch.ones(3))
    with pytest.raises(DGemmaError, match="positive"):
        nv.quantize(torch.randn(4, 32), weight_scale_2=0.0)


# ---- stacking, groups, chunking, round trips -------------------------------------------------------------


def test_stacked_experts_equal_per_expert_2d():
    w = torch.randn(3, 9, 64, dtype=torch.bfloat16) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1).bfloat16()
    q = nv.quantize(w)
    assert q.weight.shape == (3, 9, 32) and q.weight_scale.shape == (3, 9, 4) and q.weight_scale_2.shape == (3,)
    for e in range(3):
        qe = nv.quantize(w[e])
        assert torch.equal(q.weight[e], qe.weight)
        assert torch.equal(_bytes_t(q.weight_scale[e]), _bytes_t(qe.weight_scale))
        assert q.weight_scale_2[e] == qe.weight_scale_2


def _bytes_t(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_scalar_global_scale_is_shared_by_experts():
    w = torch.randn(3, 5, 32)
    q = nv.quantize(w, weight_scale_2=0.01)
    assert q.weight_scale_2.shape == (3,) and (q.weight_scale_2 == torch.tensor(0.01)).all()
    assert torch.equal(q.weight[1], nv.quantize(w[1], weight_scale_2=0.01).weight)


def test_group_shares_global_scale():
    gate, up = torch.randn(6, 32), torch.randn(6, 32) * 5
    qg, qu = nv.quantize_group([gate, up])
    assert qg.weight_scale_2 == qu.weight_scale_2 == nv.global_scale_from_amax(up.abs().max())
    # stacked gate_up [E, 2I, H]: the per-expert scale is the group's scale of that expert's gate and up
    gu = torch.stack([torch.cat([gate, up]), torch.cat([up, gate]) * 0.1])
    q = nv.quantize(gu)
    ws = nv.shared_weight_scale_2([gu[:, :6], gu[:, 6:]])
    assert torch.equal(q.weight_scale_2, ws)


def test_chunking_does_not_change_results():
    w = torch.randn(2, 37, 96, dtype=torch.bfloat16)
    a = nv.quantize(w)
    b = nv.quantize(w, chunk_elements=96 * 5)  # 5 rows per chunk, chunks cross expert boundaries
    assert torch.equal(a.weight, b.weight) and torch.equal(_bytes_t(a.weight_scale), _bytes_t(b.weight_scale))
    assert torch.equal(nv.dequantize(a), nv.dequantize(b, chunk_elements=96 * 3))


def test_round_trip_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(129, 512)
    q = nv.quantize(w)
    d = nv.dequantize(q)
    rel = ((d - w).norm() / w.norm()).item()
    print(f"RTN relative RMSE on Gaussian weights: {rel:.4f}")
    assert 0.08 < rel < 0.11  # nvfp4.md: ~9.5 %
    # per element: |err| <= one divisor (half the widest grid step, 2, or the saturation loss <= 0.375)
    div = q.weight_scale.float() * q.weight_scale_2
    assert ((d - w).abs().view(129, 32, 16) <= div.unsqueeze(-1) * (1 + 1e-6)).all()
    # dequantized values are on the grid: re-encoding them with the same scales reproduces the codes, except
    # that -0 (code 8, a small negative rounded to zero) dequantizes to -0.0, which encodes as code 0
    again = nv.unpack_nibbles(nv.quantize_with_block_scales(d, q.weight_scale, q.weight_scale_2).weight)
    orig = nv.unpack_nibbles(q.weight)
    assert torch.equal(again, torch.where(orig == 8, torch.zeros_like(orig), orig))
    assert (orig == 8).any()
    assert nv.dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_codec_helpers():
    c = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    assert torch.equal(nv.unpack_nibbles(nv.pack_nibbles(c)), c)
    assert torch.equal(nv.input_scale_from_amax(torch.tensor(2688.0)), torch.tensor(1.0))


# ---- compressed-tensors (optional test-only dependency) --------------------------------------------------


def test_matches_compressed_tensors_except_reciprocal_ties():
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    torch.manual_seed(0)
    N, K = 128, 256
    w = (torch.randn(N, K) * torch.logspace(-3, 0, N).unsqueeze(1)).clamp(-4, 4)
    w[-1, 0] = 4.09375  # a tensor amax whose 2688/amax reciprocal differs from amax/2688 for many scales
    w[:, 0::16] = w.view(N, K // 16, 16).abs().amax(-1)  # element 0 holds each block's max
    # plant exact E2M1 ties (in ModelOpt's arithmetic) at element 1 of every block, so that the reciprocal
    # difference actually shows up
    q0 = nv.quantize(w)
    d0 = q0.weight_scale.float().repeat_interleave(16, dim=1) * q0.weight_scale_2
    # (ties up to 3.5 only: the block max maps to >= 5.6, so the planted value never changes a block scale)
    planted = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5])
    w[:, 1::16] = planted[torch.arange(N * K // 16) % 6].view(N, K // 16) * d0[:, 1::16] * torch.sign(w[:, 1::16])
    args = QuantizationArgs(num_bits=4, type="float", symmetric=True, group_size=16, strategy="tensor_group",
                            scale_dtype=torch.float8_e4m3fn)
    x = w
    gs = generate_gparam(x.min(), x.max())  # 2688 / amax, [1]
    blocks = x.view(N, K // 16, 16)
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
    packed = quantize_and_pack_fp4(x, scale, gs)  # CPU fallback path; scale holds fp8-rounded values

    q = nv.quantize(w)
    ours_s = _bytes(q.weight_scale)
    theirs_s = _bytes(scale.to(torch.float8_e4m3fn))
    same = np.count_nonzero(ours_s == theirs_s)
    print(f"compressed-tensors {ct.__version__}: scale bytes equal {same}/{ours_s.size}")
    assert np.array_equal(ours_s, theirs_s)
    ours = nv.unpack_nibbles(q.weight)
    theirs = nv.unpack_nibbles(packed)
    diff = (ours != theirs).nonzero()
    # every difference must be at an E2M1 rounding boundary (tie) that the two libraries' fp32 arithmetic puts
    # on different sides (or one of them exactly on it): ModelOpt divides by (scale * ws2), compressed-tensors
    # by (scale / global) with global = 2688/amax, and 1/(amax/2688) != 2688/amax in fp32
    d = q.weight_scale.float().repeat_interleave(16, dim=1) * q.weight_scale_2
    scaled = (x / d).abs()
    scaled_ct = (x / (scale.float().repeat_interleave(16, dim=1) / gs)).abs()
    assert torch.equal(d, d0)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    lo, hi = torch.minimum(scaled, scaled_ct), torch.maximum(scaled, scaled_ct)
    straddle = ((lo.unsqueeze(-1) <= ties) & (ties <= hi.unsqueeze(-1))).any(-1)  # [N, K]
    n_ties_total = int(straddle.sum())
    assert len(diff) > 0, "the planted ties should expose at least one reciprocal difference"
    for r, c in diff.tolist():
        assert straddle[r, c], (r, c, scaled[r, c].item(), scaled_ct[r, c].item())
        assert hi[r, c] - lo[r, c] <= 2 * torch.finfo(torch.float32).eps * hi[r, c]  # an ulp apart, not a bug
        assert abs(int(ours[r, c] & 7) - int(theirs[r, c] & 7)) == 1
    print(f"nibbles differing: {len(diff)} of {ours.numel()}, all at ties straddled by the two arithmetics "
          f"({n_ties_total} such elements)")


def test_compressed_tensors_edge_case_differences():
    """Documents where compressed-tensors 0.20 deliberately differs from ModelOpt (and us): block scales of
    all-zero blocks and of blocks whose scale underflows E4M3 (it substitutes fp8 eps 0.125 where ModelOpt
    uses 1.0 / clamps to 2^-9). Elements of those blocks are zero or tiny either way."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", symmetric=True, group_size=16, strategy="tensor_group",
                            scale_dtype=torch.float8_e4m3fn)
    x = torch.tensor([[6.0, -0.0, -0.1, 0.1] + [1.0] * 12 + [0.0] * 16 + [1e-7] + [0.0] * 15])
    gs = generate_gparam(x.min(), x.max())
    scale, _ = calculate_qparams(x.view(1, 3, 16).amin(-1), x.view(1, 3, 16).amax(-1), args, global_scale=gs)
    packed = quantize_and_pack_fp4(x, scale, gs)
    q = nv.quantize(x)
    assert _bytes(scale.to(torch.float8_e4m3fn)).tolist() == [[0x7E, 0x20, 0x20]]
    assert _bytes(q.weight_scale).tolist() == [[0x7E, 0x38, 0x01]]
    assert torch.equal(packed, q.weight)  # element codes agree, incl. -0.0 -> 0 and -0.1 -> 8
