#!/usr/bin/env python
"""Print, per dgemma Triton kernel and NVIDIA target, the ptxas resource usage and PTX instruction checks.

Runs on a CPU-only machine: each kernel is compiled ahead of time with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` at the real DiffusionGemma-26B shapes (tiles as the wrappers pick them), then
Triton's bundled ptxas is run with ``-v`` and Triton's own flags. Columns:

- regs: registers per thread; spill: spill stores / loads in bytes (must be 0); smem: shared memory bytes;
- mma: tensor-core instructions in the PTX (mma.sync on sm_89/120, wgmma on sm_90);
- v4: 16-byte vector global loads (ld.global.v4); cp16: 16-byte cp.async global->shared copies (pipelined
  dot operands travel this way instead of through ld.global).

Usage: python scripts/kernel_report.py [--targets 89,90,120] [--only SUBSTRING] [--json out.json] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--targets", default="89,90,120", help="comma-separated compute capabilities")
    ap.add_argument("--only", default="", help="only kernels whose name contains this")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this path")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)

    try:
        from dgemma.kernels.aot import analyze, kernel_specs
    except Exception as exc:
        print(f"cannot import dgemma.kernels.aot: {exc}", file=sys.stderr)
        return 2
    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    specs = [s for s in kernel_specs() if args.only in s.name]

    rows = []
    if args.markdown:
        print("| kernel | sm | regs | spill st/ld (B) | smem (B) | mma | ld.v4 | cp.async 16B | ok |")
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print(f"{'kernel':36s} {'sm':>4s} {'regs':>5s} {'spill st/ld':>11s} {'smem':>7s} {'mma':>5s} {'v4':>4s} "
              f"{'cp16':>5s}  status")  # fmt: skip
    t0 = time.time()
    n_bad = 0
    for spec in specs:
        for cc in targets:
            rep = analyze(spec, cc)
            rows.append(asdict(rep) | {"notes": spec.notes})
            n_bad += not rep.ok
            status = "ok" if rep.ok else "FAIL: " + "; ".join(rep.problems)
            spill = f"{rep.spill_stores}/{rep.spill_loads}"
            if args.markdown:
                print(f"| {rep.name} | {cc} | {rep.registers} | {spill} | {rep.shared} | {rep.mma} | {rep.ld_v4} | "
                      f"{rep.cp_async_16} | {status} |")  # fmt: skip
            else:
                print(f"{rep.name:36s} {cc:>4d} {rep.registers:>5d} {spill:>11s} {rep.shared:>7d} {rep.mma:>5d} "
                      f"{rep.ld_v4:>4d} {rep.cp_async_16:>5d}  {status}", flush=True)  # fmt: skip
    print(f"\n{len(rows)} kernel/target pairs, {n_bad} failing, {time.time() - t0:.1f} s", file=sys.stderr)
    notes = {s.name: s.notes for s in specs if s.notes}
    for name, note in notes.items():
        print(f"note {name}: {note}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
