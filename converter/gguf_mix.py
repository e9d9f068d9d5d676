"""GGUF type mixes (`--type`) for the diffusion-gemma tensor set, reproducing llama.cpp's llama-quantize rules.

Mirrors `src/llama-quant.cpp` (ggml-org/llama.cpp; the rules PR #24423 and Unsloth's files were made with):
`tensor_allows_quantization` (only >= 2-D tensors whose name ends in "weight", no `_norm.weight`, no
`ffn_gate_inp.weight`), `tensor_get_category` (substring categories, in llama.cpp's order),
`llama_tensor_get_type_impl` (the branches that the mixes below can reach, including the `n_expert == 8`
bumps) and `tensor_type_fallback` (row length not a multiple of the block: Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, then F16). Tensors are visited in llama-quantize's order (layer, then name), which is what the
`attn_v` counter of `use_more_bits` depends on.

Mixes:
- bf16 / f16: every quantizable weight in that type (convert_hf_to_gguf's rule; same set), the rest F32.
- q8_0, q4_k_m, q5_k_m, q6_k, mxfp4_moe: llama-quantize's LLAMA_FTYPE_MOSTLY_* presets.
- nvfp4 (ours; no llama.cpp preset at PR #24423): experts (ne[2] > 1, split gate/up layout with per-expert
  `.scale` tensors) NVFP4, every other quantizable weight Q8_0, tied token_embd Q8_0, i.e. MXFP4_MOE's shape
  with NVFP4 experts, NVIDIA's experts-only NVFP4 recipe in GGUF form.
Deviation: where llama.cpp has no fallback (Q8_0 / MXFP4 / NVFP4 on a row length that does not fit the block,
only possible on toy configs) llama-quantize aborts; we fall back to F16 with a warning.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import ConfigError

from .gguf_names import GGUFTensorSpec, gguf_tensor_plan
from .gguf_quants import block_size, nvfp4_global_scale, quantize, tensor_nbytes

logger = logging.getLogger(__name__)

# --type -> (general.file_type, default tensor type)
MIXES: dict[str, tuple[FT, QT]] = {
    "bf16": (FT.MOSTLY_BF16, QT.BF16),
    "f16": (FT.MOSTLY_F16, QT.F16),
    "q8_0": (FT.MOSTLY_Q8_0, QT.Q8_0),
    "q4_k_m": (FT.MOSTLY_Q4_K_M, QT.Q4_K),
    "q5_k_m": (FT.MOSTLY_Q5_K_M, QT.Q5_K),
    "q6_k": (FT.MOSTLY_Q6_K, QT.Q6_K),
    "mxfp4_moe": (FT.MOSTLY_MXFP4_MOE, QT.MXFP4),
    "nvfp4": (FT.MOSTLY_NVFP4, QT.NVFP4),
}

# llama.cpp tensor_category values
TOKEN_EMBD, OUTPUT, OTHER = "token_embd", "output", "other"
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUTPUT = "attn_q", "attn_k", "attn_v", "attn_output"
ATTN_QKV, ATTN_KV_B = "attn_qkv", "attn_kv_b"
FFN_UP, FFN_GATE, FFN_DOWN = "ffn_up", "ffn_gate", "ffn_down"

_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0, QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0}


def file_type(mix: str) -> int:
    """`general.file_type` for a mix."""
    return int(_mix(mix)[0])


def ggml_type_name(t: QT) -> str:
    """ggml's spelling: f32, bf16, q8_0, q4_K, mxfp4 ..."""
    return t.name.lower().replace("_k", "_K")


def tensor_allows_quantization(spec: GGUFTensorSpec) -> bool:
    name = spec.gguf_name
    return (
        spec.n_dims >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


def tensor_category(name: str) -> str:
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for sub, cat in (
        ("attn_qkv.weight", ATTN_QKV),
        ("attn_kv_b.weight", ATTN_KV_B),
        ("attn_v.weight", ATTN_V),
        ("attn_k.weight", ATTN_K),
        ("attn_q.weight", ATTN_Q),
        ("attn_output.weight", ATTN_OUTPUT),
        ("ffn_up", FFN_UP),
        ("ffn_gate", FFN_GATE),
        ("ffn_down", FFN_DOWN),
    ):
        if sub in name:
            return cat
    return OTHER


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp: the first and last eighth, and every third layer in between, get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or _cmod(i_layer - n_layers // 8, 3) == 2


def _cmod(a: int, b: int) -> int:
    """C's % (truncates toward zero), as llama.cpp computes it."""
    return int(math.fmod(a, b))


@dataclass
class _State:
    n_expert: int
    n_layer: int
    tied: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def tensor_types(cfg: DGConfig, mix: str) -> list[tuple[GGUFTensorSpec, QT]]:
    """(spec, GGUF type) for every tensor of the plan of `mix`, in file order."""
    ftype, default = _mix(mix)
    plan = gguf_tensor_plan(cfg, nvfp4_experts=(mix == "nvfp4"))
    st = _State(
        n_expert=max(1, cfg.num_experts),
        n_layer=cfg.num_hidden_layers,
        tied=not any(s.gguf_name == "output.weight" for s in plan),
        n_attention_wv=sum(tensor_category(s.gguf_name) in (ATTN_V, ATTN_QKV, ATTN_KV_B) for s in plan),
    )
    out = []
    n_fallback = 0
    for s in plan:
        if not tensor_allows_quantization(s):
            t = QT.F32  # what the converter writes for 1-D, norms, router and `.scale` tensors
        elif default in (QT.BF16, QT.F16):
            t = default  # not a quantized type: llama.cpp applies no mix rules
        else:
            want = _get_type(st, s, default, ftype)
            t = _fallback(s, want)
            n_fallback += t != want
        out.append((s, t))
    if n_fallback:
        logger.info(
            "--type %s: %d of %d tensors fell back to another type (row length vs block size)", mix, n_fallback, len(out)
        )
    return out


def type_table(cfg: DGConfig, mix: str) -> dict[QT, int]:
    """Tensor count per GGUF type, most frequent first."""
    return dict(Counter(t for _, t in tensor_types(cfg, mix)).most_common())


def mix_nbytes(cfg: DGConfig, mix: str, alignment: int = 1) -> int:
    """Tensor data bytes of the GGUF; `alignment=32` (GGUF's default) includes the padding after each tensor."""
    return sum(-(-tensor_nbytes(t, s.torch_shape) // alignment) * alignment for s, t in tensor_types(cfg, mix))


def format_type_table(cfg: DGConfig, mix: str) -> str:
    rows = tensor_types(cfg, mix)
    count: Counter[QT] = Counter()
    size: Counter[QT] = Counter()
    for s, t in rows:
        count[t] += 1
        size[t] += tensor_nbytes(t, s.torch_shape)
    total = sum(size.values())
    padded = mix_nbytes(cfg, mix, alignment=32)
    lines = [
        f"--type {mix}: {len(rows)} tensors, {total:,} bytes of tensor data ({padded:,} with 32-byte alignment, "
        f"{padded / 2**30:.2f} GiB)",
        f"{'type':<8}{'tensors':>8}{'bytes':>18}",
    ]
    for t, n in count.most_common():
        lines.append(f"{ggml_type_name(t):<8}{n:>8}{size[t]:>18,}")
    return "\n".join(lines)


def quantize_planned(
    spec: GGUFTensorSpec, data: torch.Tensor | np.ndarray, qtype: QT, importance: np.ndarray | None = None
) -> np.ndarray:
    """Encode one tensor of the plan. NVFP4 weights whose global scale is stored in a `.scale` tensor
    (`spec.nvfp4_global`) are quantized relative to `nvfp4_global_scale(data)` per expert, exactly the value
    `gguf_tensor_data` writes there (times per_expert_scale for the down experts); other NVFP4 tensors use no
    global scale (1.0, ggml's reference convention)."""
    if qtype == QT.NVFP4:
        g = nvfp4_global_scale(data, n_lead=1) if spec.nvfp4_global else np.ones(1, dtype=np.float32)
        return quantize(data, qtype, importance=importance, global_scale=g)
    return quantize(data, qtype, importance=importance)


# ---- llama.cpp rules -----------------------------------------------------------------------------------------


def _mix(mix: str) -> tuple[FT, QT]:
    if mix not in MIXES:
        raise ConfigError(f"unknown GGUF type {mix!r}; choose one of {', '.join(MIXES)}")
    return MIXES[mix]


def _layer_of(st: _State, counter: int, name: str) -> tuple[int, int]:
    """llama.cpp layer_info: with several experts the layer is parsed from `blk.N.`, else the running counter."""
    if st.n_expert > 1:
        if not name.startswith("blk."):
            raise ConfigError(f"cannot determine the layer of tensor {name}")
        return int(name.split(".")[1]), st.n_layer
    return counter, st.n_layer


def _get_type(st: _State, s: GGUFTensorSpec, new_type: QT, ftype: FT) -> QT:
    cat = tensor_category(s.gguf_name)
    ne = s.gguf_shape
    if cat == OUTPUT or (st.tied and cat == TOKEN_EMBD):
        if ftype in (FT.MOSTLY_MXFP4_MOE, FT.MOSTLY_NVFP4):
            return QT.Q8_0
        if ne[0] % block_size(new_type):
            return QT.Q8_0
        return QT.Q6_K if new_type != QT.Q8_0 else new_type
    if ftype in (FT.MOSTLY_MXFP4_MOE, FT.MOSTLY_NVFP4):
        is_expert = len(ne) > 2 and ne[2] > 1
        return (QT.MXFP4 if ftype == FT.MOSTLY_MXFP4_MOE else QT.NVFP4) if is_expert else QT.Q8_0
    if cat == TOKEN_EMBD:
        return new_type  # untied embedding: no rule for these ftypes
    if cat in (ATTN_V, ATTN_QKV, ATTN_KV_B):
        if ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new_type = QT.Q6_K
        if st.n_expert == 8:
            new_type = QT.Q8_0
        st.i_attention_wv += 1
    elif cat == ATTN_K:
        if st.n_expert == 8:
            new_type = QT.Q8_0
    elif cat == FFN_DOWN:
        i_layer, n_layer = _layer_of(st, st.i_ffn_down, s.gguf_name)
        if ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(i_layer, n_layer):
            new_type = QT.Q6_K
        st.i_ffn_down += 1
    elif cat == ATTN_OUTPUT:
        if st.n_expert == 8 and ftype == FT.MOSTLY_Q4_K_M:
            new_type = QT.Q5_K
    return new_type


def _fallback(s: GGUFTensorSpec, t: QT) -> QT:
    ncols = s.gguf_shape[0]
    if ncols % block_size(t) == 0:
        return t
    ret = _FALLBACK.get(t)
    if ret is None or ncols % block_size(ret):
        ret = QT.F16
    log = logger.warning if ret == QT.F16 else logger.debug  # the F16 case is ours: llama.cpp would abort
    log(
        "%s: ncols %d not divisible by %d (%s) -> falling back to %s",
        s.gguf_name, ncols, block_size(t), ggml_type_name(t), ggml_type_name(ret),
    )
    return ret
