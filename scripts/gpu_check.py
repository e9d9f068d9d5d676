#!/usr/bin/env python
"""One-shot GPU check of dgemma's Triton kernels at the real DiffusionGemma-26B-A4B shapes.

Measures the card's copy bandwidth, runs every kernel at the real shapes (canvas 256; hidden 2816; experts
gate_up 1408x2816 and down 2816x704 over 128 experts, top-8; vocabulary 262144), checks each against its torch
twin in bf16, times it (median of triton.testing.do_bench, L2 flushed between runs), and prints achieved GB/s
as a fraction of the measured copy bandwidth, plus per-layer and per-denoising-step estimates built from the
measured pieces. Prints a table and writes JSON (rewritten after every section, so a crash keeps what ran).

Built to run once, unattended: every section is isolated (an exception is recorded and the run goes on), memory
is released between sections, and a wall-clock budget skips the optional sections when time runs short.

Usage (repository root, CUDA machine):
    python scripts/gpu_check.py --out gpu_check.json
    python scripts/gpu_check.py --smoke        # CPU, tiny shapes, torch twins: exercises the script itself
If dgemma is not installed, the script maps the repository folders to the dgemma packages itself.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_dgemma() -> None:
    """Import dgemma.kernels; without an installed package, map the repo folders (pyproject's package-dir)."""
    try:
        import dgemma.kernels  # noqa: F401

        return
    except Exception:
        pass
    pkg_dirs = {"dgemma": ROOT / "dgemma", "dgemma.runtime": ROOT / "runtime", "dgemma.kernels": ROOT / "kernels"}
    for name, folder in pkg_dirs.items():
        if name == "dgemma":
            mod = types.ModuleType("dgemma")  # skip dgemma/__init__.py: it may import the whole runtime
            mod.__path__ = [str(folder)]
            sys.modules["dgemma"] = mod
            continue
        if name == "dgemma.runtime":  # only errors.py is needed
            mod = types.ModuleType(name)
            mod.__path__ = [str(folder)]
            sys.modules[name] = mod
            continue
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])  # fmt: skip
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)


# ---------------------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    canvas: int
    hidden: int
    moe_i: int
    experts: int
    topk: int
    vocab: int
    dense_i: int
    ctx: int  # committed context for the attention estimate
    linears: tuple[tuple[str, int, int], ...]  # (name, out N, in K)
    layers_sliding: int
    layers_full: int

    @staticmethod
    def real() -> "Shapes":
        h = 2816
        return Shapes(256, h, 704, 128, 8, 262144, 2112, 1024, (
            ("q_sliding", 4096, h), ("k_sliding", 2048, h), ("v_sliding", 2048, h), ("o_sliding", h, 4096),
            ("q_full", 8192, h), ("k_full", 1024, h), ("o_full", h, 8192),
            ("mlp_gate_up", 2112, h), ("mlp_down", h, 2112),
        ), 25, 5)  # fmt: skip

    @staticmethod
    def smoke() -> "Shapes":
        h = 64
        return Shapes(17, h, 32, 8, 2, 1000, 48, 32, (
            ("q_sliding", 64, h), ("k_sliding", 32, h), ("v_sliding", 32, h), ("o_sliding", h, 64),
            ("q_full", 128, h), ("k_full", 16, h), ("o_full", h, 128),
            ("mlp_gate_up", 48, h), ("mlp_down", h, 48),
        ), 2, 1)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# timing and reporting
# ---------------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def ms(self, fn: Callable[[], Any]) -> float:
        """Median runtime in ms (CUDA: do_bench, L2 flushed per run; CPU smoke: perf_counter, 3 runs)."""
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class Report:
    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.data: dict[str, Any] = {"env": {}, "bandwidth": {}, "kernels": [], "baselines": [], "estimates": {},
                                     "errors": [], "skipped": []}  # fmt: skip
        self.bw_gbs = float("nan")

    def add(self, table: str, name: str, shape: str, ms: float, nbytes: float | None,
            check: dict | None = None, **extra: Any) -> dict:  # fmt: skip
        gbs = nbytes / ms / 1e6 if nbytes and ms > 0 else float("nan")
        row = {"name": name, "shape": shape, "ms": ms, "bytes": nbytes, "GBps": gbs,
               "frac_of_copy_bw": gbs / self.bw_gbs if self.bw_gbs == self.bw_gbs else float("nan"),
               "check": check or {}, **extra}  # fmt: skip
        self.data[table].append(row)
        ok = (check or {}).get("ok")
        flag = "" if ok is None else ("PASS" if ok else "FAIL")
        frac = row["frac_of_copy_bw"]
        print(f"  {name:34s} {shape:34s} {ms:9.4f} ms {gbs:9.1f} GB/s {frac * 100:6.1f}% {flag}", flush=True)
        self.save()
        return row

    def error(self, section: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        print(f"  !! {section} failed: {msg}", flush=True)
        self.data["errors"].append({"section": section, "error": msg, "traceback": traceback.format_exc()[-4000:]})
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        tmp.replace(self.out)


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    o, r = out.detach().double(), ref.detach().double()
    d = (o - r).abs()
    return {"max_rel": (d.max() / r.abs().max().clamp_min(1e-30)).item(),
            "rms_rel": (d.pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-30)).item(),
            "finite": bool(torch.isfinite(o).all().item())}  # fmt: skip


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# random weights in the runtime layouts
# ---------------------------------------------------------------------------------------------------------------


def rand_nvfp4(shape_nk: tuple[int, ...], dev: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random packed codes, e4m3 scales as a calibrated weight would have (~1e-2 * 448 / 6), global scale."""
    *lead, n, k = shape_nk
    packed = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=dev, generator=gen)
    scales = (torch.rand((*lead, n, k // 16), device=dev, generator=gen) * 200 + 20).to(torch.float8_e4m3fn)
    s2 = torch.full(tuple(lead) if lead else (), 2e-5, dtype=torch.float32, device=dev)
    return packed, scales, s2


def nvfp4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * k // 16


# ---------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------


def sec_env(rep: Report, dev: torch.device) -> None:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(dev)}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"unavailable: {exc}"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env |= {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "memory_GiB": round(p.total_memory / 2**30, 1),
                "l2_MB": round(getattr(p, "L2_cache_size", 0) / 1e6, 1)}  # fmt: skip
    rep.data["env"] = env
    print("env:", env, flush=True)


def sec_bandwidth(rep: Report, bench: Bench, dev: torch.device, smoke: bool) -> None:
    n = (1 << 20) if smoke else (1 << 30)  # 1 GiB source: far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench.ms(lambda: dst.copy_(src))
    gbs = 2 * n / ms / 1e6
    rep.bw_gbs = gbs
    rep.data["bandwidth"] = {"copy_bytes": n, "ms": ms, "GBps_read_plus_write": gbs}
    print(f"copy bandwidth: {gbs:.1f} GB/s (read + write of {n / 1e9:.2f} GB in {ms:.3f} ms)", flush=True)
    del src, dst
    free()


def sec_nvfp4_linears(rep: Report, bench: Bench, k: Any, sh: Shapes, dev: torch.device, gen, timings: dict) -> None:
    m = sh.canvas
    x = (torch.randn((m, sh.hidden * 4), device=dev, generator=gen) * 0.5).to(torch.bfloat16)
    for name, n, kk in sh.linears:
        try:
            w, s, s2 = rand_nvfp4((n, kk), dev, gen)
            xi = x[:, :kk].contiguous()
            y = k.nvfp4_linear(xi, w, s, s2)
            ref = k.nvfp4_linear_torch(xi, w, s, s2)
            chk = rel_err(y, ref)
            chk["ok"] = chk["finite"] and chk["max_rel"] < 2e-2 and chk["rms_rel"] < 5e-3
            ms = bench.ms(lambda: k.nvfp4_linear(xi, w, s, s2))
            nbytes = nvfp4_bytes(n, kk) + m * kk * 2 + m * n * 2
            rep.add("kernels", f"nvfp4_linear:{name}", f"M={m} N={n} K={kk}", ms, nbytes, chk)
            timings[f"nvfp4:{name}"] = ms
            wb = (torch.randn((n, kk), device=dev, generator=gen) * 0.02).to(torch.bfloat16)
            ms_b = bench.ms(lambda: torch.nn.functional.linear(xi, wb))
            rep.add("baselines", f"torch_bf16_linear:{name}", f"M={m} N={n} K={kk}", ms_b, n * kk * 2 + m * (kk + n) * 2)
            timings[f"bf16:{name}"] = ms_b
            del w, s, s2, wb, y, ref
        except Exception as exc:
            rep.error(f"nvfp4_linear:{name}", exc)
        free()


def _routing(sh: Shapes, dev: torch.device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn((sh.canvas, sh.experts), device=dev, generator=gen)
    w, ids = torch.topk(logits.softmax(-1), sh.topk, dim=-1)
    return (w / w.sum(-1, keepdim=True)).float(), ids


def sec_moe(rep: Report, bench: Bench, k: Any, sh: Shapes, dev: torch.device, gen, timings: dict, fmt: str) -> None:
    e, h, i, t = sh.experts, sh.hidden, sh.moe_i, sh.canvas
    if fmt == "nvfp4":
        ex = k.NVFP4Experts(*rand_nvfp4((e, 2 * i, h), dev, gen), *rand_nvfp4((e, h, i), dev, gen))
        wbytes_per_expert = nvfp4_bytes(2 * i, h) + nvfp4_bytes(h, i)
    else:
        ex = k.DenseExperts((torch.randn((e, 2 * i, h), device=dev, generator=gen) * 0.02).to(torch.bfloat16),
                            (torch.randn((e, h, i), device=dev, generator=gen) * 0.02).to(torch.bfloat16))  # fmt: skip
        wbytes_per_expert = 3 * h * i * 2
    x = torch.randn((t, h), device=dev, generator=gen).to(torch.bfloat16)
    w, ids = _routing(sh, dev, gen)
    used = int(torch.unique(ids).numel())
    y = k.fused_moe(x, w, ids, ex)
    ref = k.fused_moe_torch(x, w, ids, ex)
    chk = rel_err(y, ref)
    chk["ok"] = chk["finite"] and chk["max_rel"] < 3e-2 and chk["rms_rel"] < 8e-3
    ms = bench.ms(lambda: k.fused_moe(x, w, ids, ex))
    p = t * sh.topk
    act_bytes = t * h * 2 + p * i * 2 * 2 + p * h * 2 * 2 + t * h * 2  # x, h write+read, pair_out write+read, out
    row = rep.add("kernels", f"fused_moe:{fmt}", f"T={t} E={e} top{sh.topk} H={h} I={i}", ms,
                  used * wbytes_per_expert + act_bytes, chk, experts_used=used,
                  weight_bytes=used * wbytes_per_expert)  # fmt: skip
    row["weights_only_frac_of_copy_bw"] = used * wbytes_per_expert / ms / 1e6 / rep.bw_gbs
    timings[f"moe:{fmt}"] = ms
    del ex, x, y, ref
    free()


def sec_sampler(rep: Report, bench: Bench, k: Any, sh: Shapes, dev: torch.device, gen, timings: dict) -> None:
    m, v = sh.canvas, sh.vocab
    raw = (torch.randn((m, v), device=dev, generator=gen) * 8).to(torch.bfloat16)
    u = torch.rand((m,), device=dev, generator=gen)
    proc = torch.empty((m, v), dtype=torch.bfloat16, device=dev)
    # (a) raw bf16 lm_head logits, softcap in the kernel, processed bf16 logits written for self-conditioning
    o = k.sample_logits(raw, 0.8, u, softcap=30.0, processed_out=proc)
    r = k.sample_logits_torch(raw, 0.8, u, softcap=30.0)
    chk = {"argmax_equal": bool(torch.equal(o.argmax, r.argmax)),
           "entropy_abs": (o.entropy - r.entropy).abs().max().item(),
           "lse_abs": (o.logsumexp - r.logsumexp).abs().max().item(),
           "sample_agree": (o.sample == r.sample).float().mean().item()}  # fmt: skip
    chk["ok"] = chk["argmax_equal"] and chk["entropy_abs"] < 1e-3 and chk["lse_abs"] < 1e-3 and chk["sample_agree"] > 0.95
    ms = bench.ms(lambda: k.sample_logits(raw, 0.8, u, softcap=30.0, processed_out=proc))
    rep.add("kernels", "sampler:bf16+softcap+write", f"M={m} V={v}", ms, m * v * 2 * 2, chk, under_1ms=ms < 1.0)
    timings["sampler"] = ms
    # (b) fp32 softcapped logits (the HF-style input), statistics only
    lg = torch.tanh(raw.float() / 30.0) * 30.0
    o = k.sample_logits(lg, 0.8, u)
    r = k.sample_logits_torch(lg, 0.8, u)
    chk = {"argmax_equal": bool(torch.equal(o.argmax, r.argmax)),
           "entropy_abs": (o.entropy - r.entropy).abs().max().item(),
           "sample_agree": (o.sample == r.sample).float().mean().item()}  # fmt: skip
    chk["ok"] = chk["argmax_equal"] and chk["entropy_abs"] < 1e-3 and chk["sample_agree"] > 0.95
    ms = bench.ms(lambda: k.sample_logits(lg, 0.8, u))
    rep.add("kernels", "sampler:fp32", f"M={m} V={v}", ms, m * v * 4, chk, under_1ms=ms < 1.0)
    # peak extra memory of one sampler call (should be O(M), not O(M V))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        k.sample_logits(raw, 0.8, u, softcap=30.0, processed_out=proc)
        torch.cuda.synchronize()
        rep.data["kernels"][-1]["extra_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
    del raw, proc, lg
    free()


def sec_soft_embedding(rep: Report, bench: Bench, k: Any, sh: Shapes, dev: torch.device, gen, timings: dict) -> None:
    m, v, h = sh.canvas, sh.vocab, sh.hidden
    logits = (torch.randn((m, v), device=dev, generator=gen) * 6).to(torch.bfloat16)
    emb = (torch.randn((v, h), device=dev, generator=gen) * 0.03).to(torch.bfloat16)
    y = k.sc_soft_embedding(logits, emb, h**0.5)
    ref = k.sc_soft_embedding_torch(logits, emb, h**0.5)
    chk = rel_err(y, ref)
    chk["ok"] = chk["finite"] and chk["max_rel"] < 3e-2 and chk["rms_rel"] < 8e-3
    ms = bench.ms(lambda: k.sc_soft_embedding(logits, emb, h**0.5))
    rep.add("kernels", "sc_soft_embedding", f"M={m} V={v} H={h}", ms, v * h * 2 + 2 * m * v * 2, chk)
    timings["sc_soft"] = ms
    ms_b = bench.ms(lambda: torch.matmul(logits, emb))  # lm_head-sized bf16 GEMM as a yardstick
    rep.add("baselines", "torch_bf16_matmul[M,V]@[V,H]", f"M={m} V={v} H={h}", ms_b, v * h * 2 + m * v * 2)
    ms_l = bench.ms(lambda: torch.nn.functional.linear(y, emb))  # the tied lm_head: [M, H] @ E^T
    rep.add("baselines", "torch_bf16_lm_head", f"M={m} H={h} V={v}", ms_l, v * h * 2 + m * v * 2)
    timings["lm_head"] = ms_l
    del logits, emb, y, ref
    free()


def sec_small_ops(rep: Report, bench: Bench, k: Any, sh: Shapes, dev: torch.device, gen, timings: dict) -> None:
    m, h = sh.canvas, sh.hidden
    x = torch.randn((m, h), device=dev, generator=gen).to(torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn((h,), device=dev, generator=gen).to(torch.bfloat16)
    chk = rel_err(k.rmsnorm_residual(x, r, w), k.rmsnorm_residual_torch(x, r, w))
    chk["ok"] = chk["finite"] and chk["max_rel"] < 1e-2
    ms = bench.ms(lambda: k.rmsnorm_residual(x, r, w))
    rep.add("kernels", "rmsnorm_residual", f"[{m}, {h}]", ms, 3 * m * h * 2 + h * 2, chk)
    timings["rmsnorm"] = ms
    # torch pieces of a layer that have no dgemma kernel: router, gelu*up of the dense MLP, attention
    rw = (torch.randn((sh.experts, h), device=dev, generator=gen) * 0.02).to(torch.bfloat16)

    def router() -> Any:
        p = torch.nn.functional.linear(x, rw).float().softmax(-1)
        return torch.topk(p, sh.topk, dim=-1)

    timings["router"] = bench.ms(router)
    rep.add("baselines", "torch_router(linear+softmax+topk)", f"[{m}, {h}] x {sh.experts}", timings["router"], None)
    g = torch.randn((m, 2 * sh.dense_i), device=dev, generator=gen).to(torch.bfloat16)
    timings["gelu_mul"] = bench.ms(lambda: torch.nn.functional.gelu(g[:, : sh.dense_i], approximate="tanh") * g[:, sh.dense_i :])
    rep.add("baselines", "torch_gelu_mul", f"[{m}, {sh.dense_i}]", timings["gelu_mul"], m * sh.dense_i * 2 * 3)
    for label, heads_kv, hd in (("sliding", 8, 256), ("full", 2, 512)):
        try:
            q = torch.randn((1, 16, m, hd), device=dev, generator=gen).to(torch.bfloat16)
            kv = torch.randn((1, heads_kv, sh.ctx + m, hd), device=dev, generator=gen).to(torch.bfloat16)
            kv_rep = kv.repeat_interleave(16 // heads_kv, dim=1)  # GQA by expansion: works on every torch
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kv_rep, kv_rep, scale=1.0)  # noqa: E731
            timings[f"attn:{label}"] = bench.ms(fn)
            rep.add("baselines", f"torch_sdpa:{label}", f"q16x{m}x{hd} kv{heads_kv}x{sh.ctx + m}", timings[f"attn:{label}"],
                    None)  # fmt: skip
        except Exception as exc:
            rep.error(f"sdpa:{label}", exc)
    free()


def sec_gguf(rep: Report, bench: Bench, k: Any, sh: Shapes, dev: torch.device, gen) -> None:
    import importlib

    gd = importlib.import_module("dgemma.kernels.gguf_dequant")

    cuda = dev.type == "cuda"
    rows, cols = (8 * 1408, sh.hidden) if sh.canvas == 256 else (16, 256)
    for name in gd.SUPPORTED_TYPES:
        try:
            qk, nb = gd.block_layout(name)
            n_blocks = rows * cols // qk
            raw = torch.randint(0, 256, (n_blocks, nb), dtype=torch.uint8, device=dev, generator=gen)

            def f16() -> torch.Tensor:  # finite fp16 super-scales as [n_blocks, 2] bytes
                d = (torch.randn((n_blocks,), device=dev, generator=gen) * 0.01).to(torch.float16)
                return d.view(torch.uint8).view(n_blocks, 2)

            if name in ("Q8_0", "Q5_0"):
                raw[:, 0:2] = f16()
            elif name in ("Q4_K", "Q5_K"):
                raw[:, 0:2], raw[:, 2:4] = f16(), f16()
            elif name == "Q6_K":
                raw[:, 208:210] = f16()
            elif name == "MXFP4":  # E8M0 exponents near 2^0: random bytes would overflow to inf
                raw[:, 0] = torch.randint(115, 131, (n_blocks,), dtype=torch.uint8, device=dev, generator=gen)
            raw = raw.reshape(-1)
            chk: dict[str, Any] = {}
            few_rows = min(64, rows)
            few = raw[: few_rows * (cols // qk) * nb]
            try:  # gguf-py may be missing on the GPU machine: then only time the kernel
                ref = gd.gguf_dequantize_torch(few.cpu(), name, (few_rows, cols))
                out = k.gguf_dequantize(few, name, (few_rows, cols), torch.float32).cpu()
                chk = rel_err(out, ref)
                chk["ok"] = chk["finite"] and chk["max_rel"] < 1e-5
            except ImportError as exc:
                chk = {"skipped": f"gguf-py unavailable: {exc}"}
            buf = torch.empty((rows, cols), dtype=torch.bfloat16, device=dev)
            if cuda:
                fn = lambda: gd.gguf_dequantize(raw, name, (rows, cols), torch.bfloat16, out=buf)  # noqa: E731
            else:
                fn = lambda: k.gguf_dequantize(raw, name, (rows, cols), torch.bfloat16)  # noqa: E731
            ms = bench.ms(fn)
            rep.add("kernels", f"gguf_dequant:{name}", f"[{rows}, {cols}] -> bf16", ms, raw.numel() + buf.numel() * 2, chk)
            del raw, buf
        except Exception as exc:
            rep.error(f"gguf_dequant:{name}", exc)
        free()


# ---------------------------------------------------------------------------------------------------------------
# estimates
# ---------------------------------------------------------------------------------------------------------------


def estimates(rep: Report, sh: Shapes, t: dict[str, float]) -> None:
    """Per-layer and per-step time from the measured pieces (sequential sum, no overlap, no launch gaps)."""

    def lin(kind: str, name: str) -> float:
        return t.get(f"{kind}:{name}", float("nan"))

    out: dict[str, Any] = {"assumptions": (
        f"canvas {sh.canvas}, committed context {sh.ctx}; {sh.layers_sliding} sliding + {sh.layers_full} full layers; "
        "a layer = 7 RMSNorms (each timed as rmsnorm_residual) + q/k/v/o + attention (torch SDPA) + dense MLP "
        "(gate, up, gelu*up, down) + router + MoE; a step = layers + final norm + lm_head (bf16) + sampler + "
        "SC soft embedding + SC MLP (dense-MLP shapes) + 2 norms. Sequential sum of medians: no overlap, no "
        "launch overhead, elementwise residual/scalar ops not counted.")}  # fmt: skip
    for variant, kind in (("A_experts_nvfp4_rest_bf16", "bf16"), ("C_experts_attn_mlp_nvfp4", "nvfp4")):
        mlp = 2 * lin(kind, "mlp_gate_up") + lin(kind, "mlp_down") + t.get("gelu_mul", float("nan"))
        common = 7 * t.get("rmsnorm", float("nan")) + mlp + t.get("router", float("nan")) + t.get("moe:nvfp4", float("nan"))
        sliding = common + sum(lin(kind, f"{p}_sliding") for p in "qkvo") + t.get("attn:sliding", float("nan"))
        full = common + lin(kind, "q_full") + lin(kind, "k_full") + lin(kind, "o_full") + t.get("attn:full", float("nan"))
        step = (sh.layers_sliding * sliding + sh.layers_full * full + 3 * t.get("rmsnorm", float("nan"))
                + t.get("lm_head", float("nan")) + t.get("sampler", float("nan")) + t.get("sc_soft", float("nan"))
                + mlp)  # fmt: skip
        out[variant] = {"layer_sliding_ms": sliding, "layer_full_ms": full, "step_ms": step,
                        "moe_share_of_layer": t.get("moe:nvfp4", float("nan")) / sliding}  # fmt: skip
    # bandwidth floor of a step in scenario A (17.67 GB per performance.md §2) at the measured copy bandwidth
    out["floor_ms_17.67GB_at_copy_bw"] = 17.67e9 / (rep.bw_gbs * 1e9) * 1e3 if rep.bw_gbs == rep.bw_gbs else None
    rep.data["estimates"] = out
    print("\nestimates:")
    for key, val in out.items():
        print(f"  {key}: {val}")
    rep.save()


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="dgemma GPU kernel check (bandwidth, correctness, timing)")
    ap.add_argument("--out", default="gpu_check.json", help="JSON output path")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch twins (tests the script)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip optional sections past this wall time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.time()

    _import_dgemma()

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: nothing to check (use --smoke to exercise the script on the CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    sh = Shapes.real() if cuda else Shapes.smoke()
    # smoke: the twins stand in for the kernels, so the script's own logic is what gets exercised
    k = _ops(cuda)
    rep = Report(Path(args.out))
    bench = Bench(cuda)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    timings: dict[str, float] = {}

    sections: list[tuple[str, bool, Callable[[], None]]] = [
        ("env", True, lambda: sec_env(rep, dev)),
        ("bandwidth", True, lambda: sec_bandwidth(rep, bench, dev, not cuda)),
        ("fused_moe:nvfp4", True, lambda: sec_moe(rep, bench, k, sh, dev, gen, timings, "nvfp4")),
        ("sampler", True, lambda: sec_sampler(rep, bench, k, sh, dev, gen, timings)),
        ("nvfp4_linears", True, lambda: sec_nvfp4_linears(rep, bench, k, sh, dev, gen, timings)),
        ("small_ops", True, lambda: sec_small_ops(rep, bench, k, sh, dev, gen, timings)),
        ("sc_soft_embedding", True, lambda: sec_soft_embedding(rep, bench, k, sh, dev, gen, timings)),
        ("fused_moe:bf16", False, lambda: sec_moe(rep, bench, k, sh, dev, gen, timings, "bf16")),
        ("gguf_dequant", False, lambda: sec_gguf(rep, bench, k, sh, dev, gen)),
    ]
    print(f"{'':2s}{'kernel':34s} {'shape':34s} {'median':>12s} {'achieved':>14s} {'of copy':>7s}")
    for name, required, fn in sections:
        if not required and time.time() - t_start > args.budget_s:
            rep.data["skipped"].append(name)
            print(f"  -- {name} skipped (budget {args.budget_s:.0f} s spent)", flush=True)
            continue
        print(f"[{name}] t={time.time() - t_start:.0f}s", flush=True)
        try:
            fn()
        except Exception as exc:
            rep.error(name, exc)
        free()
    try:
        estimates(rep, sh, timings)
    except Exception as exc:
        rep.error("estimates", exc)

    fails = [r["name"] for r in rep.data["kernels"] if r["check"].get("ok") is False]
    rep.data["summary"] = {"wall_s": time.time() - t_start, "failed_checks": fails, "errors": len(rep.data["errors"])}
    rep.save()
    print(f"\nsummary: {rep.data['summary']}\nJSON: {args.out}")
    return 1 if fails or rep.data["errors"] else 0


def _ops(cuda: bool) -> types.SimpleNamespace:
    """The callables the sections use: Triton wrappers (CUDA) or, for --smoke, the twins under the same names."""
    import importlib

    nv = importlib.import_module("dgemma.kernels.nvfp4_gemm")
    moe = importlib.import_module("dgemma.kernels.fused_moe")
    smp = importlib.import_module("dgemma.kernels.sampler")
    rms = importlib.import_module("dgemma.kernels.rmsnorm")
    gd = importlib.import_module("dgemma.kernels.gguf_dequant")
    ns = types.SimpleNamespace(
        NVFP4Experts=moe.NVFP4Experts, DenseExperts=moe.DenseExperts,
        nvfp4_linear_torch=nv.nvfp4_linear_torch, fused_moe_torch=moe.fused_moe_torch,
        sample_logits_torch=smp.sample_logits_torch, sc_soft_embedding_torch=smp.sc_soft_embedding_torch,
        rmsnorm_residual_torch=rms.rmsnorm_residual_torch, gguf_dequantize_torch=gd.gguf_dequantize_torch,
    )  # fmt: skip
    fast = {"nvfp4_linear": nv.nvfp4_linear, "fused_moe": moe.fused_moe, "sample_logits": smp.sample_logits,
            "sc_soft_embedding": smp.sc_soft_embedding, "rmsnorm_residual": rms.rmsnorm_residual,
            "gguf_dequantize": gd.gguf_dequantize}  # fmt: skip
    for name, fn in fast.items():
        setattr(ns, name, fn if cuda else getattr(ns, f"{name}_torch"))
    return ns


if __name__ == "__main__":
    raise SystemExit(main())
