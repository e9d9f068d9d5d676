"""NVFP4 W4A16 GEMM: Triton kernel (CPU interpreter, subprocess) vs torch twin; twin vs an independent decode.

BLOCK_K >= 128 tiles read the packed bytes as int32 words, narrower ones as bytes: cases cover both, with and
without a masked K tail.

Tolerances (errors relative to the reference's max |value| / RMS):
- fp32 activations + fp32 dot operands: max 1e-5, RMS 1e-6 (only fp32 summation order differs);
- fp16 activations + fp16 dot: max 2e-3, RMS 5e-4 (the output is rounded to fp16 once: 2^-11 = 4.9e-4 rel);
- bf16 activations with fp32 dot (interpreter): max 1e-2, RMS 8e-3: Triton 3.9's interpreter casts fp32 -> bf16 by
  truncation, not round-to-nearest (measured: 100 % of casts equal truncation, 42 % equal RNE), so the output
  differs from the twin's RNE cast by up to one bf16 ulp (2^-7 relative);
- twin vs float64 decode: max 1e-6 (fp32 products/sums).
"""
from __future__ import annotations

import sys

import pytest
import torch

from kernels_interp import check_case, rel_errors, run_worker, worker_main


def rand_nvfp4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed bytes (every E2M1 code incl. -0), positive e4m3 block scales, a global scale."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand((n, k // 16), generator=gen) * 3.0 + 0.02).to(torch.float8_e4m3fn)
    s2 = (torch.rand((), generator=gen) + 0.05).to(torch.float32)
    return packed, scales, s2


def _case(m: int, n: int, k: int, act: torch.dtype, dot: torch.dtype, block_sizes=None, seed: int = 0) -> dict:
    from dgemma.kernels import nvfp4_gemm as nv

    gen = torch.Generator().manual_seed(seed)
    w, s, s2 = rand_nvfp4(n, k, gen)
    x = torch.randn((m, k), generator=gen).to(act)
    y = nv.nvfp4_linear(x, w, s, s2, dot_dtype=dot, block_sizes=block_sizes)
    ref = nv.nvfp4_linear_torch(x, w, s, s2)
    res = rel_errors(y, ref)
    res["dtype_ok"] = y.dtype == act and tuple(y.shape) == (m, n)
    return res


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
INTERP_CASES = {
    "m1_n48_k64_f32": lambda: _case(1, 48, 64, F32, F32),
    "m17_n80_k96_f32_maskedK": lambda: _case(17, 80, 96, F32, F32, block_sizes=(16, 32, 64)),  # K % BK != 0
    "m33_n64_k256_f16": lambda: _case(33, 64, 256, F16, F16),
    "m100_n40_k160_f32": lambda: _case(100, 40, 160, F32, F32),
    "m17_n48_k128_bf16act_f32dot": lambda: _case(17, 48, 128, BF16, F32),
    "m3x7_batched_f32": lambda: _batched_case(),
    "m5_n32_k192_f32_maskedK_words": lambda: _case(5, 32, 192, F32, F32, block_sizes=(16, 32, 128)),
}
TOL = {
    "m1_n48_k64_f32": (1e-5, 1e-6),
    "m17_n80_k96_f32_maskedK": (1e-5, 1e-6),
    "m33_n64_k256_f16": (2e-3, 5e-4),
    "m100_n40_k160_f32": (1e-5, 1e-6),
    "m17_n48_k128_bf16act_f32dot": (1e-2, 8e-3),
    "m3x7_batched_f32": (1e-5, 1e-6),
    "m5_n32_k192_f32_maskedK_words": (1e-5, 1e-6),
}


def _batched_case() -> dict:
    """Leading batch dims [3, 7, K] and a non-contiguous (transposed-batch) input."""
    from dgemma.kernels import nvfp4_gemm as nv

    gen = torch.Generator().manual_seed(5)
    w, s, s2 = rand_nvfp4(32, 64, gen)
    x = torch.randn((7, 3, 64), generator=gen).transpose(0, 1)  # [3, 7, 64], non-contiguous
    y = nv.nvfp4_linear(x, w, s, s2)
    ref = nv.nvfp4_linear_torch(x, w, s, s2)
    res = rel_errors(y, ref)
    res["dtype_ok"] = tuple(y.shape) == (3, 7, 32)
    return res


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    return run_worker(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_interpreter_kernel_matches_twin(interp, name):
    res = check_case(interp, name)
    max_tol, rms_tol = TOL[name]
    assert res["finite"] and res["nonzero_ref"] and res["dtype_ok"]
    assert res["max_rel"] <= max_tol, res
    assert res["rms_rel"] <= rms_tol, res


# ---- twin against an independent reference ------------------------------------------------------------------


def _e2m1_formula(code: int) -> float:
    """E2M1 by the format definition (1 sign, 2 exponent bits bias 1, 1 mantissa bit), not a table."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1.0 + m / 2)
    return sign * mag


def _dequant_f64(packed: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    n, kh = packed.shape
    w = torch.empty((n, kh * 2), dtype=torch.float64)
    table = [_e2m1_formula(c) for c in range(16)]
    for i in range(n):
        for j in range(kh):
            b = int(packed[i, j])
            w[i, 2 * j] = table[b & 0xF]
            w[i, 2 * j + 1] = table[b >> 4]
    return w * scales.to(torch.float64).repeat_interleave(16, dim=1) * float(s2)


def test_e2m1_table_matches_definition():
    from dgemma.kernels import e2m1_values

    assert e2m1_values().tolist() == [_e2m1_formula(c) for c in range(16)]


def test_twin_matches_float64_decode():
    from dgemma.kernels import nvfp4_linear_torch

    gen = torch.Generator().manual_seed(1)
    w, s, s2 = rand_nvfp4(24, 48, gen)
    x = torch.randn((5, 48), generator=gen)
    ref = x.double() @ _dequant_f64(w, s, s2).t()
    err = rel_errors(nvfp4_linear_torch(x, w, s, s2), ref)
    print(err)
    assert err["max_rel"] < 1e-6


def test_known_bytes_low_nibble_first():
    """byte 0x21: element 0 = code 1 (0.5), element 1 = code 2 (1.0); 0xF8: -0.0 then -6."""
    from dgemma.kernels import dequantize_nvfp4

    w = torch.tensor([[0x21, 0xF8] + [0] * 6], dtype=torch.uint8)
    s = torch.tensor([[2.0]], dtype=torch.float32).to(torch.float8_e4m3fn)
    d = dequantize_nvfp4(w, s, torch.tensor(0.5))
    assert d[0, :4].tolist() == [0.5, 1.0, -0.0, -6.0]
    x = torch.zeros(1, 16)
    x[0, 3] = 1.0
    from dgemma.kernels import nvfp4_linear_torch

    assert nvfp4_linear_torch(x, w, s, torch.tensor(0.5)).item() == -6.0


def test_twin_row_chunking(monkeypatch):
    from dgemma.kernels import nvfp4_gemm as nv

    gen = torch.Generator().manual_seed(2)
    w, s, s2 = rand_nvfp4(37, 32, gen)
    x = torch.randn((3, 32), generator=gen)
    full = nv.nvfp4_linear_torch(x, w, s, s2)
    monkeypatch.setattr(nv, "_TWIN_ROW_CHUNK", 8)
    assert torch.equal(nv.nvfp4_linear_torch(x, w, s, s2), full)


def test_input_errors():
    from dgemma.kernels import KernelInputError, nvfp4_linear_torch
    from dgemma.runtime.errors import DGemmaError

    gen = torch.Generator().manual_seed(3)
    w, s, s2 = rand_nvfp4(8, 32, gen)
    x = torch.randn(2, 32)
    with pytest.raises(KernelInputError, match="in_features"):
        nvfp4_linear_torch(torch.randn(2, 48), w, s, s2)
    with pytest.raises(KernelInputError, match="weight_scale"):
        nvfp4_linear_torch(x, w, s.float(), s2)
    with pytest.raises(KernelInputError, match="shape"):
        nvfp4_linear_torch(x, w, s[:, :1], s2)
    with pytest.raises(DGemmaError):
        nvfp4_linear_torch(x.long(), w, s, s2)


def test_triton_wrapper_refuses_cpu_tensors():
    pytest.importorskip("triton")
    from dgemma.kernels import KernelUnavailableError, nvfp4_linear

    gen = torch.Generator().manual_seed(4)
    w, s, s2 = rand_nvfp4(16, 32, gen)
    with pytest.raises(KernelUnavailableError):
        nvfp4_linear(torch.randn(2, 32), w, s, s2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_matches_twin():
    from dgemma.kernels import nvfp4_linear, nvfp4_linear_torch

    gen = torch.Generator().manual_seed(6)
    for m in (1, 17, 256):
        w, s, s2 = (t.cuda() for t in rand_nvfp4(704, 2816, gen))
        x = torch.randn((m, 2816), generator=gen).to(torch.bfloat16).cuda()
        err = rel_errors(nvfp4_linear(x, w, s, s2), nvfp4_linear_torch(x, w, s, s2))
        print(m, err)
        assert err["max_rel"] < 1e-2 and err["rms_rel"] < 4e-3


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    worker_main(INTERP_CASES)
