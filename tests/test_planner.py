"""Memory planner: weight bytes equal what the loaders hold, KV bytes equal what KVCache allocates, the 26B
acceptance figures against the reference documents' independent sums, verdicts, errors, and `dgemma-run --plan`."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import REAL_CONFIG_DIR

from dgemma.runtime.budget import load_with_budget
from dgemma.runtime.cli import main
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import ConfigError, DGemmaError, PlanError
from dgemma.runtime.kv_cache import KVCache
from dgemma.runtime.loading import load_model
from dgemma.runtime.planner import GiB, kv_cache_bytes, parse_size, plan, weights_from_model


@pytest.fixture(scope="module")
def real_cfg():
    return DGConfig.from_pretrained(REAL_CONFIG_DIR)


def _model_bytes(model: torch.nn.Module) -> int:
    """Independent count: every parameter and persistent buffer of the loaded model."""
    sd = model.state_dict()
    return sum(t.numel() * t.element_size() for t in sd.values())


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float32"])
def test_weight_bytes_equal_loaded_model(tiny_checkpoint, dtype):
    ck = tiny_checkpoint("tiny-b", dtype="bfloat16")
    tdt = {None: None, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = load_model(ck, dtype=tdt)
    p = plan(ck, dtype=dtype, device="cpu")
    real = _model_bytes(model)
    print(f"dtype {dtype}: plan {p.weight_bytes} B, loaded model {real} B")
    assert p.weight_bytes == real
    # the same per row when planning the loaded model itself
    rows = {r.item: r.nbytes for r in p.rows if r.section == "weights"}
    rows_m = {r.item: r.nbytes for r in plan(model, device="cpu").rows if r.section == "weights"}
    assert rows == rows_m
    assert sum(i.nbytes for i in weights_from_model(model)) == real


def test_kv_bytes_equal_kvcache(tiny_checkpoint):
    cfg = DGConfig.from_pretrained(tiny_checkpoint("tiny-a"))
    for ctx, batch, rollback, dt in [(5, 1, 0, torch.float32), (37, 2, 0, torch.bfloat16), (300, 1, 16, torch.float32)]:
        cache = KVCache(cfg, batch, ctx, dtype=dt, rollback=rollback)
        a = torch.empty((), dtype=dt).element_size()
        got = sum(b for _, _, b in kv_cache_bytes(cfg, ctx, batch, a, rollback).values())
        assert got == cache.nbytes(), (ctx, batch, rollback)
        p = plan(cfg, "bf16", context_length=ctx, batch=batch, dtype=dt, rollback=rollback, device="cpu")
        assert p.kv_bytes == cache.nbytes()


def test_26b_acceptance_figures(real_cfg):
    """NVFP4 default <= 16 GiB fully resident at 8k; experts preset ~18; Q4_K_M ~17 (text-only)."""
    tot = {}
    for fmt in ("nvfp4-default", "nvfp4-experts", "q4_k_m", "bf16"):
        p = plan(real_cfg, fmt, context_length=8192)
        tot[fmt] = p
        print(p.format_table(), "\n")
    assert tot["nvfp4-default"].total_bytes <= 16 * GiB
    assert 17.5 * GiB <= tot["nvfp4-experts"].total_bytes <= 18.5 * GiB
    assert 16.5 * GiB <= tot["q4_k_m"].total_bytes <= 17.5 * GiB
    # weights against the reference documents' independent sums (architecture.md section 2, nvfp4.md section 7)
    # architecture.md's 25 250 986 752 text params leave out the 30 decoder + 30 encoder `layer_scalar`s
    assert tot["bf16"].weight_bytes == (25_250_986_752 + 60) * 2
    assert abs(tot["nvfp4-experts"].weight_bytes - 17.67e9) < 0.01e9  # scenario B
    assert abs(tot["nvfp4-default"].weight_bytes - 15.31e9) < 0.01e9  # scenario C
    # KV (nvfp4.md section 7): sliding 25 x 2 x 8 x 256 x 2 B per slot, full 5 x 2 x 2 x 512 x 2 B per slot
    C = 256
    assert tot["bf16"].kv_bytes == 25 * 2 * 8 * 256 * 2 * (1023 + C) + 5 * 2 * 2 * 512 * 2 * (8192 + C)


def test_26b_q4_k_m_matches_tensor_list(real_cfg):
    """Q4_K_M weights = gguf_mix's byte count with the float32 tensors held in bf16 and rope_freqs generated."""
    from gguf import GGMLQuantizationType as QT

    from dgemma.converter.gguf_mix import mix_nbytes, tensor_types

    f32 = sum(s.numel for s, t in tensor_types(real_cfg, "q4_k_m")
              if t == QT.F32 and s.gguf_name != "rope_freqs.weight")
    rope = real_cfg.layers[real_cfg.full_layer_ids[0]].head_dim // 2
    expect = mix_nbytes(real_cfg, "q4_k_m") - 2 * f32 - 4 * rope
    assert plan(real_cfg, "q4_k_m").weight_bytes == expect


def test_verdicts_and_min_budget(real_cfg):
    base = plan(real_cfg, "nvfp4-experts", context_length=8192)
    E, k = base.num_experts, base.top_k
    assert plan(real_cfg, "nvfp4-experts", vram_budget=base.total_bytes).verdict == "fits"
    p = plan(real_cfg, "nvfp4-experts", vram_budget="16GiB")
    assert p.verdict == "offload" and k <= p.experts_per_layer < E
    n = p.experts_per_layer
    assert p.resident_bytes(n) <= 16 * GiB < p.resident_bytes(n + 1)
    assert p.traffic_per_pass == (E - n) * sum(p.expert_bytes)
    s = plan(real_cfg, "nvfp4-experts", vram_budget=base.min_budget)
    assert s.verdict == "stream" and s.experts_per_layer == k and s.stream_layers
    low = plan(real_cfg, "nvfp4-experts", vram_budget=base.min_budget - 1)
    assert low.verdict == "no_fit" and low.experts_per_layer is None
    assert "smallest budget that works" in low.verdict_text()
    json.dumps(low.as_dict())  # serializable


def test_plan_errors(tiny_checkpoint, real_cfg):
    with pytest.raises(ConfigError, match="ambiguous"):
        plan(real_cfg, "nvfp4")
    with pytest.raises(ConfigError, match="unknown format"):
        plan(real_cfg, "q3_xs")
    with pytest.raises(DGemmaError, match="needs a format"):
        plan(real_cfg)
    with pytest.raises(DGemmaError, match="no weights here"):
        plan(REAL_CONFIG_DIR)
    with pytest.raises(DGemmaError, match="no such"):
        plan(tiny_checkpoint("tiny-a").parent / "nope")
    with pytest.raises(DGemmaError, match="cannot read memory size"):
        parse_size("16 bananas")
    assert parse_size("16") == parse_size(16.0) == parse_size("16GiB") == 16 * GiB
    assert parse_size("16GB") == 16 * 10**9 and parse_size("500MiB") == 500 * 2**20


def test_budget_refuses_before_loading(tiny_checkpoint, monkeypatch):
    ck = tiny_checkpoint("tiny-a")
    import dgemma.runtime.lazy_loading as ll

    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(ll, "load_model_lazy", boom)
    with pytest.raises(PlanError) as ei:
        load_with_budget(ck, 4096, device="cpu", context_length=64)
    msg = str(ei.value)
    assert "smallest budget that works" in msg and "routed experts" in msg and "verdict" in msg


def test_budget_load_runs_offloaded(tiny_checkpoint):
    ck = tiny_checkpoint("tiny-a")
    full = plan(ck, device="cpu", context_length=64)
    budget = full.total_bytes - 3 * sum(full.expert_bytes)  # room for E - 3 experts per layer
    dg = load_with_budget(ck, budget, device="cpu", context_length=64)
    assert dg.plan.verdict == "offload" and dg.model.expert_store.experts_per_layer == full.num_experts - 3
    ref = load_model(ck, dtype=torch.float32)
    from dgemma.runtime.generate import generate

    ids = torch.tensor([[5, 9, 33, 7, 81, 12, 3]])
    a = generate(dg.model, ids, max_new_tokens=16, max_denoising_steps=3, sampling="reference",
                 generator=torch.Generator().manual_seed(0)).sequences
    b = generate(ref, ids, max_new_tokens=16, max_denoising_steps=3, sampling="reference",
                 generator=torch.Generator().manual_seed(0)).sequences
    assert torch.equal(a, b)


def test_cli_plan(tiny_checkpoint):
    r = CliRunner().invoke(main, ["--plan", "--model", str(REAL_CONFIG_DIR), "--format", "nvfp4-default",
                                  "--vram", "16"])
    assert r.exit_code == 0, r.output
    assert "routed experts" in r.output and "verdict: fits fully resident" in r.output
    r = CliRunner().invoke(main, ["--plan", "--json", "--model", str(tiny_checkpoint("tiny-a")), "--context", "100",
                                  "--vram", "1MiB"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["verdict"] == "no_fit" and d["context_length"] == 100 and d["min_budget"] > 2**20
    r = CliRunner().invoke(main, ["--plan", "--model", str(REAL_CONFIG_DIR), "--format", "nvfp4"])
    assert r.exit_code == 2 and "ambiguous" in r.output
    r = CliRunner().invoke(main, ["--model", str(tiny_checkpoint("tiny-a"))])
    assert r.exit_code == 2 and "PROMPT" in r.output


@pytest.mark.parametrize("mix", ["q8_0", "q4_k_m"])
def test_gguf_plan_equals_loaded_model(tiny_checkpoint, tmp_path, mix):
    """A GGUF file's plan (header only) equals the bytes `load_gguf` holds: blocks stay packed, float tensors
    become compute-dtype parameters, rope_freqs is regenerated."""
    from dgemma.converter.gguf_export import GGUFExportOptions, export_gguf
    from dgemma.runtime.gguf_loading import load_gguf

    out = tmp_path / f"tiny-{mix}.gguf"
    export_gguf(GGUFExportOptions(tiny_checkpoint("tiny-a", dtype="bfloat16"), out, mix))
    model, _ = load_gguf(out, dtype=torch.bfloat16)
    real = sum(i.nbytes for i in weights_from_model(model))
    p = plan(out, dtype="bfloat16", device="cpu")
    print(f"{mix}: plan {p.weight_bytes} B, loaded {real} B")
    assert p.weight_bytes == real
