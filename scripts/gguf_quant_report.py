"""Report dgemma's GGUF quantizers: relative RMSE per type and quantizer throughput on a real-size expert slab.

    /work/venv/bin/python scripts/gguf_quant_report.py [--experts 4] [--rows 64] [--seed 0]

RMSE: Gaussian and Student-t(3) weights (rows x 2816), with and without a per-column importance vector
(log-normal, like mean squared activations). Both the plain and the importance-weighted relative RMSE are shown.
Throughput: MB/s of float32 input for each quantizer on `--experts` experts of the 26B model's fused gate/up
slab, torch shape (E, 1408, 2816) (ne0 = 2816, a multiple of 256), and Q8_0 / Q5_0 also on the down slab
(E, 2816, 704). Q8_0, Q5_0 and MXFP4 are gguf-py's quantizers; Q4_K, Q5_K, Q6_K and NVFP4 are dgemma's.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as QT

from dgemma.converter import gguf_quants as gq

RMSE_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q5_0, QT.MXFP4, QT.NVFP4)


def _quant_dequant(x: np.ndarray, t: QT, importance: np.ndarray | None = None) -> np.ndarray:
    if t == QT.NVFP4:
        g = gq.nvfp4_global_scale(x, n_lead=x.ndim - 2 if x.ndim > 2 else 0)
        q = gq.quantize(x, t, importance=importance, global_scale=g)
        return gq.dequantize(q, t) * (g.reshape(-1, *([1] * (x.ndim - 1))) if x.ndim > 2 else g)
    return gq.dequantize(gq.quantize(x, t, importance=importance), t)


def _rel(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones_like(x) if w is None else np.broadcast_to(w, x.shape)
    return float(np.sqrt(((y - x) ** 2 * w).sum() / ((x**2) * w).sum()))


def rmse_table(rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    C = 2816
    imp = rng.lognormal(0.0, 1.5, C).astype(np.float32)
    data = {
        "gauss": (rng.standard_normal((rows, C)) * 0.02).astype(np.float32),
        "t3": (rng.standard_t(3, (rows, C)) * 0.02).astype(np.float32),
    }
    print(f"relative RMSE ({rows} x {C}); importance = per-column log-normal(0, 1.5)")
    print(f"{'dist':<7}{'type':<7}{'plain':>10}{'weighted':>10}{'plain+imp':>11}{'weighted+imp':>14}")
    for dist, x in data.items():
        for t in RMSE_TYPES:
            y0 = _quant_dequant(x, t)
            y1 = _quant_dequant(x, t, imp)
            vals = (_rel(x, y0), _rel(x, y0, imp), _rel(x, y1), _rel(x, y1, imp))
            print(f"{dist:<7}{t.name:<7}{vals[0]:>10.4f}{vals[1]:>10.4f}{vals[2]:>11.4f}{vals[3]:>14.4f}")
    print()


def _throughput(x: np.ndarray, t: QT, repeat: int) -> float:
    kw = {"global_scale": gq.nvfp4_global_scale(x)} if t == QT.NVFP4 else {}
    gq.quantize(x[:1, :8], t, **({"global_scale": kw["global_scale"][:1]} if kw else {}))  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        gq.quantize(x, t, **kw)
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e6


def throughput_table(experts: int, seed: int, repeat: int) -> None:
    rng = np.random.default_rng(seed)
    gate_up = (rng.standard_normal((experts, 1408, 2816)) * 0.02).astype(np.float32)
    down = (rng.standard_normal((experts, 2816, 704)) * 0.02).astype(np.float32)
    print(f"quantizer throughput, MB/s of float32 input (best of {repeat}; single process)")
    print(f"{'tensor':<34}{'type':<7}{'impl':<9}{'MB/s':>8}")
    slab = f"gate_up slab {tuple(gate_up.shape)}"
    for t in (QT.Q4_K, QT.Q8_0, QT.Q5_K, QT.Q6_K, QT.NVFP4, QT.MXFP4, QT.Q5_0):
        impl = "gguf-py" if t in (QT.Q8_0, QT.MXFP4, QT.Q5_0) else "dgemma"
        print(f"{slab:<34}{t.name:<7}{impl:<9}{_throughput(gate_up, t, repeat):>8.1f}")
    slab = f"down slab {tuple(down.shape)}"
    for t in (QT.Q8_0, QT.Q5_0):
        print(f"{slab:<34}{t.name:<7}{'gguf-py':<9}{_throughput(down, t, repeat):>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=4, help="experts in the throughput slab (default 4)")
    ap.add_argument("--rows", type=int, default=64, help="rows of the RMSE test matrices (default 64)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repetitions, best kept (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rmse_table(a.rows, a.seed)
    throughput_table(a.experts, a.seed, a.repeat)


if __name__ == "__main__":
    main()
