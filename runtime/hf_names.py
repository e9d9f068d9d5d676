"""The text tensors of an HF DiffusionGemma checkpoint: names and shapes, from the config alone.

The published checkpoint stores the shared encoder/decoder weights once, under `model.decoder.*`, plus the
encoder's own `layer_scalar` buffers (they are not tied). Loaders, converters and planners all use this list so
that names and sizes agree everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import DGConfig

DEC = "model.decoder"
ENC = "model.encoder.language_model"
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # HF checkpoint name
    shape: tuple[int, ...]
    component: str  # embedding, attention, dense_mlp, experts, router, norms, scalars, self_conditioning
    layer: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def layer_tensors(cfg: DGConfig, i: int, prefix: str = DEC) -> list[TensorSpec]:
    """The per-layer decoder tensors (22 on sliding layers, 21 on full layers)."""
    H, g = cfg.hidden_size, cfg.layers[i]
    q, kv = cfg.num_attention_heads * g.head_dim, g.num_kv_heads * g.head_dim
    E, Ie, I = cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size
    p = f"{prefix}.layers.{i}."
    out = [
        (p + "input_layernorm.weight", (H,), "norms"),
        (p + "self_attn.q_proj.weight", (q, H), "attention"),
        (p + "self_attn.k_proj.weight", (kv, H), "attention"),
    ]
    if g.has_v_proj:
        out.append((p + "self_attn.v_proj.weight", (kv, H), "attention"))
    out += [
        (p + "self_attn.o_proj.weight", (H, q), "attention"),
        (p + "self_attn.q_norm.weight", (g.head_dim,), "norms"),
        (p + "self_attn.k_norm.weight", (g.head_dim,), "norms"),
        (p + "post_attention_layernorm.weight", (H,), "norms"),
        (p + "pre_feedforward_layernorm.weight", (H,), "norms"),
        (p + "mlp.gate_proj.weight", (I, H), "dense_mlp"),
        (p + "mlp.up_proj.weight", (I, H), "dense_mlp"),
        (p + "mlp.down_proj.weight", (H, I), "dense_mlp"),
        (p + "post_feedforward_layernorm_1.weight", (H,), "norms"),
        (p + "pre_feedforward_layernorm_2.weight", (H,), "norms"),
        (p + "router.proj.weight", (E, H), "router"),
        (p + "router.scale", (H,), "router"),
        (p + "router.per_expert_scale", (E,), "router"),
        (p + "experts.gate_up_proj", (E, 2 * Ie, H), "experts"),
        (p + "experts.down_proj", (E, H, Ie), "experts"),
        (p + "post_feedforward_layernorm_2.weight", (H,), "norms"),
        (p + "post_feedforward_layernorm.weight", (H,), "norms"),
        (p + "layer_scalar", (1,), "scalars"),
    ]
    return [TensorSpec(n, s, c, i) for n, s, c in out]


def checkpoint_tensors(cfg: DGConfig) -> list[TensorSpec]:
    """Every text tensor of the checkpoint, in the stored-once layout (no vision, no lm_head)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    out = [TensorSpec(f"{DEC}.embed_tokens.weight", (cfg.vocab_size, H), "embedding")]
    for i in range(cfg.num_hidden_layers):
        out += layer_tensors(cfg, i)
    out.append(TensorSpec(f"{DEC}.norm.weight", (H,), "norms"))
    sc = f"{DEC}.self_conditioning."
    out += [
        TensorSpec(sc + "pre_norm.weight", (H,), "self_conditioning"),
        TensorSpec(sc + "gate_proj.weight", (I, H), "self_conditioning"),
        TensorSpec(sc + "up_proj.weight", (I, H), "self_conditioning"),
        TensorSpec(sc + "down_proj.weight", (H, I), "self_conditioning"),
    ]
    out += [
        TensorSpec(f"{ENC}.layers.{i}.layer_scalar", (1,), "scalars", i) for i in range(cfg.num_hidden_layers)
    ]
    return out


def encoder_alias(name: str) -> str | None:
    """Map an encoder text tensor name (stored when a checkpoint keeps both copies) to its decoder twin."""
    if name.startswith(ENC + ".") and not name.endswith(".layer_scalar"):
        return DEC + name[len(ENC) :]
    return None


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)
