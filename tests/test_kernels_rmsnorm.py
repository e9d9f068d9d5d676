"""RMSNorm: Triton kernel (CPU interpreter, subprocess) vs twin; twin vs HF ``DiffusionGemmaRMSNorm``.

Tolerances: fp32 max rel 1e-6 (rsqrt vs pow(-0.5): an ulp or two); fp16 max rel 1e-3 (one fp16 ulp of output
where rsqrt and pow round differently). Twin vs HF: bit-exact (same torch ops).
"""
from __future__ import annotations

import sys

import pytest
import torch

from kernels_interp import check_case, rel_errors, run_worker, worker_main


def _case(shape, dtype, weight=True, residual=False, seed=0) -> dict:
    from dgemma.kernels import rmsnorm_residual_torch, rmsnorm_torch
    from dgemma.kernels.rmsnorm import rmsnorm, rmsnorm_residual

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    w = (torch.randn((shape[-1],), generator=gen) + 1.0) if weight else None
    if residual:
        r = torch.randn(shape, generator=gen).to(dtype)
        y, ref = rmsnorm_residual(x, r, w), rmsnorm_residual_torch(x, r, w)
    else:
        y, ref = rmsnorm(x, w), rmsnorm_torch(x, w)
    res = rel_errors(y, ref)
    res["dtype_ok"] = y.dtype == dtype and y.shape == x.shape
    return res


F32, F16 = torch.float32, torch.float16
INTERP_CASES = {
    "r1_d96_f32": lambda: _case((1, 96), F32),
    "r17_d2816_f16": lambda: _case((17, 2816), F16),
    "r33_d100_f32_noscale": lambda: _case((33, 100), F32, weight=False),
    "r3x5_d48_f32_residual": lambda: _case((3, 5, 48), F32, residual=True),
    "r17_d256_f16_residual_noscale": lambda: _case((17, 256), F16, weight=False, residual=True),
}


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    return run_worker(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_interpreter_kernel_matches_twin(interp, name):
    res = check_case(interp, name)
    assert res["finite"] and res["nonzero_ref"] and res["dtype_ok"]
    assert res["max_rel"] <= (1e-3 if "f16" in name else 1e-6), res


@pytest.mark.parametrize("with_scale", [True, False])
def test_twin_equals_hf(with_scale):
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaRMSNorm

    from dgemma.kernels import rmsnorm_residual_torch, rmsnorm_torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn((4, 7, 64), generator=gen).to(torch.bfloat16)
    hf = DiffusionGemmaRMSNorm(64, eps=1e-6, with_scale=with_scale)
    w = None
    if with_scale:
        with torch.no_grad():
            hf.weight.copy_(torch.randn((64,), generator=gen))
        w = hf.weight.detach()
    with torch.no_grad():
        ref = hf(x)
    assert torch.equal(rmsnorm_torch(x, w, 1e-6), ref)
    r = torch.randn((4, 7, 64), generator=gen).to(torch.bfloat16)
    assert torch.equal(rmsnorm_residual_torch(x, r, w, 1e-6), r + ref)


def test_input_errors():
    from dgemma.kernels import KernelInputError, rmsnorm_residual_torch, rmsnorm_torch

    x = torch.randn(3, 8)
    with pytest.raises(KernelInputError, match="weight"):
        rmsnorm_torch(x, torch.randn(9))
    with pytest.raises(KernelInputError, match="residual"):
        rmsnorm_residual_torch(x, torch.randn(3, 9), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_matches_twin():
    from dgemma.kernels import rmsnorm_residual_torch
    from dgemma.kernels.rmsnorm import rmsnorm_residual

    x = torch.randn((256, 2816), device="cuda").to(torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(2816, device="cuda").to(torch.bfloat16)
    err = rel_errors(rmsnorm_residual(x, r, w), rmsnorm_residual_torch(x, r, w))
    assert err["max_rel"] < 8e-3, err


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    worker_main(INTERP_CASES)
