#!/usr/bin/env python
"""Held-out denoising loss of a DiffusionGemma checkpoint on the tiny code corpus (Python stdlib source).

For each noise level t, the same windows get the same corruption whatever the model: <bos> + a fixed-length
prefix (committed by the encoder), then a canvas of C tokens in which exactly round(t*C) positions are replaced
by uniform random ids (t = 1 is generation's starting canvas). The loss is the mean cross-entropy (nats/token) of
the decoder's logits against the clean canvas, over every canvas position (the training objective) or only
over the replaced ones. Windows and noise depend only on the seed, so two models (or a model and its quantized
form) are compared on identical inputs.

    python scripts/eval_denoise_loss.py models/dgemma-tiny-code [--levels 0.25,0.5,0.75,1.0] [--windows 64]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dgemma.runtime.model import DGModel


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


def heldout_stream(tokenizer: Any, cfg: Any, max_files: int | None = None) -> Any:
    """The held-out stdlib files as one token stream (special ids from the model config)."""
    _, held = corpus.list_files()
    if max_files is not None:
        held = held[:max_files]
    docs = corpus.encode_files(tokenizer, held)
    return corpus.build_stream(docs, corpus.newline_ids(tokenizer), cfg.eos_token_ids[0], cfg.pad_token_id,
                               cfg.bos_token_id)


def _as_stream(model: DGModel, src: Any) -> Any:
    cfg = model.cfg
    if isinstance(src, corpus.TokenStream):
        return src
    if hasattr(src, "encode") and hasattr(src, "token_to_id"):  # a dgemma Tokenizer
        return heldout_stream(src, cfg)
    docs = [list(map(int, d)) for d in src]  # documents as id lists: windows may start at any token
    stream = corpus.build_stream(docs, [], cfg.eos_token_ids[0], cfg.pad_token_id, cfg.bos_token_id)
    ok = np.nonzero(stream.ids != stream.eos_id)[0]
    return corpus.TokenStream(stream.ids, ok.astype(np.int64), stream.eos_id, stream.pad_id, stream.bos_id)


@torch.no_grad()
def denoising_loss(
    model: DGModel,
    tokenizer_or_ids: Any,
    noise_levels: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    n_windows: int = 64,
    prefix_len: int = 33,
    batch_size: int = 16,
    positions: str = "all",
) -> dict[float, float]:
    """Mean cross-entropy (nats/token) of the canvas predictions at each noise level.

    tokenizer_or_ids: a dgemma Tokenizer (the held-out stdlib files are read and encoded with it), a
    `TokenStream`, or a list of documents as token-id lists. prefix_len counts the <bos>.
    positions: "all" canvas positions (the training objective) or only the "noised" ones."""
    if positions not in ("all", "noised"):
        raise ValueError(f"positions must be 'all' or 'noised', got {positions!r}")
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1 (the <bos>), got {prefix_len}")
    stream = _as_stream(model, tokenizer_or_ids)
    cfg = model.cfg
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(seed)
    starts = rng.choice(stream.starts, size=n_windows, replace=stream.starts.size < n_windows)
    windows = corpus.cut_windows(stream, starts, prefix_len, C).to(model.device)
    out: dict[float, float] = {}
    for li, t in enumerate(noise_levels):
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"noise levels must be in [0, 1], got {t}")
        g = torch.Generator().manual_seed(seed * 1000 + li)
        clean = windows[:, prefix_len:].cpu()
        noisy, mask = corpus.corrupt(clean, torch.full((n_windows,), float(t)), V, g, exact=True)
        total, count = 0.0, 0
        for s in range(0, n_windows, batch_size):
            e = min(s + batch_size, n_windows)
            cache = model.new_cache(e - s, prefix_len)
            model.encode(windows[s:e, :prefix_len], cache)
            logits = model.decode(noisy[s:e].to(model.device), cache)  # [b, C, V] fp32
            ce = F.cross_entropy(logits.reshape(-1, V), clean[s:e].reshape(-1).to(model.device), reduction="none")
            if positions == "noised":
                sel = mask[s:e].reshape(-1).to(model.device)
            else:
                sel = torch.ones_like(ce, dtype=torch.bool)
            total += float(ce[sel].sum())
            count += int(sel.sum())
        out[float(t)] = total / max(count, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    from dgemma.runtime.loading import load_model
    from dgemma.runtime.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--levels", default="0.25,0.5,0.75,1.0", help="comma-separated noise levels in [0, 1]")
    ap.add_argument("--windows", type=int, default=64, help="number of held-out windows")
    ap.add_argument("--prefix-len", type=int, default=33, help="prefix tokens per window, <bos> included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positions", choices=["all", "noised"], default="all")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model(a.checkpoint, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(a.checkpoint)
    levels = [float(x) for x in a.levels.split(",") if x.strip()]
    res = denoising_loss(model, tok, levels, seed=a.seed, n_windows=a.windows, prefix_len=a.prefix_len,
                         positions=a.positions)
    if a.json:
        print(json.dumps({str(k): v for k, v in res.items()}))
    else:
        print(f"{'noise':>6}  loss (nats/token, {a.positions} positions)")
        for k, v in res.items():
            print(f"{k:>6.2f}  {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
