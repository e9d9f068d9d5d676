"""Run Triton kernels under the CPU interpreter in a fresh subprocess (helper for tests/test_kernels_*.py).

Why a subprocess: Triton decides at *decoration* time (when ``dgemma.kernels`` is imported) whether a
``@triton.jit`` function is compiled or interpreted, from ``TRITON_INTERPRET`` in the environment. Setting it
inside the pytest process would depend on import order and leak into every other test; instead each kernel test
module re-runs itself as a script (``python test_kernels_x.py --interp-worker``) in a child process whose
environment has ``TRITON_INTERPRET=1``, runs its ``INTERP_CASES`` there and prints one JSON line of measured
errors that the parent's tests assert on. The package itself never reads or writes the variable.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

_MARK = "@@INTERP_RESULTS@@ "


def run_worker(test_file: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``test_file --interp-worker`` with TRITON_INTERPRET=1; return {case: metrics} (plus "_seconds")."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's one-time FutureWarning
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(test_file), "--interp-worker"], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(Path(test_file).parent))  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    results = json.loads(lines[-1][len(_MARK):])
    results["_seconds"] = time.time() - t0
    return results


def worker_main(cases: dict[str, Callable[[], dict[str, Any]]]) -> None:
    """Entry point inside the child: run every case, catching failures per case, print the JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "worker must run with TRITON_INTERPRET=1"
    out: dict[str, Any] = {}
    for name, fn in cases.items():
        t0 = time.time()
        try:
            res = fn()
        except Exception:
            res = {"error": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.time() - t0, 3)
        out[name] = res
    print(_MARK + json.dumps(out, default=_jsonable), flush=True)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    raise TypeError(f"not JSON serializable: {type(v)}")


def rel_errors(out: Any, ref: Any) -> dict[str, float]:
    """Max error and RMS error, both relative to the reference's max magnitude / RMS (float64)."""
    import torch

    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    diff = (o - r).abs()
    scale_max = max(r.abs().max().item(), 1e-30)
    scale_rms = max(r.pow(2).mean().sqrt().item(), 1e-30)
    return {
        "max_rel": diff.max().item() / scale_max,
        "rms_rel": diff.pow(2).mean().sqrt().item() / scale_rms,
        "finite": bool(torch.isfinite(o).all().item()),
        "nonzero_ref": bool((r != 0).any().item()),
    }


def check_case(results: dict[str, Any], name: str) -> dict[str, Any]:
    """Fetch one case's metrics; fail with the worker's traceback if it raised."""
    res = results.get(name)
    assert res is not None, f"case {name} missing from worker output"
    assert "error" not in res, f"case {name} raised in the interpreter:\n{res['error']}"
    print(f"{name}: {res}")
    return res
