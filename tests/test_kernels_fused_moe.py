"""Fused MoE: Triton kernels (CPU interpreter, subprocess) vs the torch twin; twin vs HF's expert module.

Tolerances (relative to the reference's max |value| / RMS):
- fp32 activations / fp32 dot: max 1e-5, RMS 1e-6 (summation order only);
- fp16 activations / fp16 dot: max 2e-3, RMS 5e-4 (gelu(g)*u is stored in fp16 by both; a different fp32
  summation order can flip that rounding, which the second GEMM propagates; measured 4e-6);
- twin vs HF ``DiffusionGemmaTextExperts`` (fp32, dequantized weights): max 1e-5.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from kernels_interp import check_case, rel_errors, run_worker, worker_main


def rand_experts(e: int, h: int, i: int, gen: torch.Generator, fmt: str = "nvfp4", dtype=torch.float32):
    from dgemma.kernels import DenseExperts, NVFP4Experts

    if fmt == "dense":
        return DenseExperts((torch.randn((e, 2 * i, h), generator=gen) / h**0.5).to(dtype),
                            (torch.randn((e, h, i), generator=gen) / i**0.5).to(dtype))  # fmt: skip

    def one(n, k):
        packed = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=gen)
        scales = (torch.rand((e, n, k // 16), generator=gen) * 2.0 + 0.05).to(torch.float8_e4m3fn)
        return packed, scales, (torch.rand((e,), generator=gen) * 0.1 + 0.02)

    return NVFP4Experts(*one(2 * i, h), *one(h, i))


def rand_routing(t: int, e: int, topk: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-like top-k: softmax over random logits, top-k, renormalized, times a per-expert scale."""
    probs = torch.randn((t, e), generator=gen).softmax(-1)
    w, ids = torch.topk(probs, topk, dim=-1)
    w = w / w.sum(-1, keepdim=True) * (torch.rand((e,), generator=gen) + 0.5)[ids]
    return w, ids


def _case(t, e, topk, h, i, act, fmt="nvfp4", skew=False, block_m=None, seed=0) -> dict:
    from dgemma.kernels import fused_moe_torch
    from dgemma.kernels.fused_moe import fused_moe

    gen = torch.Generator().manual_seed(seed)
    ex = rand_experts(e, h, i, gen, fmt, dtype=act)
    w, ids = rand_routing(t, e, topk, gen)
    if skew:  # every token's first choice is expert 1: one expert with many blocks
        ids[:, 0] = 1
        ids[:, 1:] = (ids[:, 1:] % (e - 2)) + 2
    x = torch.randn((t, h), generator=gen).to(act)
    y = fused_moe(x, w, ids, ex, dot_dtype=act, block_m=block_m)
    ref = fused_moe_torch(x, w, ids, ex)
    res = rel_errors(y, ref)
    res["dtype_ok"] = y.dtype == act and tuple(y.shape) == (t, h)
    return res


F32, F16 = torch.float32, torch.float16
INTERP_CASES = {
    "t1_e4_k2_nvfp4_f32": lambda: _case(1, 4, 2, 64, 32, F32),
    "t17_e8_k3_nvfp4_f32_maskedN": lambda: _case(17, 8, 3, 96, 48, F32),
    "t33_e6_k2_nvfp4_f16": lambda: _case(33, 6, 2, 64, 80, F16),
    "t100_e8_k2_dense_f32_bm32": lambda: _case(100, 8, 2, 32, 32, F32, fmt="dense", block_m=32),
    "t17_e5_k2_dense_f16": lambda: _case(17, 5, 2, 48, 32, F16, fmt="dense"),
    "t40_e6_k2_nvfp4_f32_skewed": lambda: _case(40, 6, 2, 32, 32, F32, skew=True),
    "t9_e4_k2_nvfp4_f32_h128_words": lambda: _case(9, 4, 2, 128, 32, F32),  # gate_up BLOCK_K 128: int32 words
}
TOL = {name: ((2e-3, 5e-4) if "f16" in name else (1e-5, 1e-6)) for name in INTERP_CASES}


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    return run_worker(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_interpreter_kernels_match_twin(interp, name):
    res = check_case(interp, name)
    max_tol, rms_tol = TOL[name]
    assert res["finite"] and res["nonzero_ref"] and res["dtype_ok"]
    assert res["max_rel"] <= max_tol, res
    assert res["rms_rel"] <= rms_tol, res


# ---- align ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t,e,topk,bm", [(1, 4, 2, 16), (17, 8, 3, 16), (33, 128, 8, 16), (9, 3, 3, 4)])
def test_align_block_size_contract(t, e, topk, bm):
    from dgemma.kernels import moe_align_block_size

    gen = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(t)])
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, e, bm)
    p = t * topk
    n_used = int(num_post)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=e)
    assert n_used == int(((counts + bm - 1) // bm * bm).sum())
    assert sorted_ids.numel() % bm == 0 and expert_ids.numel() == sorted_ids.numel() // bm
    assert sorted_ids.numel() >= n_used
    valid = sorted_ids[:n_used]
    real = valid[valid < p]
    assert sorted(real.tolist()) == list(range(p))  # every pair exactly once
    assert bool((sorted_ids[n_used:] == p).all())  # tail is padding
    for blk in range(sorted_ids.numel() // bm):
        ids_in = sorted_ids[blk * bm : (blk + 1) * bm]
        pairs = ids_in[ids_in < p]
        if blk * bm >= n_used:
            assert expert_ids[blk] == -1
        else:
            assert expert_ids[blk] >= 0
            assert bool((flat[pairs.long()] == expert_ids[blk]).all())
            assert pairs.tolist() == sorted(pairs.tolist())


# ---- twin vs HF -------------------------------------------------------------------------------------------------


def _hf_experts(dense_gate_up: torch.Tensor, dense_down: torch.Tensor):
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    e, two_i, h = dense_gate_up.shape
    cfg = SimpleNamespace(num_experts=e, hidden_size=h, moe_intermediate_size=two_i // 2,
                          hidden_activation="gelu_pytorch_tanh", _experts_implementation="eager")  # fmt: skip
    mod = DiffusionGemmaTextExperts(cfg)
    with torch.no_grad():
        mod.gate_up_proj.copy_(dense_gate_up)
        mod.down_proj.copy_(dense_down)
    return mod


@pytest.mark.parametrize("fmt", ["dense", "nvfp4"])
def test_twin_matches_hf_experts(fmt):
    from dgemma.kernels import dequantize_nvfp4, fused_moe_torch

    gen = torch.Generator().manual_seed(11)
    ex = rand_experts(6, 48, 32, gen, fmt)
    w, ids = rand_routing(13, 6, 3, gen)
    x = torch.randn((13, 48), generator=gen)
    if fmt == "dense":
        gu, dn = ex.gate_up, ex.down
    else:
        gu = dequantize_nvfp4(ex.gate_up, ex.gate_up_scale, ex.gate_up_scale_2)
        dn = dequantize_nvfp4(ex.down, ex.down_scale, ex.down_scale_2)
    with torch.no_grad():
        ref = _hf_experts(gu, dn)(x, ids, w)
    err = rel_errors(fused_moe_torch(x, w, ids, ex), ref)
    print(fmt, err)
    assert err["max_rel"] < 1e-5 and err["nonzero_ref"]


def test_input_errors():
    from dgemma.kernels import DenseExperts, KernelInputError, NVFP4Experts, fused_moe_torch

    gen = torch.Generator().manual_seed(12)
    ex = rand_experts(4, 32, 16, gen)
    w, ids = rand_routing(3, 4, 2, gen)
    with pytest.raises(KernelInputError, match="hidden"):
        fused_moe_torch(torch.randn(3, 48), w, ids, ex)
    with pytest.raises(KernelInputError, match="topk_ids"):
        fused_moe_torch(torch.randn(3, 32), w, ids + 4, ex)
    with pytest.raises(KernelInputError, match="topk_weights"):
        fused_moe_torch(torch.randn(3, 32), w[:, :1], ids, ex)
    with pytest.raises(KernelInputError):
        NVFP4Experts(ex.gate_up, ex.gate_up_scale, ex.gate_up_scale_2, ex.down[:, :16], ex.down_scale[:, :16],
                     ex.down_scale_2)  # fmt: skip
    with pytest.raises(KernelInputError):
        DenseExperts(torch.randn(2, 8, 16), torch.randn(2, 16, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_matches_twin_and_cuda_graph():
    from dgemma.kernels import fused_moe_torch
    from dgemma.kernels.fused_moe import fused_moe

    gen = torch.Generator().manual_seed(13)
    ex = rand_experts(16, 256, 128, gen)
    ex = type(ex)(*(getattr(ex, f).cuda() for f in ex.__dataclass_fields__))
    w, ids = rand_routing(33, 16, 4, gen)
    w, ids = w.cuda(), ids.cuda()
    x = torch.randn((33, 256), generator=gen).to(torch.bfloat16).cuda()
    y = fused_moe(x, w, ids, ex)
    err = rel_errors(y, fused_moe_torch(x, w, ids, ex))
    assert err["max_rel"] < 2e-2 and err["rms_rel"] < 5e-3, err
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = fused_moe(x, w, ids, ex)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y)


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    worker_main(INTERP_CASES)
