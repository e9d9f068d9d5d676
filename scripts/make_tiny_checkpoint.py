#!/usr/bin/env python
"""Write a random tiny DiffusionGemma checkpoint directory in the real HF layout.

config.json + generation_config.json + sharded safetensors with `model.safetensors.index.json`, text weights
stored once under `model.decoder.*` plus the encoder's own `layer_scalar`s (as the published checkpoint does),
and a few tiny vision tensors (which text-only loaders skip). The same code serves the pytest fixtures.

    python scripts/make_tiny_checkpoint.py OUT_DIR --preset tiny-a [--seed 0] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

S, F = "sliding_attention", "full_attention"

# Several shapes on purpose: window shorter than prompts, >= 2 global layers, odd sizes, canvas 16 and 32,
# experts 8..16 with top-k 2..4, a partial-rotary variant.
PRESETS: dict[str, dict] = {
    "tiny-a": dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, layer_types=[S, F, S, F], sliding_window=8,
        num_experts=8, top_k_experts=2, moe_intermediate_size=32, vocab_size=512, canvas_length=16,
        full_partial_rotary=0.25,
    ),
    "tiny-b": dict(
        hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
        global_head_dim=16, num_global_key_value_heads=1, layer_types=[S, S, F, S, S, F], sliding_window=12,
        num_experts=16, top_k_experts=4, moe_intermediate_size=24, vocab_size=384, canvas_length=32,
        full_partial_rotary=0.25,
    ),
    "tiny-c": dict(
        hidden_size=40, intermediate_size=72, num_attention_heads=2, num_key_value_heads=1, head_dim=20,
        global_head_dim=24, num_global_key_value_heads=2, layer_types=[S, S, F, F], sliding_window=6,
        num_experts=12, top_k_experts=3, moe_intermediate_size=20, vocab_size=320, canvas_length=16,
        full_partial_rotary=0.5,
    ),
    # odd sizes whose strides defeat torch's grouped GEMM alignment: exercises the per-expert fallback
    "tiny-odd": dict(
        hidden_size=42, intermediate_size=70, num_attention_heads=3, num_key_value_heads=1, head_dim=14,
        global_head_dim=18, num_global_key_value_heads=1, layer_types=[S, F, S, F], sliding_window=5,
        num_experts=10, top_k_experts=3, moe_intermediate_size=21, vocab_size=301, canvas_length=16,
        full_partial_rotary=0.5,
    ),
    # mid-size, for benchmarks (scripts/bench_generate.py, scripts/bench_offload.py): ~35 M parameters
    "mid": dict(
        hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        global_head_dim=128, num_global_key_value_heads=2, layer_types=[S, S, S, F, S, S, S, F],
        sliding_window=128, num_experts=32, top_k_experts=4, moe_intermediate_size=256, vocab_size=32000,
        canvas_length=64, full_partial_rotary=0.25,
    ),
}

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=16)


def make_config(p: dict, eos: list[int] | None = None) -> tuple[dict, dict]:
    eos = eos if eos is not None else [1, 106]
    text = {
        "model_type": "diffusion_gemma_text", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": eos[0], "pad_token_id": 0, "final_logit_softcapping": 30.0,
        "global_head_dim": p["global_head_dim"], "head_dim": p["head_dim"],
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": p["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"], "layer_types": list(p["layer_types"]),
        "max_position_embeddings": 4096, "moe_intermediate_size": p["moe_intermediate_size"],
        "num_attention_heads": p["num_attention_heads"], "num_experts": p["num_experts"],
        "num_global_key_value_heads": p["num_global_key_value_heads"],
        "num_hidden_layers": len(p["layer_types"]), "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            F: {"partial_rotary_factor": p["full_partial_rotary"], "rope_theta": 1000000.0, "rope_type": "proportional"},
            S: {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": p["sliding_window"], "tie_word_embeddings": True, "top_k_experts": p["top_k_experts"],
        "use_bidirectional_attention": "vision", "vocab_size": p["vocab_size"],
    }
    vision = {"model_type": "gemma4_vision", **VISION}
    cfg = {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "boi_token_id": p["vocab_size"] - 3, "eoi_token_id": p["vocab_size"] - 2,
        "image_token_id": p["vocab_size"] - 1, "eos_token_id": eos, "pad_token_id": 0, "bos_token_id": 2,
        "canvas_length": p["canvas_length"], "initializer_range": 0.02, "tie_word_embeddings": True,
        "text_config": text, "vision_config": vision,
    }
    gen = {
        "bos_token_id": 2, "eos_token_id": eos, "pad_token_id": 0, "max_new_tokens": p["canvas_length"],
        "max_denoising_steps": 8, "t_min": 0.4, "t_max": 0.8,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1, "confidence_threshold": 0.005,
    }
    return cfg, gen


def make_tensors(p: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights scaled so activations stay O(1) and routing/attention are far from uniform."""
    rng = np.random.default_rng(seed)
    H, I, Ie, E = p["hidden_size"], p["intermediate_size"], p["moe_intermediate_size"], p["num_experts"]
    Hq, V = p["num_attention_heads"], p["vocab_size"]

    def w(*shape, fan_in=None):
        fan_in = fan_in or shape[-1]
        return rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)

    def norm(n):
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    d = "model.decoder."
    t: dict[str, np.ndarray] = {d + "embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32) * 0.2}
    for i, lt in enumerate(p["layer_types"]):
        sl = lt == S
        hd = p["head_dim"] if sl else p["global_head_dim"]
        kv = p["num_key_value_heads"] if sl else p["num_global_key_value_heads"]
        q = f"{d}layers.{i}."
        t[q + "input_layernorm.weight"] = norm(H)
        t[q + "self_attn.q_proj.weight"] = w(Hq * hd, H)
        t[q + "self_attn.k_proj.weight"] = w(kv * hd, H)
        if sl:
            t[q + "self_attn.v_proj.weight"] = w(kv * hd, H)
        t[q + "self_attn.o_proj.weight"] = w(H, Hq * hd)
        t[q + "self_attn.q_norm.weight"] = norm(hd)
        t[q + "self_attn.k_norm.weight"] = norm(hd)
        t[q + "post_attention_layernorm.weight"] = norm(H)
        t[q + "pre_feedforward_layernorm.weight"] = norm(H)
        t[q + "mlp.gate_proj.weight"] = w(I, H)
        t[q + "mlp.up_proj.weight"] = w(I, H)
        t[q + "mlp.down_proj.weight"] = w(H, I)
        t[q + "post_feedforward_layernorm_1.weight"] = norm(H)
        t[q + "pre_feedforward_layernorm_2.weight"] = norm(H)
        t[q + "router.proj.weight"] = w(E, H) * 4.0
        t[q + "router.scale"] = norm(H)
        t[q + "router.per_expert_scale"] = (0.5 + rng.random(E)).astype(np.float32)
        t[q + "experts.gate_up_proj"] = w(E, 2 * Ie, H)
        t[q + "experts.down_proj"] = w(E, H, Ie)
        t[q + "post_feedforward_layernorm_2.weight"] = norm(H)
        t[q + "post_feedforward_layernorm.weight"] = norm(H)
        t[q + "layer_scalar"] = np.array([0.8 + 0.4 * rng.random()], dtype=np.float32)
    t[d + "norm.weight"] = norm(H)
    sc = d + "self_conditioning."
    t[sc + "pre_norm.weight"] = norm(H)
    t[sc + "gate_proj.weight"] = w(I, H)
    t[sc + "up_proj.weight"] = w(I, H)
    t[sc + "down_proj.weight"] = w(H, I)
    for i in range(len(p["layer_types"])):
        # the encoder's scalars are separate tensors; make them differ so a mix-up is caught
        t[f"model.encoder.language_model.layers.{i}.layer_scalar"] = np.array([0.8 + 0.4 * rng.random()], dtype=np.float32)
    # tiny vision tower (real names), skipped by text-only runtimes
    vh, vi, vd = VISION["hidden_size"], VISION["intermediate_size"], VISION["head_dim"]
    vt = "model.encoder.vision_tower."
    t[vt + "patch_embedder.position_embedding_table"] = w(2, VISION["position_embedding_size"], vh)
    t[vt + "patch_embedder.input_proj.weight"] = w(vh, 3 * VISION["patch_size"] ** 2)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        t[vt + f"encoder.layers.0.self_attn.{n}.linear.weight"] = w(vh, vh)
    t[vt + "encoder.layers.0.self_attn.q_norm.weight"] = norm(vd)
    t[vt + "encoder.layers.0.self_attn.k_norm.weight"] = norm(vd)
    t[vt + "encoder.layers.0.mlp.gate_proj.linear.weight"] = w(vi, vh)
    t[vt + "encoder.layers.0.mlp.up_proj.linear.weight"] = w(vi, vh)
    t[vt + "encoder.layers.0.mlp.down_proj.linear.weight"] = w(vh, vi)
    for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        t[vt + f"encoder.layers.0.{n}.weight"] = norm(vh)
    t["model.encoder.embed_vision.embedding_projection.weight"] = w(H, vh)
    return t


def write_checkpoint(
    out: Path, preset: str | dict = "tiny-a", seed: int = 0, dtype: str = "float32", shards: int = 3,
    eos: list[int] | None = None, both_copies: bool = False, tokenizer: bool = True,
) -> Path:
    """Write the checkpoint directory `out` and return it. `both_copies` also stores the encoder's copy of
    every tied text tensor (the layout some re-saves produce)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, gen = make_config(p, eos)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    arrays = make_tensors(p, seed)
    if both_copies:
        enc = "model.encoder.language_model."
        for k in list(arrays):
            if k.startswith("model.decoder.layers.") and not k.endswith("layer_scalar"):
                arrays[enc + k[len("model.decoder."):]] = arrays[k].copy()
            if k in ("model.decoder.embed_tokens.weight", "model.decoder.norm.weight"):
                arrays[enc + k[len("model.decoder."):]] = arrays[k].copy()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    names = sorted(arrays)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    total = 0
    for si, group in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: torch.from_numpy(arrays[n]).to(tdtype).contiguous() for n in group}
        total += sum(x.numel() * x.element_size() for x in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        _write_tokenizer(out, p["vocab_size"])
    return out


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """Attach the small tokenizer (scripts/make_tiny_tokenizer.py) when it is available."""
    here = Path(__file__).resolve().parent
    tok_script = here / "make_tiny_tokenizer.py"
    if not tok_script.is_file():
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dg_make_tiny_tokenizer", tok_script)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    mod.write_tiny_tokenizer(out, vocab_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="tiny-a", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shards", type=int, default=3)
    a = ap.parse_args(argv)
    write_checkpoint(a.out, a.preset, a.seed, a.dtype, a.shards)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
