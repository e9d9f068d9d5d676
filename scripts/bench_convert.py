#!/usr/bin/env python
"""Benchmark the streaming NVFP4 converter at the real 26B widths: peak RSS and seconds per layer.

Writes a synthetic bf16 checkpoint with the released config's geometry but 2 layers (one sliding, one full:
hidden 2816, 128 experts of 704, vocab 262144, 16 heads of 256 / 512), random weights and a small BPE tokenizer,
then converts it with `dgemma-convert nvfp4`'s library function in a child process per run (so the child's own
peak RSS is measured: `resource.getrusage(RUSAGE_SELF).ru_maxrss`). The memory bound checked is
2 x the largest layer's bf16 bytes + 1 GB. Seconds per layer are extrapolated to the 30-layer model
(30 x mean seconds per layer + the fixed part: setup, embedding copy, calibration inputs, tail).

    python scripts/bench_convert.py [--workdir DIR] [--runs rtn,mse] [--calib-samples 16] [--keep]

Prints a table and one JSON object (last line). The machine may be shared: the load average is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "models" / "diffusiongemma-26B-A4B-it"
LAYERS = ["sliding_attention", "full_attention"]
TOKENIZER_VOCAB = 2048


def write_synthetic(out: Path, seed: int = 0) -> dict:
    """The 2-layer real-width bf16 checkpoint, streamed to disk (one tensor generated at a time, in pieces)."""
    from dgemma.converter.nvfp4_export import OutTensor, ShardWriter
    from dgemma.runtime.config import DGConfig
    from dgemma.runtime.hf_names import checkpoint_tensors

    out.mkdir(parents=True, exist_ok=True)
    cfg_raw = json.loads((REAL / "config.json").read_text())
    cfg_raw["text_config"]["num_hidden_layers"] = len(LAYERS)
    cfg_raw["text_config"]["layer_types"] = LAYERS
    (out / "config.json").write_text(json.dumps(cfg_raw, indent=2))
    shutil.copy(REAL / "generation_config.json", out / "generation_config.json")
    cfg = DGConfig.from_pretrained(out)
    specs = checkpoint_tensors(cfg)
    plan = [OutTensor(s.name, "BF16", s.shape) for s in specs]
    writer = ShardWriter(out, plan, shard_bytes=2_000_000_000)
    g = torch.Generator().manual_seed(seed)
    for s in specs:
        writer.begin_raw(s.name)
        if len(s.shape) == 1 or s.component == "scalars":  # norms, router scales, layer scalars: around 1
            t = (1.0 + 0.1 * torch.randn(s.shape, generator=g)).to(torch.bfloat16)
            writer.write_bytes(t.view(torch.uint8).numpy())
        else:
            fan_in = s.shape[-1]
            std = 0.02 if s.component == "embedding" else fan_in ** -0.5
            rows = s.shape[0] if len(s.shape) == 2 else s.shape[0] * s.shape[1]
            step = max(1, (32 << 20) // fan_in)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                t = (torch.randn(n, fan_in, generator=g) * std).to(torch.bfloat16)
                writer.write_bytes(t.view(torch.uint8).numpy())
        writer.end_raw()
    writer.close()
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dg_make_tiny_tokenizer", ROOT / "scripts" / "make_tiny_tokenizer.py")
    tok = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tok)
    tok.write_tiny_tokenizer(out, TOKENIZER_VOCAB)
    layer_bytes = [sum(2 * s.numel for s in specs if s.layer == i) for i in range(len(LAYERS))]
    return {"checkpoint_bytes": sum(2 * s.numel for s in specs), "layer_bf16_bytes": layer_bytes}


def child(src: str, dst: str, search: str, samples: int) -> None:
    """One conversion; prints a JSON line with its timings and this process's peak RSS."""
    from dgemma.converter.nvfp4_export import ConvertOptions, convert_nvfp4

    t0 = time.perf_counter()
    rep = convert_nvfp4(src, dst, ConvertOptions(preset="experts", scale_search=search, calib_samples=samples,
                                                 progress=False, force=True))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "layer_seconds": rep.layer_seconds, "peak_rss": peak,
                      "bytes_written": rep.bytes_written, "layer_errors": rep.layer_errors,
                      "calibration": rep.calibration, "starved_experts": {str(k): len(v) for k, v in
                                                                          rep.starved_experts.items()}}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--runs", default="rtn,mse", help="scale searches to run, comma-separated")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the outputs")
    ap.add_argument("--child", nargs=4, metavar=("SRC", "DST", "SEARCH", "SAMPLES"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.child[1], a.child[2], int(a.child[3]))
        return 0
    work = a.workdir or Path(tempfile.mkdtemp(prefix="dgemma-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "synthetic-bf16"
    t0 = time.perf_counter()
    info = write_synthetic(src)
    print(f"wrote the synthetic checkpoint ({info['checkpoint_bytes'] / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    bound = 2 * max(info["layer_bf16_bytes"]) + 1e9
    results = {}
    try:
        for search in a.runs.split(","):
            load_before = os.getloadavg()
            p = subprocess.run([sys.executable, __file__, "--child", str(src), str(work / f"out-{search}"), search,
                                str(a.calib_samples)], capture_output=True, text=True)
            if p.returncode != 0:
                print(p.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(p.stdout.strip().splitlines()[-1])
            per_layer = sum(r["layer_seconds"]) / len(r["layer_seconds"])
            fixed = r["seconds"] - sum(r["layer_seconds"])
            r.update(load_avg_before=load_before, load_avg_after=os.getloadavg(), seconds_per_layer=per_layer,
                     extrapolated_30_layers_s=fixed + 30 * per_layer, peak_rss_bound=bound,
                     within_bound=r["peak_rss"] <= bound)
            results[search] = r
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nlargest layer bf16: {max(info['layer_bf16_bytes']) / 1e9:.3f} GB -> RSS bound {bound / 1e9:.2f} GB; "
          f"{os.cpu_count()} CPUs")
    print(f"{'search':<6} {'peak RSS GB':>11} {'bound ok':>8} {'s/layer':>8} {'30 layers (h)':>13} {'total s':>8} "
          f"{'dec err L0/L1':>14} {'load avg':>9}")
    for k, r in results.items():
        errs = "/".join(f"{e['dec_rel']:.3f}" for e in r["layer_errors"])
        print(f"{k:<6} {r['peak_rss'] / 1e9:>11.2f} {str(r['within_bound']):>8} {r['seconds_per_layer']:>8.0f} "
              f"{r['extrapolated_30_layers_s'] / 3600:>13.2f} {r['seconds']:>8.0f} {errs:>14} "
              f"{r['load_avg_after'][0]:>9.1f}")
    print(json.dumps({"synthetic": info, "results": results}))
    return 0 if all(r["within_bound"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
