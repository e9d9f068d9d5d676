"""GGUF tensor plan (diffusion-gemma layout) and type mixes: dry runs over the real 26B config and tiny configs.

Reference numbers (shared/reference/gguf.md and the Unsloth Q4_K_M tensor dump it cites): 692 tensors;
Q4_K_M: f32 423, q4_K 194, q5_0 33, q8_0 28, q6_K 14, tensor data 16 790 985 600 bytes; attn_v Q6_K on
sliding layers 0,1,2,6,9,13,16,20,24..28 and ffn_down(_exps) Q8_0 on layers 0,1,2,5,8,...,23,26..29.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from dgemma.converter import gguf_quants as gq
from dgemma.converter.gguf_mix import (
    MIXES,
    file_type,
    format_type_table,
    mix_nbytes,
    quantize_planned,
    tensor_types,
    type_table,
    use_more_bits,
)
from dgemma.converter.gguf_names import gguf_tensor_data, gguf_tensor_plan, iter_gguf_tensors, rope_freqs_values
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import CheckpointError, ConfigError
from dgemma.runtime.hf_names import checkpoint_tensors

REAL = Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-26B-A4B-it"


@pytest.fixture(scope="module")
def cfg26() -> DGConfig:
    return DGConfig.from_pretrained(REAL)


def tiny_cfg(hidden: int = 64, moe: int = 64, inter: int = 96, layer_types=("s", "s", "f"), experts: int = 4) -> DGConfig:
    lt = ["sliding_attention" if t == "s" else "full_attention" for t in layer_types]
    return DGConfig.from_dict(
        {
            "model_type": "diffusion_gemma",
            "canvas_length": 8,
            "text_config": {
                "num_hidden_layers": len(lt),
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "num_global_key_value_heads": 1,
                "head_dim": 16,
                "global_head_dim": 32,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "moe_intermediate_size": moe,
                "num_experts": experts,
                "top_k_experts": 2,
                "vocab_size": 97,
                "sliding_window": 4,
                "layer_types": lt,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
                },
            },
        }
    )


def _names(plan) -> list[str]:
    return [s.gguf_name for s in plan]


# ---- plan ------------------------------------------------------------------------------------------------


def test_26b_plan_layout(cfg26: DGConfig) -> None:
    plan = gguf_tensor_plan(cfg26)
    names = _names(plan)
    assert len(plan) == 692 and len(set(names)) == 692
    glob = [n for n in names if not n.startswith("blk.")]
    assert glob == sorted(glob) == [
        "output_norm.weight", "rope_freqs.weight", "self_cond_down.weight", "self_cond_gate.weight",
        "self_cond_pre_norm.weight", "self_cond_up.weight", "token_embd.weight",
    ]
    per_layer = [sum(n.startswith(f"blk.{i}.") for n in names) for i in range(30)]
    assert per_layer == [22 if i in (5, 11, 17, 23, 29) else 23 for i in range(30)]
    blocks = [int(n.split(".")[1]) for n in names if n.startswith("blk.")]
    assert blocks == sorted(blocks)  # llama-quantize order: layer, then name
    assert [n[6:] for n in names if n.startswith("blk.0.")] == [  # as in the Unsloth Q4_K_M dump
        "attn_k.weight", "attn_k_norm.weight", "attn_norm.weight", "attn_output.weight", "attn_q.weight",
        "attn_q_norm.weight", "attn_v.weight", "enc_layer_output_scale.weight", "ffn_down.weight",
        "ffn_down_exps.scale", "ffn_down_exps.weight", "ffn_gate.weight", "ffn_gate_inp.scale", "ffn_gate_inp.weight",
        "ffn_gate_up_exps.weight", "ffn_norm.weight", "ffn_up.weight", "layer_output_scale.weight",
        "post_attention_norm.weight", "post_ffw_norm.weight", "post_ffw_norm_1.weight", "post_ffw_norm_2.weight",
        "pre_ffw_norm_2.weight",
    ]
    ne = {s.gguf_name: s.gguf_shape for s in plan}
    expect = {
        "token_embd.weight": (2816, 262144), "output_norm.weight": (2816,), "rope_freqs.weight": (256,),
        "self_cond_pre_norm.weight": (2816,), "self_cond_gate.weight": (2816, 2112), "self_cond_up.weight": (2816, 2112),
        "self_cond_down.weight": (2112, 2816),
        "blk.0.attn_norm.weight": (2816,), "blk.0.attn_q.weight": (2816, 4096), "blk.5.attn_q.weight": (2816, 8192),
        "blk.0.attn_k.weight": (2816, 2048), "blk.5.attn_k.weight": (2816, 1024), "blk.0.attn_v.weight": (2816, 2048),
        "blk.0.attn_output.weight": (4096, 2816), "blk.5.attn_output.weight": (8192, 2816),
        "blk.0.attn_q_norm.weight": (256,), "blk.5.attn_q_norm.weight": (512,), "blk.5.attn_k_norm.weight": (512,),
        "blk.0.post_attention_norm.weight": (2816,), "blk.0.ffn_norm.weight": (2816,),
        "blk.0.ffn_gate.weight": (2816, 2112), "blk.0.ffn_up.weight": (2816, 2112), "blk.0.ffn_down.weight": (2112, 2816),
        "blk.0.post_ffw_norm_1.weight": (2816,), "blk.0.pre_ffw_norm_2.weight": (2816,),
        "blk.0.ffn_gate_inp.weight": (2816, 128), "blk.0.ffn_gate_inp.scale": (2816,),
        "blk.0.ffn_gate_up_exps.weight": (2816, 1408, 128), "blk.0.ffn_down_exps.weight": (704, 2816, 128),
        "blk.0.ffn_down_exps.scale": (128,), "blk.0.post_ffw_norm_2.weight": (2816,), "blk.0.post_ffw_norm.weight": (2816,),
        "blk.0.layer_output_scale.weight": (1,), "blk.29.enc_layer_output_scale.weight": (1,),
    }
    for n, shape in expect.items():
        assert ne[n] == shape, n
    assert "blk.5.attn_v.weight" not in ne and "output.weight" not in ne
    assert not any("vision" in n or "ffn_gate_up_exps.scale" in n for n in names)
    # every HF text tensor is used, each exactly once
    used = [h for s in plan for h in s.hf_sources]
    assert sorted(used) == sorted(t.name for t in checkpoint_tensors(cfg26))
    src = {s.gguf_name: s.hf_sources for s in plan}
    assert src["blk.3.ffn_down_exps.scale"] == ("model.decoder.layers.3.router.per_expert_scale",)
    assert src["blk.3.enc_layer_output_scale.weight"] == ("model.encoder.language_model.layers.3.layer_scalar",)
    assert src["blk.3.layer_output_scale.weight"] == ("model.decoder.layers.3.layer_scalar",)
    assert src["blk.3.ffn_gate_inp.scale"] == ("model.decoder.layers.3.router.scale",)


def test_26b_rope_freqs(cfg26: DGConfig) -> None:
    r = rope_freqs_values(cfg26)
    assert r.dtype == np.float32 and r.shape == (256,)
    assert np.all(r[:64] == 1.0) and np.all(r[64:] == np.float32(1e30))


def test_26b_nvfp4_layout(cfg26: DGConfig) -> None:
    plan = gguf_tensor_plan(cfg26, nvfp4_experts=True)
    ne = {s.gguf_name: s.gguf_shape for s in plan}
    assert len(plan) == 692 + 3 * 30
    assert ne["blk.7.ffn_gate_exps.weight"] == ne["blk.7.ffn_up_exps.weight"] == (2816, 704, 128)
    assert ne["blk.7.ffn_gate_exps.scale"] == ne["blk.7.ffn_up_exps.scale"] == ne["blk.7.ffn_down_exps.scale"] == (128,)
    assert "blk.7.ffn_gate_up_exps.weight" not in ne
    flagged = {s.gguf_name for s in plan if s.nvfp4_global}
    assert flagged == {f"blk.{i}.ffn_{p}_exps.weight" for i in range(30) for p in ("gate", "up", "down")}


def test_tiny_plan_counts() -> None:
    for lt in (("s", "s", "f"), ("f",), ("s", "f", "s", "s", "f")):
        cfg = tiny_cfg(layer_types=lt)
        n_s, n_f = lt.count("s"), lt.count("f")
        assert len(gguf_tensor_plan(cfg)) == 7 + 23 * n_s + 22 * n_f
        assert len(gguf_tensor_plan(cfg, nvfp4_experts=True)) == 7 + 26 * n_s + 25 * n_f
    with pytest.raises(ConfigError, match="multiples of 64"):
        gguf_tensor_plan(tiny_cfg(moe=48), nvfp4_experts=True)


def _fake_checkpoint(cfg: DGConfig, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {t.name: torch.randn(t.shape, generator=g).to(dtype) for t in checkpoint_tensors(cfg)}


def test_tensor_data_roles() -> None:
    cfg = tiny_cfg()
    ck = _fake_checkpoint(cfg)
    seen = []

    def get(name: str) -> torch.Tensor:
        seen.append(name)
        return ck[name]

    out = dict((s.gguf_name, (s, t)) for s, t in iter_gguf_tensors(cfg, get))
    for s, t in out.values():
        assert tuple(t.shape) == s.torch_shape, s.gguf_name
    p = "model.decoder.layers.1."
    assert out["blk.1.ffn_gate_up_exps.weight"][1] is ck[p + "experts.gate_up_proj"]  # fused as-is, no copy
    assert out["blk.1.attn_q.weight"][1] is ck[p + "self_attn.q_proj.weight"]  # no transpose
    assert out["blk.2.enc_layer_output_scale.weight"][1] is ck["model.encoder.language_model.layers.2.layer_scalar"]
    assert out["token_embd.weight"][1] is ck["model.decoder.embed_tokens.weight"]
    np.testing.assert_array_equal(out["rope_freqs.weight"][1].numpy(), np.array([1.0] * 4 + [1e30] * 12, np.float32))
    assert sorted(set(seen)) == sorted(ck)

    # NVFP4 layout: split halves, per-expert global scales, folded down scale
    plan = {s.gguf_name: s for s in gguf_tensor_plan(cfg, nvfp4_experts=True)}
    gu, down, pes = ck[p + "experts.gate_up_proj"], ck[p + "experts.down_proj"], ck[p + "router.per_expert_scale"]
    gate = gguf_tensor_data(cfg, plan["blk.1.ffn_gate_exps.weight"], ck.__getitem__)
    up = gguf_tensor_data(cfg, plan["blk.1.ffn_up_exps.weight"], ck.__getitem__)
    assert torch.equal(torch.cat([gate, up], dim=1), gu) and torch.equal(gate, gu[:, :64])
    gs = gguf_tensor_data(cfg, plan["blk.1.ffn_gate_exps.scale"], ck.__getitem__)
    np.testing.assert_allclose(gs.numpy(), gu[:, :64].float().abs().amax(dim=(1, 2)).numpy() / 2688, rtol=1e-6)
    ds = gguf_tensor_data(cfg, plan["blk.1.ffn_down_exps.scale"], ck.__getitem__)
    want = pes.float() * down.float().abs().amax(dim=(1, 2)) / 2688
    np.testing.assert_allclose(ds.numpy(), want.numpy(), rtol=1e-6)

    bad = dict(ck)
    bad[p + "experts.down_proj"] = torch.zeros(4, 64, 63)
    with pytest.raises(CheckpointError, match="down_proj: shape"):
        gguf_tensor_data(cfg, plan["blk.1.ffn_down_exps.weight"], bad.__getitem__)


def test_rope_freqs_rejects_partial_default_rope() -> None:
    cfg = tiny_cfg()
    raw = {
        "model_type": "diffusion_gemma",
        "text_config": {
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
            "global_head_dim": 32, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 64,
            "num_experts": 4, "top_k_experts": 2, "vocab_size": 97, "sliding_window": 4,
            "layer_types": ["full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
        },
    }
    with pytest.raises(ConfigError, match="proportional"):
        rope_freqs_values(DGConfig.from_dict(raw))
    assert rope_freqs_values(cfg).shape == (16,)


# ---- mixes -------------------------------------------------------------------------------------------------


def test_use_more_bits() -> None:
    assert [i for i in range(25) if use_more_bits(i, 25)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23, 24]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]


def test_26b_q4_k_m_matches_unsloth(cfg26: DGConfig) -> None:
    print("\n" + format_type_table(cfg26, "q4_k_m"))
    table = {t.name: n for t, n in type_table(cfg26, "q4_k_m").items()}
    assert table == {"F32": 423, "Q4_K": 194, "Q5_0": 33, "Q8_0": 28, "Q6_K": 14}
    assert mix_nbytes(cfg26, "q4_k_m", alignment=32) == 16_790_985_600  # Unsloth's tensor data, byte for byte
    types = {s.gguf_name: t for s, t in tensor_types(cfg26, "q4_k_m")}
    v6 = sorted(int(n.split(".")[1]) for n, t in types.items() if n.endswith("attn_v.weight") and t == QT.Q6_K)
    assert v6 == [0, 1, 2, 6, 9, 13, 16, 20, 24, 25, 26, 27, 28]
    for kind in ("ffn_down.weight", "ffn_down_exps.weight"):
        q8 = sorted(int(n.split(".")[1]) for n, t in types.items() if n.endswith(kind) and t == QT.Q8_0)
        q5 = sorted(int(n.split(".")[1]) for n, t in types.items() if n.endswith(kind) and t == QT.Q5_0)
        assert q8 == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        assert len(q5) == 16 and not set(q5) & set(q8)
    assert types["token_embd.weight"] == QT.Q6_K and types["self_cond_down.weight"] == QT.Q5_0
    assert types["self_cond_gate.weight"] == types["blk.4.ffn_gate_up_exps.weight"] == QT.Q4_K
    assert types["blk.4.ffn_gate_inp.weight"] == types["rope_freqs.weight"] == QT.F32
    assert types["blk.4.ffn_down_exps.scale"] == types["blk.4.enc_layer_output_scale.weight"] == QT.F32
    assert file_type("q4_k_m") == 15


def test_26b_other_mixes(cfg26: DGConfig) -> None:
    expect = {
        "bf16": {"F32": 423, "BF16": 269},
        "f16": {"F32": 423, "F16": 269},
        "q8_0": {"F32": 423, "Q8_0": 269},
        "q6_k": {"F32": 423, "Q6_K": 208, "Q8_0": 61},
        "q5_k_m": {"F32": 423, "Q5_K": 194, "Q5_1": 33, "Q8_0": 28, "Q6_K": 14},
        "mxfp4_moe": {"F32": 423, "Q8_0": 209, "MXFP4": 60},
        "nvfp4": {"F32": 483, "Q8_0": 209, "NVFP4": 90},
    }
    for mix, want in expect.items():
        print("\n" + format_type_table(cfg26, mix))
        assert {t.name: n for t, n in type_table(cfg26, mix).items()} == want, mix
    # Unsloth's model card sizes (third-party, GiB rounded): BF16 47, Q8_0 25, Q6_K 21, Q5_K_M 18, Q4_K_M 16
    for mix, gib in (("bf16", 47), ("q8_0", 25), ("q6_k", 21), ("q5_k_m", 18), ("q4_k_m", 16)):
        assert round(mix_nbytes(cfg26, mix, alignment=32) / 2**30) == gib, mix
    types = {s.gguf_name: t for s, t in tensor_types(cfg26, "mxfp4_moe")}
    assert types["token_embd.weight"] == QT.Q8_0 and types["blk.0.ffn_down_exps.weight"] == QT.MXFP4
    assert {int(file_type(m)) for m in MIXES} == {32, 1, 7, 15, 17, 18, 38, 39}


def test_tiny_fallbacks() -> None:
    cfg = tiny_cfg(hidden=64, moe=64, inter=96)  # no row is a multiple of 256
    types = {s.gguf_name: t for s, t in tensor_types(cfg, "q4_k_m")}
    assert types["blk.0.attn_q.weight"] == QT.Q5_0  # Q4_K -> Q5_0
    assert types["blk.2.ffn_down.weight"] == QT.Q8_0  # use_more_bits(2, 3): Q6_K -> Q8_0
    assert types["blk.0.ffn_down.weight"] == types["blk.0.ffn_down_exps.weight"] == QT.Q5_0
    assert types["token_embd.weight"] == QT.Q8_0  # output rule: ne0 % 256 != 0 -> Q8_0
    t5 = {s.gguf_name: t for s, t in tensor_types(cfg, "q5_k_m")}
    assert t5["blk.0.attn_q.weight"] == QT.Q5_1
    odd = tiny_cfg(hidden=48, moe=40, inter=72)  # 48 % 32 != 0: even Q8_0 does not fit
    t8 = {s.gguf_name: t for s, t in tensor_types(odd, "q8_0")}
    assert t8["blk.0.attn_q.weight"] == QT.F16 and t8["blk.0.ffn_down.weight"] == QT.F16  # 72 % 32 != 0
    assert t8["blk.0.ffn_gate.weight"] == QT.F16
    big = tiny_cfg(hidden=256, moe=256, inter=512, experts=8)
    t8e = {s.gguf_name: t for s, t in tensor_types(big, "q4_k_m")}
    assert t8e["blk.0.attn_v.weight"] == t8e["blk.0.attn_k.weight"] == QT.Q8_0  # llama.cpp's n_expert == 8 bumps
    assert t8e["blk.0.attn_output.weight"] == QT.Q5_1  # bumped to Q5_K, then ne0 = 32 falls back to Q5_1
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        type_table(cfg, "q3_k_s")


def test_quantize_planned_nvfp4_roundtrip() -> None:
    cfg = tiny_cfg()
    ck = _fake_checkpoint(cfg, torch.float32)
    types = dict((s.gguf_name, (s, t)) for s, t in tensor_types(cfg, "nvfp4"))
    s, t = types["blk.2.ffn_down_exps.weight"]
    assert t == QT.NVFP4 and s.nvfp4_global
    data = gguf_tensor_data(cfg, s, ck.__getitem__)
    q = quantize_planned(s, data, t)
    scale = gguf_tensor_data(cfg, types["blk.2.ffn_down_exps.scale"][0], ck.__getitem__).numpy()
    pes = ck["model.decoder.layers.2.router.per_expert_scale"].numpy()
    y = gq.dequantize(q, QT.NVFP4) * (scale / pes)[:, None, None]  # the runtime multiplies by `.scale`
    rel = np.sqrt(((y - data.numpy()) ** 2).mean() / (data.numpy() ** 2).mean())
    print(f"NVFP4 down experts via .scale: rel RMSE {rel:.4f}")
    assert rel < 0.1
    s2, t2 = types["blk.2.attn_q.weight"]
    assert t2 == QT.Q8_0 and quantize_planned(s2, gguf_tensor_data(cfg, s2, ck.__getitem__), t2).dtype == np.uint8
