"""Reference-RNG mode: same seed -> the same tokens and tokens_per_forward as HF `generate` (CPU, float32)."""
from __future__ import annotations

import pytest
import torch

from dgemma.runtime.errors import GenerationError
from dgemma.runtime.generate import generate
from dgemma.runtime.loading import load_model

from conftest import load_hf


def _pair(tiny_checkpoint, preset, **kw):
    path = tiny_checkpoint(preset, **kw)
    return load_model(path), load_hf(path, preset)


def _check(ours, hf, ids, mask=None, seed=0, **kw):
    torch.manual_seed(seed)
    a = generate(ours, ids, mask, sampling="reference", **kw)
    hf_kw = dict(kw)
    if hf_kw.pop("adaptive_stopping", True) is False:
        hf_kw["stability_threshold"] = None  # the reference turns adaptive stopping off this way
    if mask is not None:
        hf_kw["attention_mask"] = mask
    if "entropy_bound" in hf_kw:
        # the reference takes the bound inside its sampler config (a bare kwarg would be silently ignored)
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        hf_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(hf_kw.pop("entropy_bound")))
    if "eos_token_ids" in hf_kw:
        eos = hf_kw.pop("eos_token_ids")
        hf_kw["eos_token_id"] = list(eos) if eos else None
    torch.manual_seed(seed)
    b = hf.generate(ids, **hf_kw)
    print(f"steps/canvas {a.steps_per_canvas} tpf ours {a.tokens_per_forward.tolist()} ref {b.tokens_per_forward.tolist()}")
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.tokens_per_forward, b.tokens_per_forward.float())
    return a


CASES = [
    dict(),  # checkpoint defaults: one canvas, adaptive stopping on
    dict(max_new_tokens=40, eos_token_ids=()),  # three canvases (40 rounds up to 3 x 16); no EOS to stop early
    dict(adaptive_stopping=False, max_denoising_steps=5),
    dict(max_denoising_steps=6, t_min=0.1, t_max=1.5, entropy_bound=0.7, confidence_threshold=0.5,
         stability_threshold=2),
]


@pytest.mark.parametrize("confidence", [0.005, 0.5])
def test_adaptive_stopping_triggers_and_freezes_rows(confidence):
    """On the trained bundled model canvases converge, so stable-and-confident stopping ends canvases early and
    the rows of a left-padded batch finish at different steps (the frozen-row path runs); still token-exact.
    Random models never get there: their argmax keeps changing with the renoised canvas."""
    import dgemma
    from dgemma.runtime.generate import prepare_batch

    dg = dgemma.load(dgemma.default_model_path(), device="cpu", dtype="float32")
    hf = load_hf(dgemma.default_model_path())
    p1 = dg.tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
    p2 = dg.tokenizer.encode("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ")
    ids, mask = prepare_batch([p1, p2], None, 0, "cpu")
    a = _check(dg.model, hf, ids, mask.long(), seed=3, max_new_tokens=64, confidence_threshold=confidence)
    N = dg.config.generation.max_denoising_steps
    assert min(a.steps_per_canvas) < N, "adaptive stopping should end a canvas early"


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_batch1_matches_reference(tiny_checkpoint, preset, case):
    ours, hf = _pair(tiny_checkpoint, preset)
    ids = torch.randint(5, ours.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(case))
    a = _check(ours, hf, ids, seed=100 + case, **CASES[case])
    if case == 1:
        assert len(a.steps_per_canvas) == -(-40 // ours.cfg.canvas_length)


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-c"])
def test_batch2_different_prompt_lengths(tiny_checkpoint, preset):
    ours, hf = _pair(tiny_checkpoint, preset)
    V = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(5, V, (13,), generator=g), torch.randint(5, V, (6,), generator=g)
    ids = torch.zeros(2, 13, dtype=torch.long)
    mask = torch.zeros(2, 13, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 7:], mask[1, 7:] = short, 1  # left padding
    _check(ours, hf, ids, mask, seed=3, max_new_tokens=2 * ours.cfg.canvas_length)
    # the list form left-pads the same way
    torch.manual_seed(3)
    a = generate(ours, [long.tolist(), short.tolist()], max_new_tokens=2 * ours.cfg.canvas_length)
    torch.manual_seed(3)
    b = generate(ours, ids, mask, max_new_tokens=2 * ours.cfg.canvas_length)  # fast sampling, same seed
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b"])
def test_eos_inside_a_canvas(tiny_checkpoint, preset):
    """Pick an EOS id that the model actually produces mid-canvas, then check pad finalisation matches."""
    ours = load_model(tiny_checkpoint(preset))
    V, C = ours.cfg.vocab_size, ours.cfg.canvas_length
    ids = torch.randint(5, V, (2, 8), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(21)
    probe = generate(ours, ids, max_new_tokens=3 * C, eos_token_ids=(V - 1,), pad_token_id=0, sampling="reference")
    new = probe.new_tokens[0]
    eos_id = int(new[C // 2])  # a token produced in the middle of the first canvas
    path = tiny_checkpoint(preset, eos=[eos_id])
    ours, hf = load_model(path), load_hf(path, preset)
    a = _check(ours, hf, ids, seed=21, max_new_tokens=3 * C)
    gen = a.new_tokens
    assert (gen == eos_id).any() and (gen == 0).any(), "EOS must occur and be followed by pad"


def test_explicit_generator_equals_global_seed(tiny_checkpoint):
    ours = load_model(tiny_checkpoint("tiny-a"))
    ids = torch.randint(5, ours.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(42)
    a = generate(ours, ids, max_new_tokens=32)
    b = generate(ours, ids, max_new_tokens=32, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(t_min=0.9, t_max=0.8), "t_max must be greater than t_min"),
        (dict(max_denoising_steps=0), "steps"),
        (dict(entropy_bound=0.0), "entropy_bound must be > 0"),
        (dict(entropy_bound=float("nan")), "finite"),
        (dict(confidence_threshold=-1.0), "confidence_threshold"),
        (dict(stability_threshold=-1), "stability"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(bogus=1), "unknown generation parameter"),
    ],
)
def test_impossible_sampler_settings(tiny_checkpoint, kw, needle):
    ours = load_model(tiny_checkpoint("tiny-a"))
    with pytest.raises(GenerationError, match=needle):
        generate(ours, torch.tensor([[5, 6, 7]]), **kw)


def test_prompt_longer_than_context(tiny_checkpoint):
    ours = load_model(tiny_checkpoint("tiny-a"))
    n = ours.cfg.max_position_embeddings
    with pytest.raises(GenerationError, match="prompt too long"):
        generate(ours, torch.full((1, n), 7))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(ours, torch.tensor([[5, ours.cfg.vocab_size + 3]]))


def test_fast_sampler_matches_multinomial_in_distribution():
    """Inverse-CDF draws (fast mode) follow softmax(logits): chi-square against the exact probabilities."""
    from dgemma.runtime.generate import sample_fast, sample_reference

    g = torch.Generator().manual_seed(0)
    V, n = 11, 4000
    logits = torch.randn(1, 1, V, generator=g) * 1.5
    probs = torch.softmax(logits[0, 0], -1)
    rows = logits.expand(1, n, V).contiguous()
    fast, ent_fast = sample_fast(rows, g)
    ref, ent_ref = sample_reference(rows, g)
    assert torch.allclose(ent_fast, ent_ref, atol=1e-5)
    for draws in (fast, ref):
        counts = torch.bincount(draws.reshape(-1), minlength=V).double()
        expected = probs.double() * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        print(f"chi-square {chi2:.1f} (df {V - 1}; 99.9% critical value 29.6)")
        assert chi2 < 29.6


def test_fast_mode_is_deterministic_and_valid(tiny_checkpoint):
    ours = load_model(tiny_checkpoint("tiny-b"))
    ids = torch.randint(5, ours.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    a = generate(ours, ids, max_new_tokens=40, generator=torch.Generator().manual_seed(9))
    b = generate(ours, ids, max_new_tokens=40, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.sequences, b.sequences)
    assert int(a.sequences.max()) < ours.cfg.vocab_size and int(a.sequences.min()) >= 0
    with pytest.raises(GenerationError, match="sampling"):
        generate(ours, ids, sampling="greedy")


def test_chunked_prefill_matches_one_pass(tiny_checkpoint):
    """Committing a long prompt in chunks gives the same cache as one pass (to fp32 rounding)."""
    ours = load_model(tiny_checkpoint("tiny-c"))
    ids = torch.randint(5, ours.cfg.vocab_size, (1, 37), generator=torch.Generator().manual_seed(2))
    a = generate(ours, ids, prefill_chunk=8, max_denoising_steps=1, adaptive_stopping=False,
                 generator=torch.Generator().manual_seed(0))
    b = generate(ours, ids, prefill_chunk=None, max_denoising_steps=1, adaptive_stopping=False,
                 generator=torch.Generator().manual_seed(0))
    assert a.sequences.shape == b.sequences.shape
    assert (a.new_tokens == b.new_tokens).float().mean() > 0.5
