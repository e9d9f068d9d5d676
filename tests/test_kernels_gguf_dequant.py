"""GGUF block dequantization: Triton kernels (CPU interpreter, subprocess) vs gguf-py 0.19.0 ``dequantize``.

Inputs: bytes from gguf-py's own quantizer where it has one (Q8_0, Q5_0, MXFP4); for the dequantize-only types
(Q4_K, Q5_K, Q6_K, NVFP4) random block bytes with finite fp16 super-scales written in (every other byte
pattern is a valid block). Tolerance: bit-exact in fp32 (the kernels follow gguf-py's fp32 operation order).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from kernels_interp import check_case, run_worker, worker_main

QUANTIZABLE = ("Q8_0", "Q5_0", "MXFP4")  # gguf-py 0.19.0 can quantize these
TYPES = ("Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "NVFP4")


def make_bytes(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from dgemma.kernels.gguf_dequant import block_layout

    rng = np.random.default_rng(seed)
    if name in QUANTIZABLE:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if rows > 1:
            w[0, :] = 0.0  # a zero row on purpose (d = 0 blocks)
        return quantize(w, GGMLQuantizationType[name]).reshape(-1)
    qk, nb = block_layout(name)
    n = rows * cols // qk
    raw = rng.integers(0, 256, size=(n, nb), dtype=np.uint8)

    def f16(scale: float) -> np.ndarray:
        return (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)

    if name in ("Q4_K", "Q5_K"):
        raw[:, 0:2], raw[:, 2:4] = f16(0.01), f16(0.01)
    elif name == "Q6_K":
        raw[:, 208:210] = f16(0.01)
    elif name == "NVFP4":
        raw[0, 0:4] = [0x00, 0x7F, 0x01, 0x7E]  # zero, the 0x7F "zero" code, smallest subnormal, max
    return raw.reshape(-1)


def _case(name: str, rows: int, blocks_per_row: int) -> dict:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from dgemma.kernels.gguf_dequant import block_layout, gguf_dequantize

    qk, _ = block_layout(name)
    cols = qk * blocks_per_row
    raw = make_bytes(name, rows, cols)
    ref = dequantize(raw, GGMLQuantizationType[name]).reshape(rows, cols)
    out = gguf_dequantize(torch.from_numpy(raw.copy()), name, (rows, cols), torch.float32).numpy()
    out16 = gguf_dequantize(torch.from_numpy(raw.copy()), name, (rows, cols), torch.float16).numpy()
    return {
        "exact": bool(np.array_equal(out, ref)),
        "max_abs": float(np.abs(out - ref).max()),
        "ref_nonzero": bool((ref != 0).any()),
        "ref_finite": bool(np.isfinite(ref).all()),
        "f16_exact": bool(np.array_equal(out16, ref.astype(np.float16))),
    }


# odd row counts; block counts that leave a partial last program (e.g. 5 x 7 = 35 Q8_0 blocks, 32 per program)
INTERP_CASES = {f"{t}_r{r}_b{b}": (lambda t=t, r=r, b=b: _case(t, r, b)) for t in TYPES for r, b in ((5, 7), (1, 3))}


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    return run_worker(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_interpreter_kernel_matches_gguf_py(interp, name):
    res = check_case(interp, name)
    assert res["ref_nonzero"] and res["ref_finite"]
    assert res["exact"], res
    assert res["f16_exact"], res


@pytest.mark.parametrize("name", TYPES)
def test_twin_is_gguf_py(name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from dgemma.kernels import gguf_dequantize_torch
    from dgemma.kernels.gguf_dequant import block_layout

    qk, _ = block_layout(name)
    raw = make_bytes(name, 3, qk * 2, seed=1)
    out = gguf_dequantize_torch(torch.from_numpy(raw.copy()), name, (3, qk * 2))
    assert np.array_equal(out.numpy(), dequantize(raw, GGMLQuantizationType[name]).reshape(3, qk * 2))


def test_gguf_linear_chunked_on_cpu():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from dgemma.kernels.dispatch import gguf_linear

    raw = make_bytes("Q8_0", 37, 64, seed=2)
    w = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0).reshape(37, 64))
    x = torch.randn(3, 5, 64)
    y = gguf_linear(x, torch.from_numpy(raw.copy()), "Q8_0", 37, 64, scale=0.5, chunk_rows=8)
    assert y.shape == (3, 5, 37)
    assert torch.allclose(y, x @ w.t() * 0.5, rtol=1e-5, atol=1e-5)


def test_input_errors():
    from dgemma.kernels import KernelInputError, gguf_dequantize_torch

    with pytest.raises(KernelInputError, match="not supported"):
        gguf_dequantize_torch(torch.zeros(34, dtype=torch.uint8), "IQ2_XXS", (32,))
    with pytest.raises(KernelInputError, match="bytes"):
        gguf_dequantize_torch(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))
    with pytest.raises(KernelInputError, match="multiple"):
        gguf_dequantize_torch(torch.zeros(34, dtype=torch.uint8), "Q8_0", (2, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_gpu_matches_gguf_py(name):
    from dgemma.kernels import gguf_dequantize, gguf_dequantize_torch
    from dgemma.kernels.gguf_dequant import block_layout

    qk, _ = block_layout(name)
    raw = torch.from_numpy(make_bytes(name, 64, qk * 11).copy())
    ref = gguf_dequantize_torch(raw, name, (64, qk * 11))
    out = gguf_dequantize(raw.cuda(), name, (64, qk * 11), torch.float32).cpu()
    # FMA contraction on the GPU may round d*sc*q - dmin*m differently by an ulp
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    worker_main(INTERP_CASES)
