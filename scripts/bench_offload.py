#!/usr/bin/env python
"""Benchmark: on-demand experts under a budget, on a mid-size random checkpoint.

For budgets of all / 75 % / 50 % / 25 % / top-k experts per layer and both eviction policies (LFU, LRU), runs the
same generation (fixed steps, no adaptive stopping, reference sampling with a fixed seed) and reports per decoder
pass: bytes moved host -> device, hit rate, copy / stall time, ms per denoising step, and whether the tokens are
identical to the fully resident model. Two routings: the random checkpoint's own (close to uniform) and a skewed
one (a fixed Zipf-like bias on every router's logits, same for the resident reference: at the default strength
0.2 a step still touches ~26 of 32 experts per layer but the 8 busiest carry ~80 % of the tokens), where the
eviction policy matters. Times are medians over `--runs` measured runs after one warm-up. On CUDA (when available, `--device cuda`) the copies overlap compute on a side stream and the table adds
the overlap efficiency, 1 - stall / copy time.

    python scripts/bench_offload.py [--device cpu|cuda] [--steps 8] [--runs 3] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
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


class _Biased(torch.nn.Module):
    """router.proj followed by a fixed per-expert bias on the logits (skewed routing for the benchmark)."""

    def __init__(self, proj: torch.nn.Module, bias: torch.Tensor):
        super().__init__()
        self.proj = proj
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.bias.to(x.dtype)


def skew_routing(model, strength: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    E = model.cfg.num_experts
    for layer in model.layers:
        rank = torch.randperm(E, generator=g).float() + 1.0
        bias = -strength * torch.log(rank)  # Zipf-like: expert of rank r gets logit bias -s*log(r)
        layer.router.proj = _Biased(layer.router.proj, bias.to(model.device))


def run_one(ckpt: Path, device: str, budget: int | None, policy: str, steps: int, prompt: torch.Tensor,
            skew: float, runs: int) -> dict:
    from dgemma.runtime.expert_store import enable_expert_offload
    from dgemma.runtime.generate import generate
    from dgemma.runtime.loading import load_model

    dt = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_model(ckpt, device="cpu" if budget is not None else device, dtype=dt)
    if skew:
        skew_routing(model, skew)
    store = None
    if budget is not None:
        store = enable_expert_offload(model, budget, policy=policy, device=device)
        model.to(device)
    C = model.cfg.canvas_length
    kw = dict(max_new_tokens=C, max_denoising_steps=steps, adaptive_stopping=False, sampling="reference")
    generate(model, prompt.to(device), generator=torch.Generator(device=device).manual_seed(0), **kw)  # warm-up
    ms, walls = [], []
    for _ in range(runs):
        if store is not None:
            store.reset_stats()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = generate(model, prompt.to(device), generator=torch.Generator(device=device).manual_seed(1), **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        ms.append(res.timings["ms_per_step"])
    out = {"tokens": res.sequences.tolist(), "ms_per_step": statistics.median(ms), "wall_s": statistics.median(walls)}
    if store is not None:
        passes = store.pass_stats()[1:]  # the last run, without the prompt's encoder pass: decoder steps only
        n = max(1, len(passes))
        needed = sum(p.needed for p in passes)
        copy = sum(p.copy_s for p in passes)
        stall = sum(p.stall_s for p in passes)
        out.update(
            bytes_per_step=sum(p.bytes_moved for p in passes) / n,
            hit_rate=sum(p.hits for p in passes) / needed if needed else 1.0,
            misses_per_step=sum(p.misses for p in passes) / n,
            copy_ms_per_step=1e3 * copy / n, stall_ms_per_step=1e3 * stall / n,
            overlap=(1 - stall / copy) if copy > 0 else math.nan,
            resident_mb=store.resident_nbytes() / 1e6,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--skew", type=float, default=0.2, help="Zipf strength of the skewed routing (0: off)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per configuration (median time)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    E, k = MID["num_experts"], MID["top_k_experts"]
    budgets = [("all", E), ("75%", 3 * E // 4), ("50%", E // 2), ("25%", E // 4), ("top-k", k)]
    prompt = torch.randint(5, MID["vocab_size"], (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _tiny_module().write_checkpoint(Path(tmp) / "mid", MID, seed=0, tokenizer=False)
        for routing, skew in (("uniform", 0.0), ("skewed", a.skew)):
            if routing == "skewed" and not skew:
                continue
            base = run_one(ckpt, a.device, None, "lfu", a.steps, prompt, skew, a.runs)
            rows.append(dict(routing=routing, budget="resident (no store)", policy="-", **base, identical=True))
            for name, n in budgets:
                for policy in ("lfu", "lru"):
                    r = run_one(ckpt, a.device, n, policy, a.steps, prompt, skew, a.runs)
                    r["identical"] = r["tokens"] == base["tokens"]
                    rows.append(dict(routing=routing, budget=f"{name} ({n}/{E})", policy=policy, **r))
    cuda = a.device == "cuda"
    head = ["routing", "experts per layer", "policy", "MB moved / step", "hit rate", "misses / step",
            "copy ms / step", "stall ms / step", *(["overlap"] if cuda else []), "ms / step", "identical"]
    print(f"bench_offload: {a.device}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; mid-size random checkpoint (8 layers, {E} experts, top-{k}, "
          f"canvas {MID['canvas_length']}), prompt {a.prompt_len}, {a.steps} steps, skew {a.skew}, "
          f"median of {a.runs} runs")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

        cells = [r["routing"], r["budget"], r["policy"], f("bytes_per_step", ".0f") if "bytes_per_step" not in r
                 else f"{r['bytes_per_step'] / 1e6:.2f}", f("hit_rate", ".3f"), f("misses_per_step", ".1f"),
                 f("copy_ms_per_step", ".1f"), f("stall_ms_per_step", ".1f"),
                 *([f("overlap", ".2f")] if cuda else []), f"{r['ms_per_step']:.1f}", "yes" if r["identical"] else "NO"]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        for r in rows:
            r.pop("tokens", None)
        a.json.write_text(json.dumps({"device": a.device, "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
