#!/usr/bin/env python
"""Benchmark `dgemma-convert gguf` on a synthetic checkpoint with the real 26B widths (2 layers).

The checkpoint (hidden 2816, 16 heads, head_dim 256 / global 512, dense MLP 2112, 128 experts of 704, top-8,
vocab 262144, layers [sliding, full]) is written once in bf16 by a streaming safetensors writer (one tensor
generated and written at a time) and reused by later runs. Its tokenizer is the small test tokenizer; the
GGUF vocabulary is padded to 262144 entries as the converter does for short tokenizers.

Measured:
- the conversion to --type (default q4_k_m) in a child process: wall seconds, MB/s of source bf16 bytes,
  peak RSS of the child (ru_maxrss), per-layer seconds extrapolated to the 30-layer model;
- the Q4_K quantizer (ours) against gguf-py's Q8_0 quantizer on the same float32 slice of a real-width expert
  tensor (`--experts-slice` experts of the gate_up stack), elements per second.
The machine's load average is printed before and after: other jobs on a shared machine slow every number.

    python scripts/bench_convert_gguf.py [--work /tmp/dgemma_bench_gguf] [--type q4_k_m] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

S, F = "sliding_attention", "full_attention"
REAL = dict(
    hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
    global_head_dim=512, num_global_key_value_heads=2, layer_types=[S, F], sliding_window=1024, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, vocab_size=262144, canvas_length=256, full_partial_rotary=0.25,
)
TOKENIZER_VOCAB = 1024  # the test tokenizer; the converter pads the GGUF vocabulary to 262144


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _shapes(p: dict) -> tuple[dict[str, tuple[int, ...]], dict, dict]:
    """Every text tensor of the synthetic checkpoint (the stored-once HF layout)."""
    from dgemma.runtime.config import DGConfig
    from dgemma.runtime.hf_names import checkpoint_tensors

    tiny = _load_script("make_tiny_checkpoint")
    cfg_json, gen_json = tiny.make_config(p)
    cfg = DGConfig.from_dict(cfg_json, gen_json)
    return {t.name: t.shape for t in checkpoint_tensors(cfg)}, cfg_json, gen_json


def write_streaming_checkpoint(out: Path, p: dict, seed: int = 0) -> int:
    """One bf16 safetensors file written tensor by tensor (header first from the shapes, then each tensor
    generated in row chunks): RAM stays at one chunk. Returns the file size."""
    shapes, cfg_json, gen_json = _shapes(p)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(shapes)
    header, off = {}, 0
    for n in names:
        nb = int(np.prod(shapes[n])) * 2
        header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            shp = shapes[n]
            if len(shp) == 1 or n.endswith("layer_scalar") or n.endswith("per_expert_scale"):
                t = 1.0 + 0.1 * torch.randn(shp, generator=g)  # norms, scales
                f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                continue
            fan_in = shp[-1]
            rows = int(np.prod(shp[:-1]))
            step = max(1, (1 << 24) // fan_in)
            std = 0.2 if n.endswith("embed_tokens.weight") else fan_in**-0.5
            for r0 in range(0, rows, step):
                r = min(step, rows - r0)
                t = torch.randn(r, fan_in, generator=g) * std
                f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2))
    (out / "generation_config.json").write_text(json.dumps(gen_json, indent=2))
    _load_script("make_tiny_tokenizer").write_tiny_tokenizer(out, TOKENIZER_VOCAB)
    return (out / "model.safetensors").stat().st_size


_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from dgemma.converter.gguf_export import GGUFExportOptions, export_gguf
if int(sys.argv[4]) > 0:
    torch.set_num_threads(int(sys.argv[4]))
t0 = time.perf_counter()
res = export_gguf(GGUFExportOptions(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], force=True))
print(json.dumps({"seconds": time.perf_counter() - t0, "source_bytes": res.source_bytes,
                  "file_bytes": res.file_bytes, "types": res.type_counts, "n_tensors": res.n_tensors,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _real_text_bytes() -> int:
    """bf16 bytes of the 26B checkpoint's text tensors (config in models/)."""
    from dgemma.runtime.config import DGConfig
    from dgemma.runtime.hf_names import checkpoint_tensors

    cfg = DGConfig.from_pretrained(Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-26B-A4B-it")
    return 2 * sum(t.numel for t in checkpoint_tensors(cfg))


def bench_quantizers(src: Path, n_experts: int) -> list[tuple[str, float, int]]:
    """(name, elements/s, elements) for our Q4_K and gguf-py's Q8_0 on the same float32 expert slice."""
    import gguf

    from dgemma.converter.gguf_quants import QT, quantize
    from dgemma.runtime.safetensors_io import CheckpointFiles

    files = CheckpointFiles(src)
    w = files.get("model.decoder.layers.0.experts.gate_up_proj")[:n_experts].float().contiguous().numpy()
    files.close()
    x = w.reshape(-1, w.shape[-1])
    out = []
    imp = np.exp(np.random.default_rng(0).normal(0, 1.5, x.shape[1])).astype(np.float32)
    for name, fn in (
        ("Q8_0 gguf-py (gguf.quants.quantize)", lambda: gguf.quants.quantize(x, QT.Q8_0)),
        ("Q4_K dgemma (weight importance)", lambda: quantize(x, QT.Q4_K)),
        ("Q4_K dgemma (with importance)", lambda: quantize(x, QT.Q4_K, importance=imp)),
        ("Q6_K dgemma", lambda: quantize(x, QT.Q6_K)),
    ):
        t0 = time.perf_counter()
        fn()
        out.append((name, x.size / (time.perf_counter() - t0), x.size))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dgemma_bench_gguf"))
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--experts-slice", type=int, default=8, help="experts of the gate_up stack in the quantizer test")
    ap.add_argument("--keep", action="store_true", help="keep the output GGUF")
    ap.add_argument("--skip-convert", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in the converter (0: torch's default); 1 avoids stalls on a busy machine")
    a = ap.parse_args(argv)
    src, out = a.work / "src", a.work / f"synthetic-{a.type}.gguf"
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}  torch threads: {torch.get_num_threads()}")
    if not (src / "model.safetensors").is_file():
        t0 = time.perf_counter()
        size = write_streaming_checkpoint(src, REAL)
        print(f"wrote synthetic checkpoint {src}: {size / 1e9:.2f} GB bf16 in {time.perf_counter() - t0:.1f} s "
              f"(peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")
    else:
        print(f"reusing {src}")
    if not a.skip_convert:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), a.type, str(a.threads)], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-4000:])
            return r.returncode
        res = json.loads(r.stdout.strip().splitlines()[-1])
        secs, mb = res["seconds"], res["source_bytes"] / 1e6
        print(f"--type {a.type}: {res['n_tensors']} tensors {res['types']}")
        print(f"  source {mb:.0f} MB bf16 -> {res['file_bytes'] / 1e6:.0f} MB GGUF in {secs:.1f} s = "
              f"{mb / secs:.1f} MB/s; peak RSS {res['maxrss_kb'] / 1e6:.2f} GB")
        real_bytes = _real_text_bytes()
        print(f"  at this rate the 26B model ({real_bytes / 1e9:.1f} GB bf16 text tensors) takes "
              f"~{real_bytes / 1e6 / (mb / secs) / 60:.0f} min")
        if not a.keep:
            out.unlink(missing_ok=True)
    print(f"quantizer throughput on {a.experts_slice} experts of layer 0 gate_up ([{a.experts_slice}, 1408, 2816] fp32):")
    for name, eps, n in bench_quantizers(src, a.experts_slice):
        print(f"  {name:<38} {eps / 1e6:8.2f} M elements/s  ({n / 1e6:.1f} M elements)")
    print(f"load average after: {os.getloadavg()}")
    if a.keep:
        print(f"kept {a.work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
