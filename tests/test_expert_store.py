"""On-demand experts: identical tokens for every budget, exact statistics (checked against recorded router
choices and the resident slots' actual contents), LFU vs LRU on skewed routing, other experts classes."""
from __future__ import annotations

import pytest
import torch

from dgemma.runtime.errors import DGemmaError, PlanError
from dgemma.runtime.expert_store import ExpertStore, OffloadedExperts, enable_expert_offload
from dgemma.runtime.generate import generate
from dgemma.runtime.loading import load_model
from dgemma.runtime.model import Experts


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(model, seed=3, prompt_len=21, new=40, steps=5):
    ids = torch.randint(5, 250, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    return generate(model, ids, sampling="reference", generator=g, max_new_tokens=new,
                    max_denoising_steps=steps).sequences


def _budgets(E: int, k: int) -> list[int]:
    return sorted({E, (3 * E) // 4, E // 2, k}, reverse=True)


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-odd"])  # tiny-odd: torch's per-expert GEMM fallback
@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_tokens_identical_for_every_budget(tiny_checkpoint, preset, policy):
    ck = tiny_checkpoint(preset)
    ref_model = load_model(ck)
    ref = _gen(ref_model)
    E, k = ref_model.cfg.num_experts, ref_model.cfg.top_k_experts
    for S in _budgets(E, k):
        m = load_model(ck)
        st = enable_expert_offload(m, S, policy=policy)
        out = _gen(m)
        s = st.summary()
        print(f"{preset} {policy} S={S}/{E}: identical={torch.equal(out, ref)} hit rate {s['hit_rate']:.3f}, "
              f"{s['bytes_per_pass']:.0f} B/pass")
        assert torch.equal(out, ref), (preset, policy, S)
        if S < E:
            assert s["bytes_moved"] > 0


def _record_router(model):
    chosen: list[set[int]] = []

    def hook(mod, args, out):
        chosen.append(set(out[1].reshape(-1).tolist()))

    for layer in model.layers:
        layer.router.register_forward_hook(hook)
    return chosen


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_statistics_are_exact(tiny_checkpoint, policy):
    ck = tiny_checkpoint("tiny-b")
    ref = load_model(ck)
    cfg = ref.cfg
    E, k, L = cfg.num_experts, cfg.top_k_experts, cfg.num_hidden_layers
    per_expert = (2 * cfg.moe_intermediate_size * cfg.hidden_size + cfg.hidden_size * cfg.moe_intermediate_size) * 4
    for S in (E, k):
        m = load_model(ck)
        chosen = _record_router(m)
        st = enable_expert_offload(m, S, policy=policy, trace=True)
        _gen(m, prompt_len=30, new=64, steps=4)
        calls = st.calls
        assert len(calls) == len(chosen) and len(calls) % L == 0
        assert st.layers[0].expert_nbytes == per_expert
        seen: list[set[int]] = [set() for _ in range(L)]
        for c, ch in zip(calls, chosen):
            assert set(c.chosen) == ch  # the store saw what the router chose
            missing = ch - set(c.resident_before)
            assert sorted(c.loaded) == sorted(missing) and len(c.loaded) == len(set(c.loaded))
            assert c.misses == len(missing) and c.hits == len(ch) - len(missing)
            assert c.bytes_moved == len(missing) * per_expert
            if S == E:  # every expert moves once, at its first use, never again
                assert set(c.loaded) == ch - seen[c.layer]
            seen[c.layer] |= ch
        passes = st.pass_stats()
        assert len(passes) == len(calls) // L
        assert sum(p.bytes_moved for p in passes) == sum(c.bytes_moved for c in calls)
        if S == E:
            assert sum(c.misses for c in calls) == sum(len(s) for s in seen)
        # residency claims are real: each slot holds exactly its expert's weights
        for layer, off in zip(ref.layers, st.layers):
            assert len(off.resident_experts) <= S
            for s, e in enumerate(off.slot_expert):
                if e >= 0:
                    assert torch.equal(off.resident.gate_up_proj[s], layer.experts.gate_up_proj[e])
                    assert torch.equal(off.resident.down_proj[s], layer.experts.down_proj[e])


def _experts(E=9, H=32, I=16, seed=0) -> Experts:
    class C:  # the fields Experts reads
        num_experts, hidden_size, moe_intermediate_size = E, H, I

    m = Experts(C)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    m.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H, generator=g) * 0.2, requires_grad=False)
    m.down_proj = torch.nn.Parameter(torch.randn(E, H, I, generator=g) * 0.2, requires_grad=False)
    return m


def _wrap(inner, slots, policy, layer=0):
    st = ExpertStore(policy, 0.9, torch.device("cpu"), check_finite=False, trace=True)
    off = OffloadedExperts(inner, layer, slots, st, torch.device("cpu"), torch.float32, "keep")
    st.layers.append(off)
    return st, off


def _skewed_calls(E, n_calls=12, T=10, K=2, seed=0):
    """Hot experts 0 and 1 on every token; each call a different set of three cold experts in the second slot."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_calls):
        cold = 2 + (torch.arange(T) % 3 + 3 * c) % (E - 2)
        idx = torch.stack([torch.arange(T) % 2, cold], dim=1)  # [T, 2]
        w = torch.rand(T, K, generator=g)
        out.append((torch.randn(T, 32, generator=g), idx, w))
    return out


def test_lfu_beats_lru_on_skewed_routing():
    inner = _experts()
    hits = {}
    for policy in ("lfu", "lru"):
        st, off = _wrap(_experts(), 4, policy)
        for x, idx, w in _skewed_calls(9):
            assert torch.equal(off(x, idx, w), inner(x, idx, w))
        hits[policy] = sum(c.hits for c in st.calls)
        print(policy, "hits", hits[policy], "misses", sum(c.misses for c in st.calls))
    assert hits["lfu"] > hits["lru"]


def test_nvfp4_and_gguf_experts_offload_exactly():
    from gguf import GGMLQuantizationType as QT

    from dgemma.converter.gguf_quants import quantize
    from dgemma.runtime.gguf_linear import ExpertPart, GGUFExperts
    from dgemma.runtime.nvfp4_linear import NVFP4Experts

    E, H, I = 7, 64, 32
    g = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1
    nv = NVFP4Experts(E, H, I)
    for proj, w in (("gate_up_proj", gu), ("down_proj", dn)):
        codes = torch.randint(0, 256, (*w.shape[:-1], w.shape[-1] // 2), dtype=torch.uint8, generator=g)
        scale = (torch.rand(*w.shape[:-1], w.shape[-1] // 16, generator=g) + 0.5).to(torch.float8_e4m3fn)
        nv.set_packed(proj, codes, scale, torch.rand(E, generator=g) + 0.5)
    gg = GGUFExperts(E, down=ExpertPart(H, I, torch.from_numpy(quantize(dn, QT.Q8_0)), QT.Q8_0, None),
                     gate_up=ExpertPart(2 * I, H, torch.from_numpy(quantize(gu, QT.Q8_0)), QT.Q8_0, None))
    T, K = 13, 3
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    x = torch.randn(T, H, generator=g)
    for inner in (nv, gg):
        want = inner(x, idx, w)
        for S in (E, 4, 2, 1):
            st, off = _wrap(inner, S, "lfu")
            for _ in range(2):
                got = off(x, idx, w)
                assert torch.equal(got, want), (type(inner).__name__, S)
            if S == E:
                assert st.calls[1].misses == 0


def test_budget_and_errors(tiny_checkpoint):
    ck = tiny_checkpoint("tiny-a")
    m = load_model(ck)
    with pytest.raises(DGemmaError, match="policy"):
        enable_expert_offload(m, 2, policy="fifo")
    with pytest.raises(DGemmaError, match="between 1 and"):
        enable_expert_offload(m, 99)
    with pytest.raises(PlanError):
        enable_expert_offload(m, vram_budget=1000, context_length=32)
    st = enable_expert_offload(m, vram_budget=10 * 2**30, context_length=32)
    assert st.experts_per_layer == m.cfg.num_experts
    with pytest.raises(DGemmaError, match="already"):
        enable_expert_offload(m, 2)
