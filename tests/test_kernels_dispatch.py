"""Dispatch: CPU tensors get the torch twins, CUDA tensors the Triton kernels; decided by the device only."""
from __future__ import annotations

import pytest
import torch


def test_cpu_uses_twins():
    import importlib

    from dgemma.kernels import dispatch, nvfp4_gemm, sampler

    fused_moe = importlib.import_module("dgemma.kernels.fused_moe")
    rmsnorm = importlib.import_module("dgemma.kernels.rmsnorm")

    assert not dispatch.use_triton("cpu") and dispatch.backend_name(torch.device("cpu")) == "torch"
    ops = dispatch.kernel_ops("cpu")
    assert ops.backend == "torch"
    assert ops.nvfp4_linear is nvfp4_gemm.nvfp4_linear_torch
    assert ops.fused_moe is fused_moe.fused_moe_torch
    assert ops.sample_logits is sampler.sample_logits_torch
    assert ops.sc_soft_embedding is sampler.sc_soft_embedding_torch
    assert ops.rmsnorm is rmsnorm.rmsnorm_torch and ops.rmsnorm_residual is rmsnorm.rmsnorm_residual_torch


def test_cuda_device_selects_triton_when_installed():
    from dgemma.kernels import HAVE_TRITON, dispatch, nvfp4_gemm

    assert dispatch.use_triton(torch.device("cuda", 0)) == HAVE_TRITON  # no GPU needed to decide
    if HAVE_TRITON:
        assert dispatch.kernel_ops("cuda").nvfp4_linear is nvfp4_gemm.nvfp4_linear


def test_environment_does_not_switch_backends(monkeypatch):
    from dgemma.kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DGEMMA_BACKEND", "triton")
    assert dispatch.kernel_ops("cpu").backend == "torch"


def test_dispatch_functions_on_cpu_equal_twins():
    from dgemma.kernels import dispatch, nvfp4_linear_torch, rmsnorm_torch, sample_logits_torch

    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=gen)
    s = (torch.rand((8, 2), generator=gen) + 0.1).to(torch.float8_e4m3fn)
    s2 = torch.tensor(0.3)
    x = torch.randn((3, 32), generator=gen)
    assert torch.equal(dispatch.nvfp4_linear(x, w, s, s2), nvfp4_linear_torch(x, w, s, s2))
    assert torch.equal(dispatch.rmsnorm(x, None), rmsnorm_torch(x, None))
    lg, u = torch.randn((4, 50), generator=gen), torch.rand((4,), generator=gen)
    a, b = dispatch.sample_logits(lg, 0.7, u), sample_logits_torch(lg, 0.7, u)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_package_imports_without_triton(tmp_path):
    """With triton unimportable, dgemma.kernels still imports and the twins run (subprocess, import blocked)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'): raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "import torch, dgemma.kernels as k\n"
        "assert not k.HAVE_TRITON and k.kernel_ops('cuda').backend == 'torch'\n"
        "x = torch.randn(2, 16)\n"
        "print(k.rmsnorm_torch(x, None).shape)\n"
        "try:\n"
        "    k.rmsnorm_residual(x, x, None)\n"
        "except k.KernelUnavailableError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused:" in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_ops_are_triton():
    from dgemma.kernels import dispatch

    assert dispatch.kernel_ops("cuda").backend == "triton"
