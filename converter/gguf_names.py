"""The llama.cpp `diffusion-gemma` GGUF tensor set (PR #24423 / Unsloth layout) as a pure function of the config.

`gguf_tensor_plan(cfg)` lists every GGUF tensor: name, GGUF shape (ggml `ne`, fastest-varying first, i.e. the
torch shape reversed), the HF tensors it is built from and how (`role`). `gguf_tensor_data(cfg, spec, get)`
builds one tensor's data from a `get(hf_name) -> torch.Tensor` callable, so an exporter can stream.

Layout facts (shared/reference/gguf.md section 3, checked against llama.cpp's converter `conversion/gemma.py` +
`conversion/diffusion_gemma.py` at PR #24423 and the Unsloth Q4_K_M tensor dump):
- No transposes, no permutes, no norm +1: the torch array written as-is has exactly the GGUF `ne`.
- Experts: HF `experts.gate_up_proj` [E, 2*Ie, H] is already llama.cpp's fused `ffn_gate_up_exps` (gate rows
  first); `router.per_expert_scale` becomes `ffn_down_exps.scale`, `router.scale` `ffn_gate_inp.scale`.
- Both layer scalars: decoder `layer_scalar` -> `layer_output_scale`, the encoder's -> `enc_layer_output_scale`.
- `rope_freqs` is generated: n_rot = int(global_head_dim * partial_rotary_factor / 2) ones, then 1e30 for the
  unrotated pairs (global_head_dim / 2 values): proportional RoPE on full-attention layers only.
- No vision, no lm_head, no other encoder tensors (they are tied to the decoder's).
- Order: the order llama-quantize writes (and the Unsloth files have): global tensors sorted by name, then each
  block's tensors sorted by name, blocks in layer order.
NVFP4 expert layout (`nvfp4_experts=True`, gguf.md section 5.1): the fused gate/up is split into `ffn_gate_exps`
and `ffn_up_exps`, each with a per-expert F32 `.scale` (the NVFP4 global scale), and `ffn_down_exps.scale`
carries `per_expert_scale[e] * global_scale_down[e]` (both multiply the down output).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import CheckpointError, ConfigError
from dgemma.runtime.hf_names import DEC, ENC, checkpoint_tensors

from .gguf_quants import nvfp4_global_scale

logger = logging.getLogger(__name__)

ARCH = "diffusion-gemma"
NVFP4_BLOCK = 64

# roles: how a GGUF tensor's data is made from its sources
COPY = "copy"  # the single source as-is
GATE_EXPS = "gate_exps"  # experts.gate_up_proj[:, :Ie, :]
UP_EXPS = "up_exps"  # experts.gate_up_proj[:, Ie:, :]
GATE_EXPS_SCALE = "gate_exps_nvfp4_scale"  # nvfp4_global_scale(gate half), one per expert
UP_EXPS_SCALE = "up_exps_nvfp4_scale"
DOWN_EXPS_SCALE = "down_exps_nvfp4_scale"  # per_expert_scale * nvfp4_global_scale(down_proj)
ROPE_FREQS = "rope_freqs"  # generated from the config

# HF per-layer suffix -> GGUF per-layer name (decoder tensors under model.decoder.layers.N.)
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
}
_GLOBAL_MAP = {
    f"{DEC}.embed_tokens.weight": "token_embd.weight",
    f"{DEC}.norm.weight": "output_norm.weight",
    f"{DEC}.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    f"{DEC}.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    f"{DEC}.self_conditioning.up_proj.weight": "self_cond_up.weight",
    f"{DEC}.self_conditioning.down_proj.weight": "self_cond_down.weight",
}


@dataclass(frozen=True)
class GGUFTensorSpec:
    gguf_name: str
    gguf_shape: tuple[int, ...]  # ggml ne: fastest-varying first (= torch shape reversed)
    hf_sources: tuple[str, ...]  # HF checkpoint tensors the data comes from (empty: generated)
    role: str  # COPY, GATE_EXPS, UP_EXPS, *_SCALE, ROPE_FREQS
    layer: int | None = None
    hf_shapes: tuple[tuple[int, ...], ...] = ()  # torch shapes of hf_sources, as the checkpoint must have them
    nvfp4_global: bool = False  # if stored as NVFP4, its per-expert global scale lives in the `.scale` tensor

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.gguf_shape))

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing 1s do not count (a (1,) scalar is 1-D)."""
        n = len(self.gguf_shape)
        while n > 1 and self.gguf_shape[n - 1] == 1:
            n -= 1
        return n

    @property
    def numel(self) -> int:
        return int(np.prod(self.gguf_shape, dtype=np.int64))


def rope_freqs_values(cfg: DGConfig) -> np.ndarray:
    """The generated `rope_freqs.weight` (float32, global_head_dim / 2 values)."""
    full = cfg.full_layer_ids
    if not full:
        raise ConfigError(f"{cfg.source}: no full-attention layer; the diffusion-gemma layout needs one")
    hd = cfg.layers[full[0]].head_dim
    if hd % 2:
        raise ConfigError(f"{cfg.source}: full-attention head_dim {hd} must be even for RoPE")
    rp = cfg.rope["full_attention"]
    if rp.rope_type == "default" and rp.partial_rotary_factor != 1.0:
        # llama.cpp expresses only the proportional kind through rope_freqs (full-dim frequencies, pairs cut off)
        raise ConfigError(
            f"{cfg.source}: full-attention rope_type 'default' with partial_rotary_factor "
            f"{rp.partial_rotary_factor} cannot be written in the diffusion-gemma GGUF layout (needs 'proportional')"
        )
    n_rot = int(hd * rp.partial_rotary_factor / 2)
    return np.array([1.0] * n_rot + [1e30] * (hd // 2 - n_rot), dtype=np.float32)


def gguf_tensor_plan(cfg: DGConfig, *, nvfp4_experts: bool = False) -> list[GGUFTensorSpec]:
    """Every GGUF tensor of the diffusion-gemma layout for `cfg`, in llama-quantize file order.

    7 global tensors plus 23 per sliding and 22 per full-attention layer (692 for the 26B config); with
    `nvfp4_experts` 3 more per layer (split gate/up experts and their `.scale`s)."""
    shapes = {t.name: t.shape for t in checkpoint_tensors(cfg)}
    E, Ie, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    if nvfp4_experts and (H % NVFP4_BLOCK or Ie % NVFP4_BLOCK):
        raise ConfigError(
            f"{cfg.source}: NVFP4 experts need hidden_size ({H}) and moe_intermediate_size ({Ie}) "
            f"to be multiples of {NVFP4_BLOCK}"
        )

    def spec(name: str, torch_shape: tuple[int, ...], src: tuple[str, ...], role: str, layer: int | None, g=False):
        rev = tuple(reversed(torch_shape))
        return GGUFTensorSpec(name, rev, src, role, layer, tuple(shapes[h] for h in src), g)

    glob = [spec(g, shapes[h], (h,), COPY, None) for h, g in _GLOBAL_MAP.items()]
    glob.append(spec("rope_freqs.weight", (len(rope_freqs_values(cfg)),), (), ROPE_FREQS, None))
    out = sorted(glob, key=lambda s: s.gguf_name)
    for i in range(cfg.num_hidden_layers):
        p = f"{DEC}.layers.{i}."
        blk = f"blk.{i}."
        layer: list[GGUFTensorSpec] = []
        for suffix, gname in _LAYER_MAP.items():
            h = p + suffix
            if h not in shapes:  # v_proj on full-attention layers
                continue
            layer.append(spec(blk + gname, shapes[h], (h,), COPY, i))
        enc = f"{ENC}.layers.{i}.layer_scalar"
        layer.append(spec(blk + "enc_layer_output_scale.weight", shapes[enc], (enc,), COPY, i))
        if nvfp4_experts:
            gu, down, pes = p + "experts.gate_up_proj", p + "experts.down_proj", p + "router.per_expert_scale"
            drop = (blk + "ffn_gate_up_exps.weight", blk + "ffn_down_exps.scale", blk + "ffn_down_exps.weight")
            layer = [s for s in layer if s.gguf_name not in drop]
            layer += [
                spec(blk + "ffn_gate_exps.weight", (E, Ie, H), (gu,), GATE_EXPS, i, True),
                spec(blk + "ffn_up_exps.weight", (E, Ie, H), (gu,), UP_EXPS, i, True),
                spec(blk + "ffn_down_exps.weight", (E, H, Ie), (down,), COPY, i, True),
                spec(blk + "ffn_gate_exps.scale", (E,), (gu,), GATE_EXPS_SCALE, i),
                spec(blk + "ffn_up_exps.scale", (E,), (gu,), UP_EXPS_SCALE, i),
                spec(blk + "ffn_down_exps.scale", (E,), (pes, down), DOWN_EXPS_SCALE, i),
            ]
        out += sorted(layer, key=lambda s: s.gguf_name)
    return out


def gguf_tensor_data(cfg: DGConfig, spec: GGUFTensorSpec, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The data of one GGUF tensor, torch-shaped (`spec.torch_shape`). Copies and expert halves keep the
    source dtype (views, no copy); generated and scale tensors are float32. A source of the wrong shape raises
    CheckpointError."""
    if spec.role == ROPE_FREQS:
        return torch.from_numpy(rope_freqs_values(cfg))
    srcs = []
    for name, want in zip(spec.hf_sources, spec.hf_shapes, strict=True):
        t = get(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}: expected a torch.Tensor from the checkpoint, got {type(t).__name__}")
        if t.ndim == 0 and want == (1,):  # a scalar stored 0-d
            t = t.reshape(1)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)}, expected {want} for {spec.gguf_name}")
        srcs.append(t)
    Ie = cfg.moe_intermediate_size
    if spec.role == COPY:
        out = srcs[0]
    elif spec.role == GATE_EXPS:
        out = srcs[0][:, :Ie, :]
    elif spec.role == UP_EXPS:
        out = srcs[0][:, Ie:, :]
    elif spec.role == GATE_EXPS_SCALE:
        out = torch.from_numpy(nvfp4_global_scale(srcs[0][:, :Ie, :], n_lead=1))
    elif spec.role == UP_EXPS_SCALE:
        out = torch.from_numpy(nvfp4_global_scale(srcs[0][:, Ie:, :], n_lead=1))
    elif spec.role == DOWN_EXPS_SCALE:
        g = torch.from_numpy(nvfp4_global_scale(srcs[1], n_lead=1))
        out = srcs[0].to(torch.float32) * g
    else:
        raise ValueError(f"unknown role {spec.role!r} for {spec.gguf_name}")  # a bug, not bad input
    if tuple(out.shape) != spec.torch_shape:
        raise CheckpointError(f"{spec.gguf_name}: built shape {tuple(out.shape)}, expected {spec.torch_shape}")
    return out


def iter_gguf_tensors(
    cfg: DGConfig, get: Callable[[str], torch.Tensor], plan: list[GGUFTensorSpec] | None = None
) -> Iterator[tuple[GGUFTensorSpec, torch.Tensor]]:
    """Stream (spec, data) over the plan (default: the fused layout)."""
    for s in plan if plan is not None else gguf_tensor_plan(cfg):
        yield s, gguf_tensor_data(cfg, s, get)


def used_hf_tensors(cfg: DGConfig) -> set[str]:
    """The HF checkpoint tensors the GGUF is built from (all of `checkpoint_tensors(cfg)`)."""
    return {n for s in gguf_tensor_plan(cfg) for n in s.hf_sources}
