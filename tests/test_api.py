"""The Python API: dgemma.load, generate, chat, sessions that reuse the encoder cache."""
from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.runtime.generate import generate


@pytest.fixture(scope="module")
def dg(tmp_path_factory):
    from conftest import tiny

    return dgemma.load(tiny.write_checkpoint(tmp_path_factory.mktemp("api"), "tiny-b"), device="cpu")


def test_load_and_generate(dg):
    assert dg.model.dtype == torch.float32 and dg.device.type == "cpu"
    ids = dg.tokenizer.encode("def add(a, b):")
    r = dg.generate(torch.tensor([ids]), max_new_tokens=40, seed=0)
    assert r.sequences.shape == (1, len(ids) + 64)
    assert r.tokens_per_forward.shape == (1,) and float(r.tokens_per_forward[0]) > 0
    assert len(r.steps_per_canvas) <= 2 and r.timings["total_s"] > 0
    again = dg.generate(torch.tensor([ids]), max_new_tokens=40, seed=0)
    assert torch.equal(r.sequences, again.sequences)


def test_chat_reply(dg):
    reply = dg.chat("Hello!", system="Be brief.", seed=1)
    assert isinstance(reply.answer, str) and reply.prompt_ids[0] == dg.tokenizer.bos_id
    with pytest.raises(dgemma.GenerationError):
        dg.chat([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], system="c")


def test_session_reuses_encoder_cache_and_matches_fresh_run(dg):
    s = dg.session(system="You are terse.", context_length=512)
    s.send("first question", seed=5)
    first_len = len(s.committed)
    before = dict(s.stats)
    reply = s.send("second question", seed=6)
    reused = s.stats["reused_tokens"] - before["reused_tokens"]
    encoded = s.stats["encoded_tokens"] - before["encoded_tokens"]
    print(f"turn 2: reused {reused} cached tokens of {first_len}, encoded {encoded} of {len(reply.prompt_ids)}")
    # the built-in template primes an empty thought channel that history omits: that tail is rolled back
    assert reused > first_len // 2 and encoded == len(reply.prompt_ids) - reused
    assert s.stats["rebuilds"] == 0
    # the reused cache holds exactly what a fresh one-shot encode of the committed tokens holds (fp32 rounding
    # aside: a random model's near-equal entropies make token-level equality too sensitive to test on)
    fresh = dg.model.new_cache(1, 512)
    dg.model.encode(torch.tensor([s.committed]), fresh)
    assert fresh.length == s.cache.length == len(reply.prompt_ids)
    canvas = torch.randint(0, dg.config.vocab_size, (1, dg.config.canvas_length))
    with torch.no_grad():
        err = (dg.model.decode(canvas, fresh) - dg.model.decode(canvas, s.cache)).abs().max().item()
    print(f"session cache vs fresh encode: logits max abs err {err:.2e}")
    assert err < 1e-4


def test_cache_rollback_rules(dg):
    m = dg.model
    c = m.new_cache(1, 256, rollback=4)
    m.encode(torch.randint(5, 100, (1, 40)), c)
    assert c.can_rollback(36) and not c.can_rollback(35) and not c.can_rollback(41)
    with pytest.raises(dgemma.GenerationError):
        c.rollback_to(30)
    c.rollback_to(37)
    assert c.length == 37 and c.slide_len == c.visible + 1 and c.slide_start == 1


def test_streamer_protocol_order(dg):
    calls = []

    class Rec:
        def put(self, v):
            calls.append(("put", tuple(v.shape)))

        def put_draft(self, v):
            calls.append(("draft", tuple(v.shape)))

        def end(self):
            calls.append(("end",))

    C = dg.config.canvas_length
    generate(dg.model, torch.tensor([[5, 6, 7]]), streamer=Rec(), max_new_tokens=C + 1, adaptive_stopping=False,
             max_denoising_steps=2)
    assert calls[0] == ("put", (1, 3)) and calls[-1] == ("end",)
    assert calls[1:-1] == [("draft", (1, C)), ("draft", (1, C)), ("put", (1, C))] * 2


def test_default_model_path_is_in_package():
    assert dgemma.default_model_path().name == "dgemma-tiny-code"
