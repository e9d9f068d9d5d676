"""The kernel scripts run: gpu_check.py end to end in --smoke mode (CPU, tiny shapes, twins standing in for the
kernels; the real run needs a CUDA machine) and kernel_report.py on one kernel."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_dg_kernel_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = _script("gpu_check").main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0, data["errors"]
    names = {r["name"] for r in data["kernels"]}
    for expected in ("fused_moe:nvfp4", "fused_moe:bf16", "sampler:bf16+softcap+write", "sc_soft_embedding",
                     "rmsnorm_residual", "nvfp4_linear:q_sliding", "gguf_dequant:NVFP4"):  # fmt: skip
        assert expected in names
    assert all(r["check"].get("ok", True) for r in data["kernels"])
    assert data["estimates"]["A_experts_nvfp4_rest_bf16"]["step_ms"] > 0


def test_kernel_report_one_kernel(capsys):
    pytest.importorskip("triton")
    rc = _script("kernel_report").main(["--only", "rmsnorm[d256", "--targets", "89"])
    out = capsys.readouterr().out
    assert rc == 0 and "rmsnorm[d256_noscale]" in out
