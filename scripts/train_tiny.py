#!/usr/bin/env python
"""Train a small DiffusionGemma-architecture model on the Python standard library's source, on CPU.

The model is dgemma's own `DGModel` (the modules the runtime runs: MoE next to a dense MLP, sliding and global
attention layers, K=V global layers, self-conditioning, tied softcapped head), trained with the block-diffusion
objective it was built for:

1. a window of one source file is cut at a line start: <bos> + P-1 prefix tokens, then a canvas of C tokens;
2. the encoder commits the prefix (causal) into a fresh KV cache;
3. a fraction t ~ U(0, 1) of the canvas positions is replaced by uniform random token ids (generation starts
   from t = 1 and re-noises what it did not accept);
4. the decoder reads the cache and the noisy canvas (bidirectional) and predicts the clean canvas; the loss is
   the cross-entropy over *all* canvas positions, because the sampler reads every position (its argmax is the
   output, its entropies decide acceptance) and uniform noise gives no sign of which positions were replaced;
5. self-conditioning on about half of the steps (--sc-prob): a first no-grad decoder pass gives logits; they
   are divided by a temperature drawn from the sampler's [t_min, t_max] range (as the sampler does before
   feeding them back) and fed, detached, as `sc_logits` into the second pass, which gets the gradient;
6. optionally (--ar-weight, default 0.25) a next-token loss on the encoder's prefix outputs (the tied head on
   its final hidden states): the encoder's compute then teaches the shared weights too.

AdamW, linear warmup then cosine decay, gradient clipping, fp32. A tokenizer (byte-fallback SentencePiece BPE
with DiffusionGemma's special tokens at their ids) is trained on the training files first. Held-out files
(1 in 20, chosen by path hash) are never trained on.

The work directory holds the tokenizer and `train_state.pt` (saved every --ckpt-every steps, on Ctrl-C /
SIGTERM and at the end); `--resume` continues from it (`--steps` is the total). At the end the model is written
to OUT_DIR in the HF layout that transformers' DiffusionGemmaForBlockDiffusion loads (config.json,
generation_config.json, model.safetensors with `model.decoder.*` + the encoder's `layer_scalar`s and a tiny
untrained vision tower, tokenizer files, chat template); the directory is assembled beside OUT_DIR and renamed
into place.

    python scripts/train_tiny.py models/dgemma-tiny-code --work-dir /tmp/tiny-run --steps 1200
    python scripts/train_tiny.py models/dgemma-tiny-code --work-dir /tmp/tiny-run --steps 1500 --resume
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgemma.runtime.config import DGConfig
from dgemma.runtime.hf_names import checkpoint_tensors, is_vision
from dgemma.runtime.loading import runtime_name
from dgemma.runtime.model import DGModel, count_parameters
from dgemma.runtime.tokenizer import Tokenizer

def _load_sibling(name: str):
    """Import scripts/<name>.py once (scripts are not a package)."""
    key = f"_dg_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


corpus = _load_sibling("tiny_code_corpus")
evaluation = _load_sibling("eval_denoise_loss")
ckpt_writer = _load_sibling("make_tiny_checkpoint")

S, G = "sliding_attention", "full_attention"

# Model shapes in make_tiny_checkpoint's preset format (it writes config.json from these).
PRESETS: dict[str, dict[str, Any]] = {
    # the bundled model: ~3.9M parameters, 2:1 sliding:global like the released 5:1 pattern, 8 experts top-2
    "code-small": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        global_head_dim=64, num_global_key_value_heads=1, layer_types=[S, S, G, S, S, G], sliding_window=32,
        num_experts=8, top_k_experts=2, moe_intermediate_size=128, vocab_size=4096, canvas_length=32,
        full_partial_rotary=0.25,
    ),
    # a seconds-long smoke run (tests)
    "smoke": dict(
        hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        global_head_dim=16, num_global_key_value_heads=1, layer_types=[S, G], sliding_window=6,
        num_experts=4, top_k_experts=2, moe_intermediate_size=16, vocab_size=320, canvas_length=8,
        full_partial_rotary=0.25,
    ),
}
STATE_FILE = "train_state.pt"
# no chat template: this is a base code model, and dgemma-run feeds prompts raw when a checkpoint has none
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


# --- model ------------------------------------------------------------------------------------------------------


def build_model(preset: dict[str, Any], gen_overrides: dict[str, Any] | None = None) -> tuple[DGModel, dict, dict]:
    """(model with uninitialized weights, config.json dict, generation_config.json dict)."""
    cfg_json, gen_json = ckpt_writer.make_config(preset)
    gen_json.update(gen_overrides or {})
    cfg = DGConfig.from_dict(cfg_json, gen_json)
    model = DGModel(cfg)
    # The per-layer scalars are buffers in the runtime (constants at inference); here they are learned.
    for layer in model.layers:
        for name in ("layer_scalar", "encoder_layer_scalar"):
            value = layer._buffers.pop(name)
            layer.register_parameter(name, nn.Parameter(value.clone()))
    return model, cfg_json, gen_json


def init_weights(model: DGModel, seed: int) -> None:
    """Matrices ~ N(0, 1/fan_in); embeddings ~ N(0, 1/H) (so embed * sqrt(H) has unit RMS); norms, router
    scales and layer scalars 1 (every norm multiplies by its weight directly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g) * model.cfg.hidden_size**-0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            else:
                p.fill_(1.0)


def _fork_cache(cache: Any) -> None:
    """Give every layer fresh K/V tensors (same values, same autograd history) before a decoder pass.

    The decoder writes the canvas K/V into the cache's scratch slots in place; the encoder's attention saved views
    of the same tensors for its backward pass, so writing into them would break backpropagation into the encoder.
    """
    for lk in cache.layers:
        lk.k = lk.k.clone()
        lk.v = lk.v.clone()


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_step(model: DGModel, windows: torch.Tensor, P: int, use_sc: bool, ar_weight: float,
               g: torch.Generator) -> dict[str, float | torch.Tensor]:
    """One forward/backward on windows [B, P + C]; returns the losses (the total still attached)."""
    cfg = model.cfg
    V = cfg.vocab_size
    B = windows.shape[0]
    prefix, clean = windows[:, :P], windows[:, P:]
    t = torch.rand(B, generator=g)  # noise level per row
    noisy, _ = corpus.corrupt(clean, t, V, g)
    cache = model.new_cache(B, P)
    h = model.encode(prefix, cache)  # [B, P, H] final-normed
    sc_logits = None
    if use_sc:
        _fork_cache(cache)
        with torch.no_grad():
            first = model.decode(noisy, cache)  # [B, C, V]
        gen = cfg.generation
        temp = gen.t_min + (gen.t_max - gen.t_min) * torch.rand(B, generator=g)
        sc_logits = first / temp[:, None, None]
    _fork_cache(cache)
    logits = model.decode(noisy, cache, sc_logits)  # [B, C, V]
    loss_dn = F.cross_entropy(logits.reshape(-1, V), clean.reshape(-1))
    loss = loss_dn
    out: dict[str, float | torch.Tensor] = {"denoise": float(loss_dn.detach())}
    if ar_weight > 0:
        # the encoder state at position i predicts token i+1 (the last prefix state predicts the first canvas token)
        loss_ar = F.cross_entropy(model.logits(h).reshape(-1, V), windows[:, 1 : P + 1].reshape(-1))
        loss = loss + ar_weight * loss_ar
        out["ar"] = float(loss_ar.detach())
    out["loss"] = loss
    return out


# --- export -----------------------------------------------------------------------------------------------------


def export_checkpoint(model: DGModel, preset: dict, cfg_json: dict, gen_json: dict, tokenizer_dir: Path,
                      out: Path, dtype: torch.dtype = torch.float32, extra_files: dict[str, str] | None = None) -> Path:
    """Write the HF-layout checkpoint directory `out`, atomically (assembled beside it, then renamed)."""
    from safetensors.torch import save_file

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = model.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for spec in checkpoint_tensors(model.cfg):
            t = state[runtime_name(spec.name)]
            if tuple(t.shape) != spec.shape:
                raise RuntimeError(f"{spec.name}: shape {tuple(t.shape)} != expected {spec.shape}")
            tensors[spec.name] = t.detach().to(dtype).contiguous().clone()
        # A tiny untrained vision tower with the real names (text-only runtimes skip it; transformers then loads
        # every tensor it expects instead of initializing missing ones).
        for name, arr in ckpt_writer.make_tensors(preset, seed=0).items():
            if is_vision(name):
                tensors[name] = torch.from_numpy(arr).to(dtype).contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg_json, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_json, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            shutil.copy2(tokenizer_dir / f, tmp / f)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- state ------------------------------------------------------------------------------------------------------


def save_state(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class _StopFlag:
    """Ctrl-C / SIGTERM ask for a clean stop after the current step; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (a second Ctrl-C interrupts at once)...", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


# --- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="final checkpoint directory (HF layout), written at the end")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="tokenizer, train_state.pt and logs (default: OUT_DIR.work beside OUT_DIR)")
    ap.add_argument("--resume", action="store_true", help="continue from WORK_DIR/train_state.pt")
    ap.add_argument("--export-only", action="store_true",
                    help="write OUT_DIR from WORK_DIR/train_state.pt without training")
    m = ap.add_argument_group("model and data")
    m.add_argument("--preset", choices=sorted(PRESETS), default="code-small", help="model shape")
    m.add_argument("--max-prefix", type=int, default=96, help="longest prefix (encoder) length, <bos> included")
    m.add_argument("--max-files", type=int, default=None,
                   help="use only the first N training (and N held-out) files (quick runs)")
    m.add_argument("--tokenizer-lines", type=int, default=300_000, help="source lines sampled to train the tokenizer")
    o = ap.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=1200, help="total optimizer steps (with --resume: the new total)")
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine decay")
    o.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    o.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay of matrices (not of norms)")
    o.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    o.add_argument("--sc-prob", type=float, default=0.5, help="share of steps trained with self-conditioning")
    o.add_argument("--ar-weight", type=float, default=0.25,
                   help="weight of the encoder's next-token loss (0 = pure block-diffusion loss)")
    o.add_argument("--seed", type=int, default=0)
    r = ap.add_argument_group("run")
    r.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for this run")
    r.add_argument("--ckpt-every", type=int, default=100, help="save train_state.pt every N steps")
    r.add_argument("--eval-every", type=int, default=100, help="held-out loss (noise 0.5) every N steps")
    r.add_argument("--eval-windows", type=int, default=32, help="held-out windows per periodic evaluation")
    g = ap.add_argument_group("exported generation_config.json")
    g.add_argument("--gen-max-new-tokens", type=int, default=64)
    g.add_argument("--gen-steps", type=int, default=32, help="max_denoising_steps")
    g.add_argument("--gen-entropy-bound", type=float, default=0.5)
    g.add_argument("--export-dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--model-card", type=Path, default=None, help="a README.md to copy into OUT_DIR")
    a = ap.parse_args(argv)
    if a.max_prefix < 1:
        ap.error("--max-prefix must be >= 1")
    if not 0 <= a.sc_prob <= 1:
        ap.error("--sc-prob must be in [0, 1]")
    return a


def _prepare_tokenizer(a: argparse.Namespace, work: Path, preset: dict, train_files: list[Path]) -> Path:
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.model").is_file():
        print(f"training a {preset['vocab_size']}-token tokenizer on {len(train_files)} files...", flush=True)
        corpus.train_tokenizer(tok_dir, train_files, preset["vocab_size"], max_lines=a.tokenizer_lines, seed=a.seed)
    return tok_dir


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    a = parse_args(argv)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _run(a, tqdm)
    finally:
        torch.set_num_threads(prev_threads)


def _run(a: argparse.Namespace, tqdm: Any) -> int:
    work = (a.work_dir or a.out.with_name(a.out.name + ".work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE
    state: dict[str, Any] | None = None
    if a.resume or a.export_only:
        if not state_path.is_file():
            print(f"error: {state_path} does not exist (nothing to resume)", file=sys.stderr)
            return 2
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        preset = state["preset"]
        if state["preset_name"] != a.preset:
            print(f"note: resuming the saved preset {state['preset_name']!r} (ignoring --preset {a.preset})")
    elif state_path.is_file():
        print(f"error: {state_path} exists; pass --resume to continue it or pick another --work-dir", file=sys.stderr)
        return 2
    else:
        preset = dict(PRESETS[a.preset])
    gen_over = {"max_new_tokens": a.gen_max_new_tokens, "max_denoising_steps": a.gen_steps,
                "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": a.gen_entropy_bound}}
    model, cfg_json, gen_json = build_model(preset, gen_over)
    cfg = model.cfg
    C, V = cfg.canvas_length, cfg.vocab_size

    train_files, held_files = corpus.list_files()
    if a.max_files is not None:
        train_files, held_files = train_files[: a.max_files], held_files[: a.max_files]
    tok_dir = _prepare_tokenizer(a, work, preset, train_files)
    tok = Tokenizer.from_pretrained(tok_dir)
    if tok.vocab_size != V:
        raise RuntimeError(f"tokenizer has {tok.vocab_size} ids, the model {V}")

    step, elapsed = 0, 0.0
    history: list[dict[str, Any]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        step, elapsed, history = state["step"], state["elapsed_s"], state.get("history", [])
    else:
        init_weights(model, a.seed)
    n_params = count_parameters(model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.export_dtype]
    if a.export_only:
        export_checkpoint(model, preset, cfg_json, gen_json, tok_dir, a.out, dtype, _card(a))
        print(f"wrote {a.out} (step {step})")
        return 0

    nl = corpus.newline_ids(tok)
    ids = (cfg.eos_token_ids[0], cfg.pad_token_id, cfg.bos_token_id)
    t0 = time.perf_counter()
    train = corpus.build_stream(corpus.encode_files(tok, train_files), nl, *ids)
    held = corpus.build_stream(corpus.encode_files(tok, held_files), nl, *ids)
    print(f"model: {n_params:,} parameters ({a.preset if state is None else state['preset_name']}); corpus: "
          f"{train.num_tokens:,} training tokens in {len(train_files)} files, {held.num_tokens:,} held-out tokens "
          f"in {len(held_files)} files (encoded in {time.perf_counter() - t0:.1f}s)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    if state is not None:
        opt.load_state_dict(state["optim"])

    def snapshot() -> dict[str, Any]:
        return {"step": step, "model": model.state_dict(), "optim": opt.state_dict(), "preset": preset,
                "preset_name": state["preset_name"] if state is not None else a.preset, "elapsed_s": elapsed,
                "history": history, "train_ema": ema, "args": {k: str(v) for k, v in vars(a).items()}}

    log_f = open(work / "train_log.jsonl", "a", encoding="utf-8")
    ema: float | None = state.get("train_ema") if state is not None else None
    held_loss = float("nan")
    stopped = False
    bar = tqdm(total=a.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
    model.train()
    with _StopFlag() as flag:
        while step < a.steps:
            ts = time.perf_counter()
            # every step's randomness derives from (seed, step): a resumed run sees the same batches
            rng = np.random.default_rng([a.seed, step])
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
            P = int(rng.integers(1, a.max_prefix + 1))
            starts = rng.choice(train.starts, size=a.batch_size)
            windows = corpus.cut_windows(train, starts, P, C)
            use_sc = bool(rng.random() < a.sc_prob)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, a.steps, a.lr, a.warmup, a.min_lr_ratio)
            out = train_step(model, windows, P, use_sc, a.ar_weight, g)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()  # type: ignore[union-attr]
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip))
            opt.step()
            step += 1
            elapsed += time.perf_counter() - ts
            ema = out["denoise"] if ema is None else 0.98 * ema + 0.02 * out["denoise"]  # type: ignore[operator]
            rec = {"step": step, "denoise": out["denoise"], "ar": out.get("ar"), "P": P, "sc": use_sc,
                   "grad_norm": gnorm, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 2)}
            if step % a.eval_every == 0 or step == a.steps:
                model.eval()
                held_loss = evaluation.denoising_loss(model, held, (0.5,), seed=0, n_windows=a.eval_windows)[0.5]
                model.train()
                rec["heldout_t0.5"] = held_loss
                history.append({"step": step, "train_ema": ema, "heldout_t0.5": held_loss})
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(loss=f"{ema:.3f}", held=f"{held_loss:.3f}", lr=f"{rec['lr']:.1e}", refresh=False)
            bar.update(1)
            if step % a.ckpt_every == 0 and step < a.steps:
                save_state(state_path, snapshot())
            if flag.stop:
                stopped = True
                break
    bar.close()
    log_f.close()
    save_state(state_path, snapshot())
    if stopped:
        print(f"stopped at step {step}; state saved to {state_path}; continue with --resume", flush=True)
        return 130
    model.eval()
    final = evaluation.denoising_loss(model, held, (0.25, 0.5, 0.75, 1.0), seed=0, n_windows=64)
    metrics = {"step": step, "train_wall_s": round(elapsed, 1), "parameters": n_params, "train_ema": ema,
               "heldout": {str(k): v for k, v in final.items()}}
    (work / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics), flush=True)
    export_checkpoint(model, preset, cfg_json, gen_json, tok_dir, a.out, dtype, _card(a))
    print(f"wrote {a.out}", flush=True)
    return 0


def _card(a: argparse.Namespace) -> dict[str, str]:
    if a.model_card is None:
        return {}
    return {"README.md": Path(a.model_card).read_text(encoding="utf-8")}


if __name__ == "__main__":
    sys.exit(main())
