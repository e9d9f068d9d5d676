#!/usr/bin/env python
"""Benchmark: dgemma vs HF transformers `generate` on the same mid-size random checkpoint, both on CPU, same run.

Fixed denoising steps, adaptive stopping off, same prompt; reports ms per denoising step and tokens/s (median of
several runs) and the ratio. Needs the test extra (transformers).

    python scripts/bench_generate.py [--runs 5] [--steps 16] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch



def _tiny_module():
    path = Path(__file__).resolve().parent / "make_tiny_checkpoint.py"
    spec = importlib.util.spec_from_file_location("_dg_make_tiny_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


MID = _tiny_module().PRESETS["mid"]  # the mid-size benchmark config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--canvases", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--sc-top-k", type=int, default=64, help="k for the approximate-SC row (0: skip that row)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgemma.runtime.generate import generate
    from dgemma.runtime.loading import load_model

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _tiny_module().write_checkpoint(Path(tmp) / "mid", MID, seed=0, tokenizer=False)
        ours = load_model(ckpt)
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=torch.float32).eval()
    C = MID["canvas_length"]
    ids = torch.randint(5, MID["vocab_size"], (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=C * a.canvases, max_denoising_steps=a.steps)
    steps_total = a.steps * a.canvases
    variants = {
        "dgemma reference": dict(sampling="reference"),
        "dgemma fast": dict(sampling="fast"),
    }
    if a.sc_top_k:
        variants[f"dgemma fast+sc{a.sc_top_k}"] = dict(sampling="fast", sc_top_k=a.sc_top_k)
    results: dict[str, list[float]] = {name: [] for name in [*variants, "transformers"]}
    same = True
    for r in range(a.runs + 1):  # the first round is a warm-up
        outs = {}
        for name, extra in variants.items():
            torch.manual_seed(r)
            t0 = time.perf_counter()
            outs[name] = generate(ours, ids, adaptive_stopping=False, **extra, **kw)
            if r:
                results[name].append(time.perf_counter() - t0)
        torch.manual_seed(r)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = hf.generate(ids, stability_threshold=None, **kw)
        if r:
            results["transformers"].append(time.perf_counter() - t0)
        same = same and torch.equal(outs["dgemma reference"].sequences, ref.sequences)
    rows = []
    for name, ts in results.items():
        med = statistics.median(ts)
        rows.append(dict(impl=name, median_s=med, ms_per_step=1000 * med / steps_total,
                         tokens_per_s=C * a.canvases / med))
    hf_ms = rows[-1]["ms_per_step"]
    for row in rows:
        row["speedup_vs_transformers"] = hf_ms / row["ms_per_step"]
    ratio = max(row["speedup_vs_transformers"] for row in rows[:-1])
    info = dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                config={k: v for k, v in MID.items() if k != "layer_types"}, layers=len(MID["layer_types"]),
                prompt_len=a.prompt_len, steps=a.steps, canvases=a.canvases, runs=a.runs,
                identical_tokens=bool(same))
    print(f"mid-size random DiffusionGemma (hidden 512, 8 layers, 32 experts top-4, vocab 32k, canvas {C}), "
          f"prompt {a.prompt_len}, {a.steps} fixed steps x {a.canvases} canvas(es), CPU fp32, "
          f"{torch.get_num_threads()} threads, median of {a.runs}")
    print(f"{'impl':<24}{'ms/step':>10}{'tokens/s':>11}{'total s':>10}{'vs HF':>8}")
    for row in rows:
        print(f"{row['impl']:<24}{row['ms_per_step']:>10.1f}{row['tokens_per_s']:>11.1f}{row['median_s']:>10.3f}"
              f"{row['speedup_vs_transformers']:>7.2f}x")
    print(f"reference mode gives tokens identical to transformers: {same}")
    if a.json:
        a.json.write_text(json.dumps(dict(info=info, rows=rows, speedup=ratio), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
