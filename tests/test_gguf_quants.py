"""GGUF quantizers: our bytes decode identically with gguf-py and with our own dequantizers, errors are sane.

Oracle: `gguf.quants.dequantize` (gguf-py 0.19.0) for every type, NVFP4 included (0.19.0 dequantizes NVFP4 but
cannot quantize it). NVFP4 additionally has a hand-written block decoder here (from the ggml block layout), and
UE4M3 is checked against gguf-py's encoder/decoder.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from dgemma.converter import gguf_quants as gq
from dgemma.runtime.errors import DGemmaError, FormatError

QUANT_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.MXFP4, QT.NVFP4, QT.BF16]
RMSE_TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q5_0, QT.MXFP4, QT.NVFP4]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _quant(x: np.ndarray, t: QT, importance=None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, reconstruction incl. the NVFP4 global scale)."""
    if t == QT.NVFP4:
        g = gq.nvfp4_global_scale(x)
        q = gq.quantize(x, t, importance=importance, global_scale=g)
        scale = g.reshape((-1,) + (1,) * (x.ndim - 1)) if x.ndim == 3 else g
        return q, gq.dequantize(q, t) * scale
    q = gq.quantize(x, t, importance=importance)
    return q, gq.dequantize(q, t)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_importance", [False, True])
def test_dequant_bit_exact_vs_gguf_py(qtype: QT, with_importance: bool) -> None:
    rng = _rng(1)
    x = (rng.standard_t(4, (3, 5, 512)) * 0.02).astype(np.float32)  # odd row counts, 3-D
    x[1, 2] = 0.0  # a zero row
    x[2, 0, :256] = -0.013  # a constant super-block
    imp = rng.lognormal(0, 1, (3, 1, 512)).astype(np.float32) if with_importance else None
    q, _ = _quant(x, qtype, imp)
    assert q.dtype == np.uint8 and q.shape == (3, 5, gq.row_nbytes(qtype, 512))
    ours = gq.dequantize(q, qtype)
    ref = gguf.quants.dequantize(q, qtype)
    assert ours.shape == ref.shape == x.shape
    assert ours.dtype == ref.dtype == np.float32
    bad = ours.view(np.uint32) != ref.view(np.uint32)
    print(f"{qtype.name}: {bad.sum()} of {bad.size} values differ bitwise from gguf-py")
    assert not bad.any()
    assert np.all(ours[1, 2] == 0)  # a zero row stays exactly zero
    flat = gq.dequantize(q.reshape(-1), qtype, shape=x.shape)  # flat buffer + shape, as a GGUF loader has it
    assert np.array_equal(flat.view(np.uint32), ours.view(np.uint32))


def test_delegated_types_are_gguf_py_bytes() -> None:
    """BF16, Q8_0, Q5_1, MXFP4 and Q5_0 without importance go through gguf-py (ggml *_ref): identical bytes."""
    x = (_rng(2).standard_normal((7, 320)) * 0.1).astype(np.float32)
    for t in (QT.BF16, QT.Q8_0, QT.Q5_1, QT.MXFP4, QT.Q5_0):
        assert np.array_equal(gq.quantize(x, t), gguf.quants.quantize(x, t)), t.name
    assert np.array_equal(gq.quantize(x, QT.F16), x.astype(np.float16))
    assert np.array_equal(gq.quantize(torch.from_numpy(x).to(torch.bfloat16), QT.F32), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_nvfp4_handwritten_block() -> None:
    """Second, independent reference for NVFP4: a block built by hand from the ggml layout."""
    codes = np.array([0x38, 0x40, 0x07, 0x7E], dtype=np.uint8)  # 1.0, 2.0, 7/512 (subnormal), 448
    true_scale = np.array([1.0, 2.0, 7 / 512, 448.0], dtype=np.float32)
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    nib = (np.arange(64) * 7) % 16  # element e of sub-block s: nibble (16s + e)*7 mod 16
    qs = np.zeros(32, dtype=np.uint8)
    for s in range(4):
        for j in range(8):
            qs[8 * s + j] = nib[16 * s + j] | (nib[16 * s + 8 + j] << 4)  # low = j, high = j + 8
    block = np.concatenate([codes, qs])[None, :]
    expect = np.array([e2m1[nib[i]] * true_scale[i // 16] for i in range(64)], dtype=np.float32)
    for got in (gq.dequantize(block, QT.NVFP4), gguf.quants.dequantize(block, QT.NVFP4)):
        np.testing.assert_array_equal(got.reshape(64), expect)
    # 0x7F (the E4M3 NaN pattern) decodes to 0 in ggml
    block2 = block.copy()
    block2[0, 0] = 0x7F
    assert np.all(gq.dequantize(block2, QT.NVFP4)[0, :16] == 0)


def test_ue4m3_codec_vs_gguf_py() -> None:
    codes = np.arange(256, dtype=np.uint8)
    ours = gq.ue4m3_decode(codes)
    ref = gguf.quants.NVFP4.ue4m3_to_fp32(codes).astype(np.float32) * 2  # gguf-py returns half (ggml convention)
    assert np.array_equal(ours[codes < 0x80], ref[codes < 0x80])
    v = np.concatenate([np.geomspace(1e-5, 247.9, 20001), [0.0, -1.0, 2**-9, 2**-6 - 1e-6, 0.015625]]).astype(np.float32)
    ggml = gguf.quants.NVFP4.fp32_to_ue4m3(v)
    ours_enc = gq.ue4m3_encode(v)
    # ggml caps the subnormal mantissa at 7, so [7.5/512, 2^-6) encodes as 7/512; we round up to 0x08 (2^-6)
    quirk = (v >= 7.5 / 512) & (v < 2**-6)
    assert np.array_equal(ours_enc[~quirk], ggml[~quirk]), "elsewhere below 256 we encode exactly like ggml"
    assert quirk.any() and np.all(ours_enc[quirk] == 0x08) and np.all(ggml[quirk] == 0x07)
    # [248, 448): ggml saturates to 0x7E (448); we keep the exponent-15 codes 0x78.. and round to nearest
    hi = np.linspace(248, 460, 1001).astype(np.float32)
    dec = gq.ue4m3_decode(gq.ue4m3_encode(hi))
    grid = gq.ue4m3_decode(np.arange(0x77, 0x7F))
    nearest = grid[np.abs(np.minimum(hi, 448)[:, None] - grid[None]).argmin(1)]
    assert np.all(np.abs(dec - np.minimum(hi, 448)) <= np.abs(nearest - np.minimum(hi, 448)) + 1e-3)


def test_e2m1_nearest() -> None:
    v = np.linspace(0, 9, 90001).astype(np.float32)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
    idx = gq._e2m1_index(v)
    assert np.all(np.abs(grid[idx] - v) <= np.abs(grid[None] - v[:, None]).min(1) + 1e-7)


def _rel(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape)
    return float(np.sqrt(((y - x) ** 2 * w).sum() / ((x**2) * w).sum()))


def test_rmse_table() -> None:
    """Relative RMSE per type on Gaussian and Student-t(3) weights, with and without importance weights.
    `plain` = unweighted relative RMSE; `w-RMSE` = importance-weighted (the metric the search targets)."""
    rng = _rng(3)
    C = 1024
    imp = rng.lognormal(0.0, 1.5, C).astype(np.float32)  # per input column, heavy spread like real activations
    data = {
        "gauss": rng.standard_normal((40, C)).astype(np.float32) * 0.02,
        "t3": rng.standard_t(3, (40, C)).astype(np.float32) * 0.02,
    }
    res: dict[tuple[str, QT, bool], tuple[float, float]] = {}
    print(f"\n{'dist':<6}{'type':<7}{'plain':>9}{'w-RMSE':>9}{'plain+imp':>11}{'w-RMSE+imp':>12}")
    for dist, x in data.items():
        for t in RMSE_TYPES:
            row = []
            for use in (False, True):
                _, y = _quant(x, t, imp if use else None)
                res[dist, t, use] = (_rel(x, y), _rel(x, y, imp))
                row += list(res[dist, t, use])
            print(f"{dist:<6}{t.name:<7}" + "".join(f"{v:>10.4f}" for v in row))
    for dist in data:
        r = {t: res[dist, t, False][0] for t in RMSE_TYPES}
        assert r[QT.Q4_K] <= (0.08 if dist == "gauss" else 0.10)
        assert r[QT.Q8_0] < r[QT.Q6_K] < r[QT.Q5_K] < r[QT.Q4_K] < r[QT.MXFP4]
        assert r[QT.NVFP4] < r[QT.MXFP4]
        assert r[QT.Q5_K] < r[QT.Q5_0]
        for t in (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_0, QT.NVFP4):  # importance helps on the weighted metric
            assert res[dist, t, True][1] < 0.97 * res[dist, t, False][1], (dist, t.name)
        for t in (QT.Q8_0, QT.MXFP4):  # gguf-py quantizers: importance is ignored
            assert res[dist, t, True] == res[dist, t, False]
    assert res["gauss", QT.Q4_K, False][0] < 0.075 and res["gauss", QT.Q6_K, False][0] < 0.02


def test_kquant_search_beats_plain_minmax() -> None:
    """The scale search must do better than ggml's simplest rule (scale = range / nmax, no fit)."""
    x = _rng(4).standard_normal((16, 512)).astype(np.float32)
    _, y = _quant(x, QT.Q4_K)
    xs = x.reshape(-1, 32)
    mn = np.minimum(xs.min(1, keepdims=True), 0)
    s = (xs.max(1, keepdims=True) - mn) / 15
    plain = np.clip(np.rint((xs - mn) / s), 0, 15) * s + mn
    assert _rel(x, y) < 0.95 * _rel(x, plain.reshape(x.shape))


def test_row_length_checks() -> None:
    x = np.ones((3, 704), dtype=np.float32)
    for t in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        with pytest.raises(FormatError, match="multiple of the"):
            gq.quantize(x, t)
    with pytest.raises(FormatError):
        gq.quantize(np.ones((2, 48), np.float32), QT.NVFP4, global_scale=1.0)
    for t in (QT.Q8_0, QT.Q5_0, QT.MXFP4):  # 704 = 22 blocks of 32
        assert gq.quantize(x, t).shape == (3, gq.row_nbytes(t, 704))
    assert gq.quantize(x, QT.NVFP4, global_scale=gq.nvfp4_global_scale(x)).shape == (3, 704 // 64 * 36)
    assert issubclass(FormatError, DGemmaError)


def test_bad_inputs_raise_clear_errors() -> None:
    x = np.ones((2, 256), dtype=np.float32)
    with pytest.raises(FormatError, match="NaN or Inf"):
        gq.quantize(np.full((2, 256), np.nan, np.float32), QT.Q4_K)
    with pytest.raises(FormatError, match="broadcast"):
        gq.quantize(x, QT.Q4_K, importance=np.ones(128, np.float32))
    with pytest.raises(FormatError, match=">= 0"):
        gq.quantize(x, QT.Q6_K, importance=-np.ones(256, np.float32))
    with pytest.raises(FormatError, match="global_scale"):
        gq.quantize(x, QT.NVFP4)
    with pytest.raises(FormatError, match="only applies"):
        gq.quantize(x, QT.Q8_0, global_scale=1.0)
    with pytest.raises(FormatError, match="cannot quantize"):
        gq.quantize(x, QT.IQ2_XS)
    with pytest.raises(FormatError, match="bytes"):
        gq.dequantize(np.zeros(100, np.uint8), QT.Q4_K, shape=(1, 256))


def test_nvfp4_per_expert_global_scale() -> None:
    rng = _rng(5)
    x = rng.standard_normal((3, 5, 128)).astype(np.float32) * np.array([1e-3, 0.05, 3.0], np.float32)[:, None, None]
    x[1] = 0.0
    g = gq.nvfp4_global_scale(x)
    assert g.shape == (3,) and g[1] == 1.0  # an all-zero expert gets 1.0
    np.testing.assert_allclose(g[[0, 2]], np.abs(x[[0, 2]]).reshape(2, -1).max(1) / (6 * 448), rtol=1e-6)
    q = gq.quantize(x, QT.NVFP4, global_scale=g)
    y = gq.dequantize(q, QT.NVFP4) * g[:, None, None]
    for e in (0, 2):  # the relative error does not depend on the expert's magnitude
        assert _rel(x[e], y[e]) < 0.1
    assert np.all(y[1] == 0)
    # block scales sit in UE4M3's normal range thanks to the global scale; without it small experts collapse
    no_global = gq.dequantize(gq.quantize(x, QT.NVFP4, global_scale=1.0), QT.NVFP4)
    assert _rel(x[0], no_global[0]) > 2 * _rel(x[0], y[0])


def test_importance_shapes() -> None:
    rng = _rng(6)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    per_expert = rng.lognormal(0, 1, (2, 1, 256)).astype(np.float32)
    q = gq.quantize(x, QT.Q4_K, importance=per_expert)
    # same bytes as quantizing each expert alone with its own importance
    for e in range(2):
        assert np.array_equal(q[e], gq.quantize(x[e], QT.Q4_K, importance=per_expert[e, 0]))
    assert np.array_equal(q, gq.quantize(x, QT.Q4_K, importance=per_expert[:, 0]))  # [E, K] calibration layout
    zero_cols = np.ones(256, np.float32)
    zero_cols[:32] = 0.0  # a fully unimportant sub-block still gets finite, sane values
    y = gq.dequantize(gq.quantize(x, QT.Q4_K, importance=zero_cols), QT.Q4_K)
    assert np.isfinite(y).all() and _rel(x[..., 32:], y[..., 32:]) < 0.1


def test_torch_bf16_input_and_sizes() -> None:
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    q = gq.quantize(x, QT.Q6_K)
    assert q.shape == (5, 2 * 210)
    assert gq.tensor_nbytes(QT.Q6_K, (5, 512)) == q.nbytes
    y = gq.dequantize(q, QT.Q6_K)
    assert _rel(x.float().numpy(), y) < 0.02


def test_gguf_writer_reader_roundtrip(tmp_path) -> None:
    """Our arrays go into gguf-py's GGUFWriter as raw blocks and come back from GGUFReader with ggml shapes."""
    rng = _rng(8)
    gate_up = torch.from_numpy((rng.standard_normal((3, 6, 256)) * 0.05).astype(np.float32)).to(torch.bfloat16)
    gate = gate_up[:, :3, :]  # a non-contiguous expert half, as gguf_names hands it over
    g = gq.nvfp4_global_scale(gate)
    arrays = {
        "a.weight": (gq.quantize(gate, QT.Q4_K), QT.Q4_K),
        "b.weight": (gq.quantize(gate, QT.NVFP4, global_scale=g), QT.NVFP4),
        "c.weight": (gq.quantize(gate[0], QT.BF16), QT.BF16),
        "d.weight": (gq.quantize(gate[1], QT.Q6_K), QT.Q6_K),
    }
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), arch="diffusion-gemma")
    for name, (arr, t) in arrays.items():
        w.add_tensor(name, arr, raw_dtype=t)
    w.add_tensor("b.scale", g)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, (arr, t) in arrays.items():
        rt = r[name]
        assert rt.tensor_type == t
        assert tuple(int(v) for v in rt.shape) == tuple(reversed(gq.dequantize(arr, t).shape))  # ggml ne order
        assert np.array_equal(np.asarray(rt.data), arr)
    np.testing.assert_array_equal(np.asarray(r["b.scale"].data), g)
    y = gq.dequantize(np.asarray(r["b.weight"].data), QT.NVFP4) * np.asarray(r["b.scale"].data)[:, None, None]
    assert _rel(gate.float().numpy(), y) < 0.1
