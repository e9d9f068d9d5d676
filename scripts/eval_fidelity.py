#!/usr/bin/env python
"""Fidelity of quantized DiffusionGemma checkpoints against their bf16/fp32 source, on held-out code.

For the source and every quantized form (NVFP4 directories, GGUF files) on identical inputs:
held-out denoising loss at fixed noise levels and seeds, KL(source || quantized) of the canvas predictions,
top-1 agreement with the source, and the share of identical tokens in same-seed generations. One table plus JSON.

    python scripts/eval_fidelity.py CHECKPOINT [QUANTIZED ...] [--json out.json]
    python scripts/eval_fidelity.py models/dgemma-tiny-code --make /tmp/fid   # convert every format first

--make converts CHECKPOINT with dgemma-convert into: NVFP4 experts/default presets, RTN and calibrated (MSE
scale search with calibration importance); GGUF Q8_0, Q6_K, Q4_K_M (plain and with the calibration statistics
as importance), MXFP4_MOE and NVFP4. The inputs come from scripts/tiny_code_corpus.py (the held-out stdlib files),
so the checkpoint's tokenizer must cover Python source.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _sibling(name: str):
    key = f"_dg_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def make_variants(src: Path, out: Path) -> list[tuple[str, Path]]:
    """Convert `src` into every evaluated format under `out` (skips ones that already exist)."""
    out.mkdir(parents=True, exist_ok=True)
    conv = [sys.executable, "-m", "dgemma.converter.cli"]
    made: list[tuple[str, Path]] = []

    def run(name: str, args: list[str], dst: Path) -> None:
        if not dst.exists():
            t0 = time.perf_counter()
            r = subprocess.run(conv + args, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{name}: dgemma-convert failed:\n{r.stdout}\n{r.stderr}")
            print(f"made {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        made.append((name, dst))

    for preset in ("experts", "default"):
        for search, label in (("rtn", "RTN"), ("mse", "calibrated")):
            d = out / f"nvfp4-{preset}-{search}"
            run(f"NVFP4 {preset} {label}", ["nvfp4", str(src), str(d), "--preset", preset, "--scale-search", search,
                                            "--quiet"], d)
    stats = out / "nvfp4-default-mse" / "calibration_stats.safetensors"
    for t in ("q8_0", "q6_k", "q4_k_m", "mxfp4_moe", "nvfp4"):
        f = out / f"{t}.gguf"
        run(f"GGUF {t.upper()}", ["gguf", str(src), str(f), "--type", t, "-q"], f)
        if t in ("q6_k", "q4_k_m") and stats.is_file():
            f = out / f"{t}-imatrix.gguf"
            run(f"GGUF {t.upper()} +importance", ["gguf", str(src), str(f), "--type", t, "--calib", str(stats), "-q"], f)
    return made


@torch.no_grad()
def canvas_logits(model, windows: torch.Tensor, noisy: torch.Tensor, prefix_len: int, batch: int = 16):
    """Decoder logits [N, C, V] for each window's prefix (committed) and noised canvas."""
    outs = []
    for s in range(0, windows.shape[0], batch):
        e = min(s + batch, windows.shape[0])
        cache = model.new_cache(e - s, prefix_len)
        model.encode(windows[s:e, :prefix_len], cache)
        outs.append(model.decode(noisy[s:e], cache).float())
    return torch.cat(outs)


def main(argv: list[str] | None = None) -> int:
    import dgemma

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("quantized", type=Path, nargs="*")
    ap.add_argument("--make", type=Path, default=None, help="convert the checkpoint into every format here first")
    ap.add_argument("--levels", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--prefix-len", type=int, default=33)
    ap.add_argument("--gen-prompts", type=int, default=6, help="same-seed generations per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    corpus = _sibling("tiny_code_corpus")
    evl = _sibling("eval_denoise_loss")

    variants = [(p.name, p) for p in a.quantized]
    if a.make is not None:
        variants = make_variants(a.checkpoint, a.make) + variants
    base = dgemma.load(a.checkpoint, device="cpu", dtype="float32")
    cfg = base.config
    C, V = cfg.canvas_length, cfg.vocab_size
    stream = evl.heldout_stream(base.tokenizer, cfg)
    rng = np.random.default_rng(a.seed)
    starts = rng.choice(stream.starts, size=a.windows, replace=stream.starts.size < a.windows)
    windows = corpus.cut_windows(stream, starts, a.prefix_len, C)
    clean = windows[:, a.prefix_len:]
    levels = [float(x) for x in a.levels.split(",")]
    inputs = []
    for li, t in enumerate(levels):
        g = torch.Generator().manual_seed(a.seed * 1000 + li)
        noisy, _ = corpus.corrupt(clean, torch.full((a.windows,), t), V, g, exact=True)
        inputs.append(noisy)
    prompts = [windows[i, : a.prefix_len].tolist() for i in range(min(a.gen_prompts, a.windows))]

    def evaluate(name: str, dg) -> dict:
        m = dg.model
        row: dict = {"model": name, "loss": {}, "kl": {}, "top1": {}}
        for t, noisy, ref in zip(levels, inputs, ref_logits or [None] * len(levels)):
            lg = canvas_logits(m, windows, noisy, a.prefix_len)
            row["loss"][t] = float(F.cross_entropy(lg.reshape(-1, V), clean.reshape(-1)))
            if ref is not None:
                lp, lq = F.log_softmax(ref, -1), F.log_softmax(lg, -1)
                row["kl"][t] = float((lp.exp() * (lp - lq)).sum(-1).mean())
                row["top1"][t] = float((ref.argmax(-1) == lg.argmax(-1)).float().mean())
            else:
                ref_store.append(lg)
        toks = []
        for i, p in enumerate(prompts):
            r = dg.generate([p], max_new_tokens=C, generator=torch.Generator().manual_seed(a.seed + i))
            toks.append(r.new_tokens[0])
        row["_tokens"] = torch.stack(toks)
        return row

    ref_logits: list = []
    ref_store: list = []
    rows = [evaluate("source (" + str(next(iter(base.model.parameters())).dtype).replace("torch.", "") + ")", base)]
    ref_logits = ref_store
    for name, path in variants:
        dg = dgemma.load(path, device="cpu", dtype="float32")
        row = evaluate(name, dg)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
        row["bytes"] = size
        rows.append(row)
        del dg
    src_tokens = rows[0]["_tokens"]
    for row in rows:
        row["same_tokens"] = float((row.pop("_tokens") == src_tokens).float().mean())
    mid = levels[len(levels) // 2]
    print(f"fidelity vs the source on {a.windows} held-out windows (prefix {a.prefix_len}, canvas {C}); "
          f"KL and top-1 at noise {mid}; mean loss over noise levels {levels}")
    print(f"{'model':<34}{'loss':>8}{'dloss':>9}{'KL':>10}{'top-1':>8}{'same tok':>10}{'MB':>8}")
    base_loss = float(np.mean(list(rows[0]["loss"].values())))
    for row in rows:
        loss = float(np.mean(list(row["loss"].values())))
        kl = row["kl"].get(mid)
        top1 = row["top1"].get(mid)
        mb = row.get("bytes", 0) / 1e6
        print(f"{row['model']:<34}{loss:>8.4f}{loss - base_loss:>+9.4f}"
              f"{(f'{kl:.5f}' if kl is not None else '-'):>10}{(f'{top1:.4f}' if top1 is not None else '-'):>8}"
              f"{row['same_tokens']:>10.3f}{(f'{mb:.2f}' if mb else '-'):>8}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
