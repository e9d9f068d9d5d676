"""The bundled trained model (models/dgemma-tiny-code) and its trainer (scripts/train_tiny.py).

- the shipped checkpoint loads in dgemma and in transformers' DiffusionGemmaForBlockDiffusion, with the same
  decoder logits;
- its held-out denoising loss is far below that of the same architecture with the weights training started
  from (both printed);
- from the prompt `def ` it writes a function header, which the untrained weights do not;
- train_tiny.py runs, checkpoints and resumes (a resumed run equals an uninterrupted one).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from dgemma.runtime.config import DGConfig
from dgemma.runtime.generate import generate
from dgemma.runtime.loading import load_model
from dgemma.runtime.model import DGModel, count_parameters
from dgemma.runtime.tokenizer import SPECIAL_TOKEN_IDS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "dgemma-tiny-code"


def _script(name: str):
    key = f"_dg_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small shapes: one thread is faster (and the generations below were checked so)
    yield load_model(MODEL_DIR, dtype=torch.float32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def untrained(trained) -> DGModel:
    """The same architecture with the weights training started from (train_tiny.init_weights)."""
    model = DGModel(trained.cfg)
    _script("train_tiny").init_weights(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(MODEL_DIR)


def test_shipped_checkpoint_shape(trained, tok):
    cfg = trained.cfg
    files = sorted(MODEL_DIR.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    n = count_parameters(trained)
    print(f"{n:,} parameters, {size / 1e6:.1f} MB of safetensors, layers {cfg.layer_types}")
    assert size <= 30e6
    assert 1e6 <= n <= 20e6
    assert cfg.sliding_layer_ids and cfg.full_layer_ids
    assert cfg.num_experts >= 8 and 2 <= cfg.top_k_experts <= 4
    assert 32 <= cfg.canvas_length <= 64
    assert tok.vocab_size == cfg.vocab_size
    for name, i in SPECIAL_TOKEN_IDS.items():
        assert tok.token_to_id(name) == i, name
    assert (MODEL_DIR / "README.md").is_file()
    # a base code model: no chat template, so dgemma-run feeds prompts raw by default
    assert not (MODEL_DIR / "chat_template.jinja").is_file()
    # the encoder's layer scalars are learned separately from the decoder's
    enc = torch.cat([layer.encoder_layer_scalar for layer in trained.layers])
    dec = torch.cat([layer.layer_scalar for layer in trained.layers])
    assert not torch.equal(enc, dec)


def test_transformers_reference_gives_the_same_logits(trained):
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    transformers.logging.set_verbosity_error()
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    cfg = trained.cfg
    V, C = cfg.vocab_size, cfg.canvas_length
    g = torch.Generator().manual_seed(7)
    P = 2 * cfg.sliding_window + 3  # longer than the window: the sliding cache is cut
    ids = torch.randint(0, V, (2, P), generator=g)
    canvas = torch.randint(0, V, (2, C), generator=g)
    sc = torch.randn(2, C, V, generator=g) * 3
    cache = trained.new_cache(2, P)
    ref_cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        trained.encode(ids, cache)
        ref = hf(input_ids=ids, decoder_input_ids=canvas, past_key_values=ref_cache).logits
        got = trained.decode(canvas, cache)
        err = (got - ref).abs().max().item()
        ref_sc = hf(past_key_values=ref_cache, decoder_input_ids=canvas, self_conditioning_logits=sc).logits
        err_sc = (trained.decode(canvas, cache, sc) - ref_sc).abs().max().item()
    print(f"logits max abs err vs transformers: {err:.2e}, with self-conditioning {err_sc:.2e} "
          f"(|logits| max {ref.abs().max():.1f})")
    assert err <= 1e-5 and err_sc <= 1e-5


def test_heldout_loss_far_below_untrained(trained, untrained, tok):
    ev = _script("eval_denoise_loss")
    held = ev.heldout_stream(tok, trained.cfg, max_files=4)
    kw = dict(noise_levels=(0.5,), seed=0, n_windows=16, prefix_len=33)
    ours = ev.denoising_loss(trained, held, **kw)[0.5]
    base = ev.denoising_loss(untrained, held, **kw)[0.5]
    print(f"held-out denoising loss at t=0.5: trained {ours:.3f}, untrained {base:.3f} nats/token "
          f"(uniform over the vocabulary: {torch.log(torch.tensor(float(trained.cfg.vocab_size))):.3f})")
    assert ours < 0.5 * base


# a function header: `def`, a name, an opening parenthesis (what the stdlib's `def ` lines continue with)
HEADER = re.compile(r"^def +[A-Za-z_][A-Za-z0-9_]*\(")


def _continue_def(model: DGModel, tok: Tokenizer, seed: int) -> str:
    ids = tok.encode("def ")
    out = generate(model, [ids], generator=torch.Generator().manual_seed(seed), max_new_tokens=32,
                   max_denoising_steps=16)
    return tok.decode(out.sequences[0].tolist(), skip_special_tokens=True)


def test_generation_writes_a_function_header(trained, untrained, tok):
    # several seeds: the check counts headers instead of betting on one sampled continuation
    seeds = range(6)
    texts = [_continue_def(trained, tok, s) for s in seeds]
    base = [_continue_def(untrained, tok, s) for s in seeds]
    for t, b in zip(texts, base):
        print(f"trained:   {t!r}\nuntrained: {b!r}")
    hits, base_hits = sum(bool(HEADER.match(t)) for t in texts), sum(bool(HEADER.match(b)) for b in base)
    print(f"function headers: trained {hits}/{len(texts)}, untrained {base_hits}/{len(base)}")
    joined = "".join(texts)
    printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\n\t" for ch in joined) / max(len(joined), 1)
    print(f"printable share of the trained output: {printable:.3f}")
    assert printable >= 0.95
    assert hits >= len(texts) // 2
    assert base_hits == 0


def _train(tmp: Path, *extra: str) -> int:
    tt = _script("train_tiny")
    return tt.main([str(tmp / "out"), "--work-dir", str(tmp / "work"), "--preset", "smoke", "--max-files", "3",
                    "--batch-size", "3", "--max-prefix", "9", "--eval-every", "2", "--eval-windows", "3",
                    "--tokenizer-lines", "3000", "--threads", "1", *extra])


def test_train_tiny_runs_and_resumes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, "--steps", "2") == 0
    assert _train(a, "--steps", "3", "--resume") == 0
    assert _train(b, "--steps", "3") == 0  # warmup covers all three steps: the same lr at every step
    sa = torch.load(a / "work" / "train_state.pt", weights_only=False)
    sb = torch.load(b / "work" / "train_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 3
    for k, v in sb["model"].items():
        assert torch.equal(sa["model"][k], v), k
    log = [json.loads(x) for x in (a / "work" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # the exported directory is a checkpoint both runtimes load, with the trained weights in it
    m = load_model(a / "out", dtype=torch.float32)
    assert torch.equal(m.embed_tokens.weight, sa["model"]["embed_tokens.weight"])
    cfg = DGConfig.from_pretrained(a / "out")
    assert cfg.canvas_length == 8 and (a / "out" / "tokenizer.model").is_file()
    assert not list(tmp_path.glob("**/.out.tmp-*"))  # the temp directory was renamed into place
    assert _train(a, "--steps", "3") == 2  # refusing to overwrite a run without --resume
