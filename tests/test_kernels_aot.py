"""Every shipped Triton kernel compiles ahead of time for sm_89 (RTX 4090), sm_90 (H100) and sm_120 (RTX 5090) on
this CPU-only machine (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), at the real 26B
shapes and the tile sizes the wrappers pick there; ptxas -v (Triton's bundled ptxas, Triton's flags) reports no
spills; kernels with a tl.dot hold tensor-core mma/wgmma; the streaming kernels use 16-byte global loads.
``scripts/kernel_report.py`` prints the same data as a table.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from dgemma.kernels.aot import TARGETS, analyze, kernel_specs  # noqa: E402

SPECS = {s.name: s for s in kernel_specs()}


def test_every_kernel_has_a_spec():
    """Each @triton.jit kernel (not helper) of the package appears in at least one spec."""
    import importlib

    kernels = set()
    for mod in ("_nvfp4_gemm_triton", "_fused_moe_triton", "_sampler_triton", "_rmsnorm_triton", "_gguf_dequant_triton"):
        m = importlib.import_module(f"dgemma.kernels.{mod}")
        kernels |= {(mod, n) for n, v in vars(m).items() if n.endswith("_kernel") and hasattr(v, "fn")}
    covered = {(s.module, s.kernel) for s in SPECS.values()}
    assert kernels and kernels <= covered, kernels - covered


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_without_spills(name, cc):
    rep = analyze(SPECS[name], cc)
    print(rep)
    assert rep.ok, rep.problems
    assert rep.registers > 0 and rep.spill_stores == 0 and rep.spill_loads == 0
