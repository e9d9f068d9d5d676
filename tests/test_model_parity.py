"""dgemma's model vs transformers' DiffusionGemmaForBlockDiffusion, float32 on CPU, from the same directory."""
from __future__ import annotations

import pytest
import torch

from dgemma.runtime.loading import load_model

from conftest import load_hf

TOL = 1e-5
PRESETS = ["tiny-a", "tiny-b", "tiny-c", "tiny-odd"]


def _hf_cache(hf):
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=hf.config.text_config)


def _our_kv(cache, i, P):
    lk = cache.layers[i]
    n = P if lk.ring is None else cache.slide_len
    return lk.k[:, :, :n], lk.v[:, :, :n]


@pytest.mark.parametrize("preset", PRESETS)
def test_parity_with_reference(tiny_checkpoint, preset):
    path = tiny_checkpoint(preset)
    ours = load_model(path)
    hf = load_hf(path, preset)
    cfg = ours.cfg
    g = torch.Generator().manual_seed(1234)
    C, V = cfg.canvas_length, cfg.vocab_size
    worst = 0.0
    # one prompt shorter than the sliding window, one longer (so the sliding cache is cut)
    for P in (cfg.sliding_window - 2, 3 * cfg.sliding_window + 1):
        ids = torch.randint(0, V, (2, P), generator=g)
        canvas = torch.randint(0, V, (2, C), generator=g)
        sc = torch.randn(2, C, V, generator=g) * 4
        cache = ours.new_cache(2, P + 2 * C)
        ours.encode(ids, cache)
        ref_cache = _hf_cache(hf)
        with torch.no_grad():
            ref = hf(input_ids=ids, decoder_input_ids=canvas, past_key_values=ref_cache).logits
        # encoder K/V, layer by layer (sliding layers keep the last W-1 positions, as HF's DynamicCache)
        for i in range(cfg.num_hidden_layers):
            k, v = _our_kv(cache, i, P)
            rk, rv = ref_cache.layers[i].keys, ref_cache.layers[i].values
            assert k.shape == rk.shape, (i, k.shape, rk.shape)
            err = max((k - rk).abs().max().item(), (v - rv).abs().max().item())
            print(f"{preset} P={P} layer {i} K/V max abs err {err:.2e}")
            assert err <= TOL
        # decoder logits without and with self-conditioning logits
        for sc_in in (None, sc):
            got = ours.decode(canvas, cache, sc_in)
            if sc_in is not None:
                with torch.no_grad():
                    ref = hf(past_key_values=ref_cache, decoder_input_ids=canvas, self_conditioning_logits=sc_in).logits
            err = (got - ref).abs().max().item()
            worst = max(worst, err)
            print(f"{preset} P={P} sc={sc_in is not None} logits max abs err {err:.2e} (|logits| max {ref.abs().max():.1f})")
            assert err <= TOL
        # a second canvas committed into the cache, then a new canvas decoded against it
        committed = torch.randint(0, V, (2, C), generator=g)
        ours.encode(committed, cache)
        with torch.no_grad():
            ref2 = hf(input_ids=committed, past_key_values=ref_cache, decoder_input_ids=canvas,
                      self_conditioning_logits=sc).logits
        err = (ours.decode(canvas, cache, sc) - ref2).abs().max().item()
        print(f"{preset} P={P} after second canvas: logits max abs err {err:.2e}")
        assert err <= TOL
        worst = max(worst, err)
    print(f"{preset}: worst logits error {worst:.2e}")


def test_decoder_never_changes_committed_cache(tiny_checkpoint):
    m = load_model(tiny_checkpoint("tiny-b"))
    cfg = m.cfg
    ids = torch.randint(0, cfg.vocab_size, (1, 30))
    cache = m.new_cache(1, 200)
    m.encode(ids, cache)
    before = [(lk.k[:, :, : cache.length if lk.ring is None else cache.slide_len].clone()) for lk in cache.layers]
    for _ in range(3):
        m.decode(torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length)), cache)
    for b, lk in zip(before, cache.layers):
        assert torch.equal(b, lk.k[:, :, : b.shape[2]])
    assert cache.length == 30


def test_chunked_encode_equals_one_shot(tiny_checkpoint):
    """Committing a prompt in pieces (as canvases are) gives the same cache and logits as one pass."""
    m = load_model(tiny_checkpoint("tiny-c"))
    cfg = m.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(3))
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=torch.Generator().manual_seed(4))
    a, b = m.new_cache(2, 64), m.new_cache(2, 64)
    m.encode(ids, a)
    for s, e in ((0, 4), (4, 17), (17, 29)):
        m.encode(ids[:, s:e], b)
    err = (m.decode(canvas, a) - m.decode(canvas, b)).abs().max().item()
    print(f"chunked vs one-shot encode: logits max abs err {err:.2e}")
    assert err <= 1e-4  # same math, different attention kernels (causal fast path vs masked): fp32 rounding only


def test_sliding_cache_memory_is_bounded(tiny_checkpoint):
    m = load_model(tiny_checkpoint("tiny-a"))
    cfg = m.cfg
    small, big = m.new_cache(1, 64), m.new_cache(1, 4096)
    for i, g in enumerate(cfg.layers):
        if g.is_sliding:
            assert small.layers[i].k.shape[2] == big.layers[i].k.shape[2] == cfg.sliding_window - 1 + cfg.canvas_length
        else:
            assert big.layers[i].k.shape[2] == 4096 + cfg.canvas_length


def test_context_overflow_is_a_clear_error(tiny_checkpoint):
    from dgemma.runtime.errors import GenerationError

    m = load_model(tiny_checkpoint("tiny-a"))
    cache = m.new_cache(1, 10)
    with pytest.raises(GenerationError, match="context is full"):
        m.encode(torch.zeros(1, 11, dtype=torch.long), cache)


def test_sc_top_k_approximation(tiny_checkpoint):
    """Top-k self-conditioning equals the exact soft embedding when k = V and stays close for small k."""
    m = load_model(tiny_checkpoint("tiny-a"))
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    sc = torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=g) * 6  # peaked, like late denoising steps
    exact = m.soft_embedding(sc)
    full = m.soft_embedding(sc, top_k=cfg.vocab_size)
    assert torch.equal(full, exact)
    approx = m.soft_embedding(sc, top_k=64)
    rel = ((approx - exact).norm() / exact.norm()).item()
    print(f"top-64 SC soft embedding relative error {rel:.3e}")
    assert rel < 0.05


def test_backward_through_encode_and_decode(tiny_checkpoint):
    """The trainer differentiates through the encoder's cache writes and the decoder's scratch writes."""
    m = load_model(tiny_checkpoint("tiny-a"))
    for p in m.parameters():
        p.requires_grad_(True)
    cfg = m.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length))
    cache = m.new_cache(2, 5)
    m.encode(ids, cache)
    m.decode(canvas, cache).logsumexp(-1).mean().backward()
    q = m.layers[1].self_attn.q_proj.weight.grad
    assert q is not None and torch.isfinite(q).all() and q.abs().sum() > 0
