"""NVFP4 scale search: never worse than RTN (per block and in total) on the importance-weighted objective,
clearly better with a skewed importance, same representation as RTN."""
from __future__ import annotations

import pytest
import torch

from dgemma.converter import nvfp4 as nv
from dgemma.converter import scale_search as ss
from dgemma.runtime.errors import DGemmaError


def _weights(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(shape, generator=g)
    # Student-t, 3 degrees of freedom: heavy tails, outliers inside blocks
    z = torch.randn(shape, generator=g)
    chi2 = sum(torch.randn(shape, generator=g) ** 2 for _ in range(3))
    return z / (chi2 / 3).sqrt()


def _skewed_importance(k: int, seed: int) -> torch.Tensor:
    # log-normal channel energies plus a few outlier channels, like mean x^2 of LLM hidden states
    g = torch.Generator().manual_seed(seed)
    imp = torch.exp(1.5 * torch.randn(k, generator=g))
    imp[torch.randperm(k, generator=g)[: k // 64]] *= 100.0
    return imp


def test_round_magnitude_matches_codec():
    a = torch.linspace(0, 8, 20001)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    a = torch.cat([a, ties, torch.nextafter(ties, torch.zeros(7)), torch.nextafter(ties, torch.full((7,), 9.0))])
    want = nv.e2m1_decode(nv.e2m1_encode(a))
    assert torch.equal(ss.e2m1_round_magnitude(a.clone()), want)


@pytest.mark.parametrize("kind", ["gauss", "student_t"])
@pytest.mark.parametrize("use_imp", [False, True])
def test_never_worse_than_rtn_per_block(kind, use_imp):
    w = _weights(kind, (67, 256), seed=1)
    imp = _skewed_importance(256, seed=2) if use_imp else None
    rtn = nv.quantize(w)
    mse = ss.mse_quantize(w, imp)
    e_rtn = ss.weighted_block_errors(w, rtn, imp)
    e_mse = ss.weighted_block_errors(w, mse, imp)
    assert (e_mse <= e_rtn * (1 + 1e-6)).all(), "a block got worse than RTN"
    assert e_mse.sum() < e_rtn.sum()
    frac = (e_mse < e_rtn).float().mean().item()
    print(f"{kind} imp={use_imp}: total weighted error MSE/RTN = {(e_mse.sum() / e_rtn.sum()).item():.3f}, "
          f"{frac:.0%} of blocks changed")
    # same representation: global scale is the RTN one, bytes decode with the plain dequantizer
    assert mse.weight_scale_2 == rtn.weight_scale_2
    assert mse.weight.dtype == torch.uint8 and mse.weight_scale.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("kind", ["gauss", "student_t"])
def test_relative_errors_report(kind):
    w = _weights(kind, (131, 512), seed=3)
    imp = _skewed_importance(512, seed=4)
    rtn = ss.error_report(w, nv.quantize(w), imp)
    mse = ss.error_report(w, ss.mse_quantize(w), imp)
    msei = ss.error_report(w, ss.mse_quantize(w, imp), imp)
    mseg = ss.error_report(w, ss.mse_quantize(w, imp, search_global=True), imp)
    print(f"\n{kind}: relative RMSE (plain / importance-weighted)")
    for label, r in [("RTN", rtn), ("MSE", mse), ("MSE+importance", msei), ("MSE+importance+global", mseg)]:
        print(f"  {label:22s} {r.rel_rmse:.4f} / {r.rel_weighted:.4f}")
    assert mse.rel_rmse < rtn.rel_rmse * 0.95  # plain MSE search: at least 5 % lower plain error
    assert msei.rel_weighted < rtn.rel_weighted * 0.85  # skewed importance: clearly lower weighted error
    assert msei.rel_weighted < mse.rel_weighted  # and the importance is what buys it
    assert mseg.rel_weighted <= msei.rel_weighted * (1 + 1e-6)


def test_stacked_experts_per_expert_importance_and_global_search():
    E, N, K = 3, 9, 64
    w = torch.randn(E, N, K, dtype=torch.bfloat16) * torch.tensor([0.02, 1.0, 7.0]).view(E, 1, 1).bfloat16()
    imp = torch.stack([_skewed_importance(K, s) for s in range(E)])  # [E, K]
    q = ss.mse_quantize(w, imp, search_global=True)
    assert q.weight.shape == (E, N, K // 2) and q.weight_scale_2.shape == (E,)
    rtn = nv.quantize(w)
    for e in range(E):
        # each expert on its own: per-expert global search never loses to its RTN total
        err_q = ss.weighted_block_errors(w[e], nv.NVFP4Tensor(q.weight[e], q.weight_scale[e], q.weight_scale_2[e]),
                                         imp[e]).sum()
        err_r = ss.weighted_block_errors(w[e], nv.NVFP4Tensor(rtn.weight[e], rtn.weight_scale[e],
                                                              rtn.weight_scale_2[e]), imp[e]).sum()
        assert err_q <= err_r * (1 + 1e-6)
        # the chosen global is RTN's times one of the multipliers
        ratio = (q.weight_scale_2[e] / rtn.weight_scale_2[e]).item()
        assert min(abs(ratio - m) for m in ss.DEFAULT_GLOBAL_MULTIPLIERS) < 1e-6
    # stacked with per-expert importance == searching each expert alone
    q1 = ss.mse_quantize(w, imp)
    for e in range(E):
        qe = ss.mse_quantize(w[e], imp[e])
        assert torch.equal(q1.weight[e], qe.weight)
        assert torch.equal(q1.weight_scale[e].view(torch.uint8), qe.weight_scale.view(torch.uint8))


def test_chunking_and_group():
    w = _weights("student_t", (41, 96), seed=5)
    imp = _skewed_importance(96, seed=6)
    a = ss.mse_quantize(w, imp)
    b = ss.mse_quantize(w, imp, chunk_elements=96 * 4)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))
    g, u = ss.mse_quantize_group([w, 3 * w[:7]], imp)
    assert g.weight_scale_2 == u.weight_scale_2 == nv.global_scale_from_amax(3 * w[:7].abs().max())
    with pytest.raises(DGemmaError):
        ss.mse_quantize_group([w, w], imp, search_global=True)


def test_bad_importance_rejected():
    w = torch.randn(4, 32)
    with pytest.raises(DGemmaError, match="importance"):
        ss.mse_quantize(w, torch.ones(16))
    with pytest.raises(DGemmaError, match="importance"):
        ss.mse_quantize(w, -torch.ones(32))
    with pytest.raises(DGemmaError, match="importance"):
        ss.mse_quantize(w, torch.full((32,), float("nan")))
    w[1, 3] = float("nan")
    with pytest.raises(DGemmaError, match="NaN"):
        ss.mse_quantize(w)
