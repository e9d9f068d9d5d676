"""Precision policy: which tensors become NVFP4 per preset, and the plan sizes for the real 26B config."""
from __future__ import annotations

from pathlib import Path

import pytest

from dgemma.converter import policy
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import DGemmaError
from dgemma.runtime.hf_names import TensorSpec, checkpoint_tensors

REAL = Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-26B-A4B-it"


@pytest.fixture(scope="module")
def cfg() -> DGConfig:
    return DGConfig.from_pretrained(REAL)


def _fmt(cfg: DGConfig, preset: str, suffix: str) -> str:
    specs = [s for s in checkpoint_tensors(cfg) if s.name.endswith(suffix)]
    assert specs, suffix
    fmts = {policy.precision_for(s, preset) for s in specs}
    assert len(fmts) == 1, (suffix, fmts)
    return fmts.pop()


@pytest.mark.parametrize(
    "suffix,experts,default",
    [
        ("experts.gate_up_proj", "nvfp4", "nvfp4"),
        ("experts.down_proj", "nvfp4", "nvfp4"),
        ("self_attn.q_proj.weight", "bf16", "nvfp4"),
        ("self_attn.k_proj.weight", "bf16", "nvfp4"),
        ("self_attn.v_proj.weight", "bf16", "nvfp4"),
        ("self_attn.o_proj.weight", "bf16", "nvfp4"),
        ("mlp.gate_proj.weight", "bf16", "nvfp4"),
        ("mlp.down_proj.weight", "bf16", "nvfp4"),
        ("embed_tokens.weight", "bf16", "bf16"),
        ("router.proj.weight", "bf16", "bf16"),
        ("router.per_expert_scale", "bf16", "bf16"),
        ("q_norm.weight", "bf16", "bf16"),
        ("input_layernorm.weight", "bf16", "bf16"),
        ("layer_scalar", "bf16", "bf16"),
        ("self_conditioning.gate_proj.weight", "bf16", "bf16"),
        ("self_conditioning.down_proj.weight", "bf16", "bf16"),
    ],
)
def test_formats_per_preset(cfg, suffix, experts, default):
    assert _fmt(cfg, "experts", suffix) == experts
    assert _fmt(cfg, "default", suffix) == default


def test_plan_sizes_match_nvfp4_md(cfg):
    # nvfp4.md §7: scenario B (experts preset, text-only) 17.67 GB, scenario C (default) 15.31 GB;
    # experts alone 12.85 GB; attention 0.62 GB and dense MLP 0.30 GB when NVFP4
    for preset, want in [("experts", 17.67e9), ("default", 15.31e9)]:
        rows = policy.plan_table(cfg, preset)
        total = policy.plan_total_bytes(rows)
        print(f"\n{policy.describe_plan(cfg, preset)}")
        assert abs(total - want) < 0.01e9, (preset, total)
        by = {(r.component, r.fmt): r for r in rows}
        assert abs(by[("experts", "nvfp4")].bytes - 12.85e9) < 0.01e9
        assert by[("experts", "nvfp4")].params == 22_837_985_280  # architecture.md §2
        assert sum(r.params for r in rows) == 25_250_986_752 + 60  # text total + 60 layer scalars
    rows = {(r.component, r.fmt): r for r in policy.plan_table(cfg, "default")}
    assert abs(rows[("attention", "nvfp4")].bytes - 0.62e9) < 0.01e9
    assert abs(rows[("dense_mlp", "nvfp4")].bytes - 0.30e9) < 0.01e9


def test_nvfp4_bytes_formula():
    # [N, K] = [64, 32]: 1024 packed + 128 scale bytes + ws2 + input_scale
    assert policy.nvfp4_bytes(TensorSpec("x.weight", (64, 32), "attention")) == 1024 + 128 + 8
    # fused gate_up of 4 experts is 8 linears on disk, down_proj 4
    gu = TensorSpec("l.experts.gate_up_proj", (4, 16, 32), "experts")
    dn = TensorSpec("l.experts.down_proj", (4, 32, 16), "experts")
    assert policy.nvfp4_bytes(gu) == 4 * 16 * 32 * 9 // 16 + 8 * 8
    assert policy.nvfp4_bytes(dn) == 4 * 32 * 16 * 9 // 16 + 4 * 8


def test_odd_width_and_bad_inputs():
    odd = TensorSpec("l.self_attn.q_proj.weight", (64, 40), "attention")
    assert policy.precision_for(odd, "default") == "bf16"
    with pytest.raises(DGemmaError, match="preset"):
        policy.precision_for(odd, "everything")
    with pytest.raises(DGemmaError, match="component"):
        policy.precision_for(TensorSpec("v.weight", (64, 64), "vision"), "default")
