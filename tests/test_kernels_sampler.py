"""Fused sampler and SC soft embedding: Triton kernels (CPU interpreter, subprocess) vs torch twins; twins vs
torch.distributions / torch.multinomial / HF's formula.

Tolerances:
- entropy and logsumexp: absolute 1e-4 nats (fp32 sums over V, different order); argmax: exact;
- samples (same uniforms): >= 99 % identical to the twin (they can differ only where u * sum lands within
  rounding of a CDF step); in distribution vs torch.multinomial: two-sample chi-square p > 1e-3, fixed seeds;
- processed logits written by the kernel: exact in fp32 (correctly rounded division, like torch); with the
  in-kernel softcap 2e-5 absolute at |z| <= 50 (tanh via exp, a few ulp from torch.tanh);
- soft embedding: max rel 1e-5 (fp32 operands) / 2e-3 (fp16: output rounding).
"""
from __future__ import annotations

import sys

import pytest
import torch

from kernels_interp import check_case, rel_errors, run_worker, worker_main


def chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Homogeneity chi-square of two count vectors over the categories where either is non-zero -> (stat, p)."""
    a, b = a.double(), b.double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    tot = a + b
    ea, eb = tot * a.sum() / tot.sum(), tot * b.sum() / tot.sum()
    stat = (((a - ea) ** 2) / ea + ((b - eb) ** 2) / eb).sum()
    dof = keep.sum().item() - 1
    p = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2).item()
    return stat.item(), p


def _sampler_case(m, v, dtype, t=0.7, softcap=None, scale=3.0, block_v=None, num_splits=None, ties=False,
                  neg_inf=False, seed=0) -> dict:  # fmt: skip
    from dgemma.kernels import sample_logits, sample_logits_torch

    gen = torch.Generator().manual_seed(seed)
    if ties:  # small integers: many exact ties across tiles and ranges
        logits = torch.randint(0, 4, (m, v), generator=gen).to(torch.float32)
    else:
        logits = torch.randn((m, v), generator=gen) * scale
    if neg_inf:  # masked vocabulary entries
        logits[torch.rand((m, v), generator=gen) < 0.3] = -float("inf")
    logits = logits.to(dtype)
    u = torch.rand((m,), generator=gen)
    proc = torch.empty((m, v), dtype=torch.float32)
    o = sample_logits(logits, t, u, softcap=softcap, processed_out=proc, block_v=block_v, num_splits=num_splits)
    proc_ref = torch.empty_like(proc)
    r = sample_logits_torch(logits, t, u, softcap=softcap, processed_out=proc_ref)
    live = torch.isfinite(logits.float())
    return {
        "ent_abs": (o.entropy - r.entropy).abs().max().item(),
        "lse_abs": (o.logsumexp - r.logsumexp).abs().max().item(),
        "argmax_equal": bool(torch.equal(o.argmax, r.argmax)),
        "sample_agree": (o.sample == r.sample).double().mean().item(),
        "samples_live": bool(live.gather(1, o.sample[:, None]).all().item()),
        "processed_abs": (proc - proc_ref).abs().nan_to_num(0.0).max().item(),
        "ent_finite": bool(torch.isfinite(o.entropy).all().item()),
    }


def _chi2_case() -> dict:
    """400 rows of one 10-way distribution through the kernel vs 20000 torch.multinomial draws, fixed seeds.

    (Interpreter programs cost ~15 ms each, so the kernel side stays small; the large reference sample keeps
    the test's noise mostly on the kernel side.)"""
    from dgemma.kernels import sample_logits

    gen = torch.Generator().manual_seed(42)
    row = torch.randn((10,), generator=gen) * 0.8
    n = 400
    logits = row.expand(n, 10).contiguous()
    u = torch.rand((n,), generator=gen)
    o = sample_logits(logits, 0.9, u)
    probs = torch.softmax(row / 0.9, -1)
    ref = torch.multinomial(probs, 20000, replacement=True, generator=torch.Generator().manual_seed(7))
    a, b = torch.bincount(o.sample, minlength=10), torch.bincount(ref, minlength=10)
    stat, p = chi2_two_sample(a, b)
    return {"chi2": stat, "p": p, "counts_kernel": a.tolist(), "counts_multinomial": b.tolist()}


def _soft_case(m, v, h, dtype, block_sizes=None, num_splits=None, seed=0) -> dict:
    from dgemma.kernels import sc_soft_embedding, sc_soft_embedding_torch

    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn((m, v), generator=gen) * 4).to(dtype)
    emb = torch.randn((v, h), generator=gen).to(dtype)
    y = sc_soft_embedding(logits, emb, 53.066, dot_dtype=dtype, block_sizes=block_sizes, num_splits=num_splits)
    ref = sc_soft_embedding_torch(logits, emb, 53.066)
    res = rel_errors(y, ref)
    res["dtype_ok"] = y.dtype == dtype and tuple(y.shape) == (m, h)
    return res


F32, F16 = torch.float32, torch.float16
INTERP_CASES = {
    "s_m1_v1000_f32": lambda: _sampler_case(1, 1000, F32),
    "s_m17_v333_f32_softcap": lambda: _sampler_case(17, 333, F32, softcap=30.0, scale=40.0, t=0.8),
    "s_m33_v700_f16_bv128_3splits": lambda: _sampler_case(33, 700, F16, block_v=128, num_splits=3),
    "s_m100_v97_f32_1split": lambda: _sampler_case(100, 97, F32, t=1.0, num_splits=1),
    "s_m5_v300_ties": lambda: _sampler_case(5, 300, F32, ties=True, num_splits=4),
    "s_m9_v256_neg_inf": lambda: _sampler_case(9, 256, F32, neg_inf=True, num_splits=2),
    "s_chi2_vs_multinomial": _chi2_case,
    "sc_m1_v200_h48_f32_3splits": lambda: _soft_case(1, 200, 48, F32, block_sizes=(16, 32, 32), num_splits=3),
    "sc_m17_v333_h40_f16": lambda: _soft_case(17, 333, 40, F16),
    "sc_m33_v128_h64_f32": lambda: _soft_case(33, 128, 64, F32),
}


@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    return run_worker(__file__)


@pytest.mark.parametrize("name", [n for n in INTERP_CASES if n.startswith("s_m")])
def test_interpreter_sampler_matches_twin(interp, name):
    res = check_case(interp, name)
    assert res["ent_finite"] and res["samples_live"]
    assert res["ent_abs"] <= 1e-4 and res["lse_abs"] <= 1e-4, res
    assert res["argmax_equal"], res
    assert res["sample_agree"] >= 0.99, res
    # exact without softcap (correctly rounded division, as torch); the in-kernel tanh is exp-based (few ulp)
    assert res["processed_abs"] <= (2e-5 if "softcap" in name else 0.0), res


def test_interpreter_sampler_chi_square_vs_multinomial(interp):
    res = check_case(interp, "s_chi2_vs_multinomial")
    assert res["p"] > 1e-3, res


@pytest.mark.parametrize("name", [n for n in INTERP_CASES if n.startswith("sc_")])
def test_interpreter_soft_embedding_matches_twin(interp, name):
    res = check_case(interp, name)
    tol = 2e-3 if "f16" in name else 1e-5
    assert res["finite"] and res["nonzero_ref"] and res["dtype_ok"]
    assert res["max_rel"] <= tol, res


# ---- twins vs independent references ----------------------------------------------------------------------


def test_twin_matches_categorical_and_hf_processing():
    from dgemma.kernels import sample_logits_torch

    gen = torch.Generator().manual_seed(1)
    raw = (torch.randn((7, 501), generator=gen) * 20).to(torch.bfloat16)
    t = 0.6
    u = torch.rand((7,), generator=gen)
    proc = torch.empty((7, 501), dtype=torch.bfloat16)
    o = sample_logits_torch(raw, t, u, softcap=30.0, processed_out=proc)
    # HF: logits.float() / 30 -> tanh -> * 30, then processed = raw / t; SC logits = processed.to(bf16)
    hf = torch.tanh(raw.float() / 30.0) * 30.0 / t
    assert torch.equal(proc, hf.to(torch.bfloat16))
    ent = torch.distributions.Categorical(logits=hf).entropy()
    assert (o.entropy - ent).abs().max().item() < 1e-5
    assert torch.equal(o.argmax, hf.argmax(-1))
    assert (o.logsumexp - torch.logsumexp(hf, -1)).abs().max().item() < 1e-5


def test_twin_samples_match_multinomial_in_distribution():
    from dgemma.kernels import sample_logits_torch

    gen = torch.Generator().manual_seed(2)
    row = torch.randn((50,), generator=gen) * 1.5
    n = 20000
    o = sample_logits_torch(row.expand(n, 50).contiguous(), 1.0, torch.rand((n,), generator=gen))
    ref = torch.multinomial(torch.softmax(row, -1), n, replacement=True, generator=torch.Generator().manual_seed(3))
    stat, p = chi2_two_sample(torch.bincount(o.sample, minlength=50), torch.bincount(ref, minlength=50))
    print(f"chi2={stat:.1f} p={p:.3f}")
    assert p > 1e-3


def test_twin_inverse_cdf_edges():
    from dgemma.kernels import sample_logits_torch

    logits = torch.tensor([[0.0, -float("inf"), 0.0, -float("inf")]] * 3)
    o = sample_logits_torch(logits, 1.0, torch.tensor([0.0, 0.49, 0.9999999]))
    assert o.sample.tolist() == [0, 0, 2]  # never a masked entry; u -> 1 lands on the last live index
    assert torch.allclose(o.entropy, torch.full((3,), 0.6931472), atol=1e-6)


def test_soft_embedding_twin_matches_hf_formula():
    from dgemma.kernels import sampler as smp

    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn((5, 300), generator=gen) * 5).to(torch.bfloat16)
    emb = torch.randn((300, 24), generator=gen).to(torch.bfloat16)
    hf = torch.matmul(logits.softmax(-1, dtype=torch.float32).to(torch.bfloat16), emb) * torch.tensor(
        2816**0.5
    ).to(torch.bfloat16)
    ours = smp.sc_soft_embedding_torch(logits, emb, 2816**0.5)
    err = rel_errors(ours, hf)
    print(err)
    assert err["max_rel"] < 8e-3 and err["rms_rel"] < 4e-3  # bf16: at most one ulp apart
    full = ours
    smp._TWIN_V_CHUNK, old = 64, smp._TWIN_V_CHUNK
    try:
        chunked = smp.sc_soft_embedding_torch(logits, emb, 2816**0.5)
    finally:
        smp._TWIN_V_CHUNK = old
    assert rel_errors(chunked, full)["max_rel"] < 8e-3


def test_input_errors():
    from dgemma.kernels import KernelInputError, sample_logits_torch, sc_soft_embedding_torch

    lg = torch.randn(3, 10)
    with pytest.raises(KernelInputError, match="temperature"):
        sample_logits_torch(lg, 0.0, torch.rand(3))
    with pytest.raises(KernelInputError, match="uniforms"):
        sample_logits_torch(lg, 1.0, torch.rand(4))
    with pytest.raises(KernelInputError, match="vocab"):
        sc_soft_embedding_torch(lg, torch.randn(11, 4), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_full_vocab_matches_twin():
    from dgemma.kernels import sample_logits, sample_logits_torch, sc_soft_embedding, sc_soft_embedding_torch

    gen = torch.Generator().manual_seed(5)
    raw = (torch.randn((64, 262144), generator=gen) * 8).to(torch.bfloat16).cuda()
    u = torch.rand((64,), generator=gen).cuda()
    o = sample_logits(raw, 0.8, u, softcap=30.0)
    r = sample_logits_torch(raw, 0.8, u, softcap=30.0)
    assert torch.equal(o.argmax, r.argmax)
    assert (o.entropy - r.entropy).abs().max().item() < 1e-3
    assert (o.sample == r.sample).float().mean().item() >= 0.95
    emb = (torch.randn((262144, 256), generator=gen) * 0.02).to(torch.bfloat16).cuda()
    err = rel_errors(sc_soft_embedding(raw, emb, 53.0), sc_soft_embedding_torch(raw, emb, 53.0))
    assert err["max_rel"] < 2e-2 and err["rms_rel"] < 4e-3, err


if __name__ == "__main__" and "--interp-worker" in sys.argv:
    worker_main(INTERP_CASES)
