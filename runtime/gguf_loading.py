"""Load a GGUF in llama.cpp's `diffusion-gemma` layout (ours or Unsloth's, shared/reference/gguf.md) into `DGModel`.

Everything comes from the file: the config is rebuilt from the metadata keys (HF-style dicts fed to
`DGConfig.from_dict`, sampler defaults from the `diffusion.eb_*` keys when present), the tokenizer and chat template
from the `tokenizer.*` keys. Tensors are read with gguf-py's memory-mapped `GGUFReader`; quantized ones stay in
their GGUF blocks (`GGUFLinear`, `GGUFEmbedding`, `GGUFExperts` decode them per call), F32/F16/BF16 ones become
ordinary parameters in the compute dtype.

Layout handling (the inverse of converter/gguf_names.py):
- fused `ffn_gate_up_exps` [E, 2Ie, H] is HF's `experts.gate_up_proj`; the split form (`ffn_gate_exps` +
  `ffn_up_exps`, written for NVFP4) is accepted, with optional per-expert `.scale` companions;
- `ffn_down_exps.scale` is `router.per_expert_scale` (it already carries any NVFP4 down-projection scale),
  `ffn_gate_inp.scale` is `router.scale`, `enc_layer_output_scale` the encoder's layer scalar;
- `rope_freqs` (ones, then 1e30 for the unrotated pairs) gives the full-attention partial rotary factor; it must be
  exactly what the rebuilt config generates;
- optional companions: `<weight>.scale` (a second-level scale, multiplied in), `<weight>.input_scale` (activation
  scale, unused by weight-only decoding) and a tied `output.weight` identical to `token_embd.weight`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFValueType as VT

from dgemma.converter.gguf_names import ARCH, COPY, GGUFTensorSpec, gguf_tensor_plan, rope_freqs_values

from .config import FULL, SLIDING, DGConfig
from .errors import ConfigError, FormatError
from .gguf_linear import DENSE_TYPES, ExpertPart, GGUFEmbedding, GGUFExperts, GGUFLinear, can_dequantize, \
    dequantize_numpy
from .loading import runtime_name
from .model import DGModel, Linear, rope_inv_freq
from .tokenizer import Tokenizer

log = logging.getLogger("dgemma.gguf_loading")

A = ARCH
QT = gguf.GGMLQuantizationType
_INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
_FLOAT_TYPES = (VT.FLOAT32, VT.FLOAT64)

REQUIRED_KEYS = (
    f"{A}.block_count", f"{A}.context_length", f"{A}.embedding_length", f"{A}.feed_forward_length",
    f"{A}.attention.head_count", f"{A}.attention.head_count_kv", f"{A}.rope.freq_base",
    f"{A}.attention.layer_norm_rms_epsilon", f"{A}.expert_count", f"{A}.expert_used_count",
    f"{A}.attention.key_length", f"{A}.attention.sliding_window", f"{A}.attention.sliding_window_pattern",
    f"{A}.attention.key_length_swa", f"{A}.expert_feed_forward_length", "diffusion.canvas_length",
    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
)


_SCALED_WEIGHTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps",
                   "ffn_up_exps", "ffn_down_exps", "self_cond_gate", "self_cond_up", "self_cond_down")


@dataclass
class GGUFFile:
    path: Path
    kv: dict[str, Any]  # key -> Python value (lists for arrays)
    kv_types: dict[str, list[VT]]  # key -> [type] or [ARRAY, element type]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor (memory-mapped data)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header (tensor data stays memory-mapped). FormatError if it is not readable GGUF."""
    path = Path(path)
    try:
        # copy-on-write mapping: tensors can be wrapped by torch without a copy, the file is never written
        r = gguf.GGUFReader(path, mode="c")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
    kv: dict[str, Any] = {}
    types: dict[str, list[VT]] = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            kv[key] = f.contents()
        except (ValueError, UnicodeDecodeError, IndexError) as e:
            raise FormatError(f"{path}: metadata key {key!r} cannot be decoded ({e})") from None
        types[key] = list(f.types)
    return GGUFFile(path, kv, types, {t.name: t for t in r.tensors})


# ---- config from metadata -------------------------------------------------------------------------------------


class _KV:
    """Typed access to the metadata; every error names the key and the file."""

    def __init__(self, f: GGUFFile):
        self.f = f

    def _check(self, key: str, allowed: tuple[VT, ...], what: str, array: bool = False) -> Any:
        t = self.f.kv_types[key]
        ok = (t[0] == VT.ARRAY and t[-1] in allowed) if array else (t[0] in allowed)
        if not ok:
            raise FormatError(f"{self.f.path}: metadata key {key} has type {'/'.join(x.name for x in t)}, "
                              f"expected {what}")
        return self.f.kv[key]

    def has(self, key: str) -> bool:
        return key in self.f.kv

    def int(self, key: str, default: Any = None) -> Any:
        if key not in self.f.kv:
            return default
        return int(self._check(key, _INT_TYPES, "an integer"))

    def float(self, key: str, default: Any = None) -> Any:
        if key not in self.f.kv:
            return default
        v = self._check(key, _FLOAT_TYPES + _INT_TYPES, "a number")
        # float32 keys: the shortest decimal that round-trips (0.4, not 0.4000000059604645)
        return float(str(np.float32(v))) if self.f.kv_types[key][0] == VT.FLOAT32 else float(v)

    def bool(self, key: str, default: Any = None) -> Any:
        if key not in self.f.kv:
            return default
        return bool(self._check(key, (VT.BOOL,), "a bool"))

    def int_or_array(self, key: str, n: int) -> list[int]:
        if self.f.kv_types[key][0] == VT.ARRAY:
            v = [int(x) for x in self._check(key, _INT_TYPES, "an integer array", array=True)]
            if len(v) != n:
                raise FormatError(f"{self.f.path}: {key} has {len(v)} entries, block_count is {n}")
            return v
        return [self.int(key)] * n


def _sliding_pattern(kv: _KV, n: int) -> list[bool]:
    key = f"{A}.attention.sliding_window_pattern"
    t = kv.f.kv_types[key]
    if t[0] == VT.ARRAY:
        v = [bool(x) for x in kv._check(key, (VT.BOOL,), "a bool array", array=True)]
        if len(v) != n:
            raise FormatError(f"{kv.f.path}: {key} has {len(v)} entries, block_count is {n}")
        return v
    period = kv.int(key)  # llama.cpp's scalar form: every period-th layer is full attention
    if period <= 0:
        raise FormatError(f"{kv.f.path}: {key} = {period} must be > 0")
    return [(i + 1) % period != 0 for i in range(n)]


def _partial_factor(f: GGUFFile, head_dim: int) -> float:
    """The full-attention partial_rotary_factor that `rope_freqs` encodes (n ones, then >= 1e30)."""
    t = f.tensors.get("rope_freqs.weight")
    if t is None:
        raise FormatError(f"{f.path}: missing tensor rope_freqs.weight")
    if t.tensor_type != QT.F32 or t.n_elements != head_dim // 2:
        raise FormatError(f"{f.path}: rope_freqs.weight must be F32 with {head_dim // 2} values "
                          f"(key_length / 2), got {t.tensor_type.name} with {t.n_elements}")
    v = np.asarray(t.data, dtype=np.float32).reshape(-1)
    n_rot = int(np.argmax(v != 1.0)) if (v != 1.0).any() else len(v)
    if not (v[n_rot:] >= 1e29).all():
        raise FormatError(f"{f.path}: rope_freqs.weight holds general frequency factors; dgemma supports only the "
                          "proportional form (ones, then 1e30 for unrotated pairs)")
    if n_rot == len(v):
        return 1.0
    for prf in (2 * n_rot / head_dim, (2 * n_rot + 0.5) / head_dim):
        # the factor both rope_inv_freq (int(prf * D // 2)) and the converter (int(D * prf / 2)) map to n_rot
        if int(prf * head_dim // 2) == n_rot and int(head_dim * prf / 2) == n_rot:
            return prf
    raise FormatError(f"{f.path}: cannot express {n_rot} rotated pairs of {head_dim // 2} as a rotary factor")


def gguf_config_dicts(f: GGUFFile, eos_ids: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The HF-style config.json and generation_config.json dicts the GGUF metadata describes."""
    arch = f.kv.get("general.architecture")
    if arch is None:
        raise FormatError(f"{f.path}: no general.architecture key; not a model GGUF")
    if arch != ARCH:
        raise FormatError(f"{f.path}: GGUF architecture is {arch!r}, not {ARCH!r}; dgemma only runs DiffusionGemma")
    missing = [k for k in REQUIRED_KEYS if k not in f.kv]
    if missing:
        raise FormatError(f"{f.path}: missing required metadata keys: {', '.join(missing)}")
    kv = _KV(f)
    L = kv.int(f"{A}.block_count")
    if L <= 0:
        raise FormatError(f"{f.path}: {A}.block_count must be > 0")
    hd_full, hd_swa = kv.int(f"{A}.attention.key_length"), kv.int(f"{A}.attention.key_length_swa")
    for k, v, ref in ((f"{A}.attention.value_length", kv.int(f"{A}.attention.value_length", hd_full), hd_full),
                      (f"{A}.attention.value_length_swa", kv.int(f"{A}.attention.value_length_swa", hd_swa), hd_swa)):
        if v != ref:
            raise FormatError(f"{f.path}: {k} = {v} differs from the key length {ref} (DiffusionGemma has k == v)")
    if kv.bool(f"{A}.attention.causal", False):
        raise FormatError(f"{f.path}: {A}.attention.causal is true; the DiffusionGemma decoder is bidirectional")
    for k in (f"{A}.attention.shared_kv_layers", f"{A}.embedding_length_per_layer_input"):
        if kv.int(k, 0) != 0:
            raise FormatError(f"{f.path}: {k} = {kv.int(k)} is not supported (DiffusionGemma has 0)")
    rot_full = kv.int(f"{A}.rope.dimension_count", hd_full)
    rot_swa = kv.int(f"{A}.rope.dimension_count_swa", hd_swa)
    if rot_full != hd_full:
        raise FormatError(f"{f.path}: {A}.rope.dimension_count = {rot_full} differs from key_length {hd_full}; "
                          "partial RoPE must come from rope_freqs")
    if not 0 < rot_swa <= hd_swa:
        raise FormatError(f"{f.path}: {A}.rope.dimension_count_swa = {rot_swa} outside (0, {hd_swa}]")
    sliding = _sliding_pattern(kv, L)
    if sliding[-1]:
        raise FormatError(f"{f.path}: the last layer must be full attention (sliding_window_pattern ends in true)")
    n_kv = kv.int_or_array(f"{A}.attention.head_count_kv", L)
    kv_swa = next((n_kv[i] for i in range(L) if sliding[i]), n_kv[0])
    per_layer = {}
    for i in range(L):
        if not sliding[i]:
            per_layer[f"{i:02d}"] = {"head_dim": hd_full, "num_key_value_heads": n_kv[i]}
        elif n_kv[i] != kv_swa:
            per_layer[f"{i:02d}"] = {"num_key_value_heads": n_kv[i]}
    emb = f.tensors.get("token_embd.weight")
    if emb is None:
        raise FormatError(f"{f.path}: missing tensor token_embd.weight")
    vocab = int(emb.shape[1]) if len(emb.shape) == 2 else -1
    if vocab <= 0:
        raise FormatError(f"{f.path}: token_embd.weight has shape {emb.shape.tolist()}, expected (n_embd, n_vocab)")
    theta = kv.float(f"{A}.rope.freq_base")
    text = {
        "model_type": "diffusion_gemma_text",
        "num_hidden_layers": L,
        "hidden_size": kv.int(f"{A}.embedding_length"),
        "intermediate_size": kv.int(f"{A}.feed_forward_length"),
        "num_attention_heads": kv.int(f"{A}.attention.head_count"),
        "num_key_value_heads": kv_swa,
        "head_dim": hd_swa,
        "layer_types": [SLIDING if s else FULL for s in sliding],
        "per_layer_config": per_layer,
        "sliding_window": kv.int(f"{A}.attention.sliding_window"),
        "rope_parameters": {
            FULL: {"rope_type": "proportional", "rope_theta": theta,
                   "partial_rotary_factor": _partial_factor(f, hd_full)},
            SLIDING: {"rope_type": "default", "rope_theta": kv.float(f"{A}.rope.freq_base_swa", theta),
                      "partial_rotary_factor": rot_swa / hd_swa},
        },
        "num_experts": kv.int(f"{A}.expert_count"),
        "top_k_experts": kv.int(f"{A}.expert_used_count"),
        "moe_intermediate_size": kv.int(f"{A}.expert_feed_forward_length"),
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": kv.float(f"{A}.final_logit_softcapping"),
        "rms_norm_eps": kv.float(f"{A}.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": kv.int(f"{A}.context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": True,
    }
    if text["final_logit_softcapping"] is not None and text["final_logit_softcapping"] <= 0:
        text["final_logit_softcapping"] = None  # llama.cpp: 0 means no softcap
    bos, pad = kv.int("tokenizer.ggml.bos_token_id"), kv.int("tokenizer.ggml.padding_token_id")
    root = {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": kv.int("diffusion.canvas_length"), "tie_word_embeddings": True, "text_config": text,
        "eos_token_id": list(eos_ids), "bos_token_id": bos, "pad_token_id": pad,
    }
    gen: dict[str, Any] = {"eos_token_id": list(eos_ids), "bos_token_id": bos, "pad_token_id": pad}
    for key, name in (("eb_max_steps", "max_denoising_steps"), ("eb_stability_threshold", "stability_threshold")):
        if kv.has(f"diffusion.{key}"):
            gen[name] = kv.int(f"diffusion.{key}")
    for key, name in (("eb_t_min", "t_min"), ("eb_t_max", "t_max"), ("eb_confidence_threshold", "confidence_threshold")):
        if kv.has(f"diffusion.{key}"):
            gen[name] = kv.float(f"diffusion.{key}")
    if kv.has("diffusion.eb_entropy_bound"):
        gen["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig",
                                 "entropy_bound": kv.float("diffusion.eb_entropy_bound")}
    return root, gen


# ---- tensors --------------------------------------------------------------------------------------------------


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


def _check_tensors(f: GGUFFile, cfg: DGConfig, plan: list[GGUFTensorSpec]) -> dict[int, bool]:
    """Exactly the plan's tensors (split experts allowed per layer) plus allowed companions, with the right
    shapes and decodable types. Returns {layer: split_experts}."""
    names = set(f.tensors)
    want: dict[str, tuple[int, ...]] = {s.gguf_name: s.gguf_shape for s in plan}
    E, Ie, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    split: dict[int, bool] = {}
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        fused = b + "ffn_gate_up_exps.weight"
        split[i] = fused not in names and (b + "ffn_gate_exps.weight") in names
        if split[i]:
            del want[fused]
            want[b + "ffn_gate_exps.weight"] = want[b + "ffn_up_exps.weight"] = (H, Ie, E)
    missing = [n for n in want if n not in names]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise FormatError(f"{f.path}: missing tensors: {', '.join(missing[:8])}{more}")
    # llama.cpp's generic loader creates optional `.scale` / `.input_scale` tensors (TENSOR_NOT_REQUIRED) for
    # these weights only; never for ffn_gate_up_exps, and ffn_down_exps.scale is per_expert_scale (in the plan)
    companions: dict[str, tuple[tuple[int, ...], ...]] = {}
    for n, shp in want.items():
        base = n[: -len(".weight")]
        kind = base.rsplit(".", 1)[-1]
        if n.endswith(".weight") and kind in _SCALED_WEIGHTS:
            ok = ((1,), (shp[2],)) if len(shp) == 3 else ((1,),)
            if kind != "ffn_down_exps":
                companions[base + ".scale"] = ok
            companions[base + ".input_scale"] = ok
    companions["output.weight"] = (want["token_embd.weight"],)
    unexpected = [n for n in names if n not in want and n not in companions]
    if unexpected:
        more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise FormatError(f"{f.path}: unexpected tensors for the diffusion-gemma layout: "
                          f"{', '.join(sorted(unexpected)[:8])}{more}")
    for n in names:
        t = f.tensors[n]
        shp = _shape(t)
        ok = (want[n],) if n in want else companions[n]
        if shp not in ok:
            raise FormatError(f"{f.path}: tensor {n} has shape {list(shp)}, expected {list(ok[0])}")
        if not can_dequantize(t.tensor_type):
            raise FormatError(f"{f.path}: tensor {n} has type {t.tensor_type.name}, which dgemma cannot decode")
    if "output.weight" in names:
        a, b = f.tensors["output.weight"], f.tensors["token_embd.weight"]
        if a.tensor_type != b.tensor_type or not np.array_equal(a.data, b.data):
            raise FormatError(f"{f.path}: output.weight differs from token_embd.weight; an untied head is not "
                              "supported (DiffusionGemma ties them)")
    n_in = [n for n in names if n.endswith(".input_scale")]
    if n_in:
        log.info("%s: ignoring %d .input_scale tensors (activation scales; weights are decoded exactly)",
                 f.path, len(n_in))
    return split


def _dense(t: Any) -> torch.Tensor:
    """A tensor's values as float32, torch order."""
    shp = tuple(reversed(_shape(t)))
    if t.tensor_type in (QT.F32, QT.F16):
        return torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(shp))
    return torch.from_numpy(dequantize_numpy(np.asarray(t.data), t.tensor_type, shp))


def _raw(t: Any) -> torch.Tensor:
    """The GGUF blocks of a quantized tensor as uint8 [..., row bytes], no copy (memory-mapped)."""
    return torch.from_numpy(t.data)


class GGUFDGModel(DGModel):
    """`DGModel` whose tied embedding may be a `GGUFEmbedding` (everything else is module swaps)."""

    def __init__(self, cfg: DGConfig, dtype: torch.dtype):
        super().__init__(cfg)
        self._compute_dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._compute_dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def _scale(self) -> torch.Tensor:
        return torch.tensor(self.cfg.embed_scale).to(self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed_tokens, GGUFEmbedding):
            return self.embed_tokens.lookup(ids, self.dtype) * self._scale().to(ids.device)
        return super().embed(ids)

    def soft_embedding(self, sc_logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        if not isinstance(self.embed_tokens, GGUFEmbedding):
            return super().soft_embedding(sc_logits, top_k)
        if top_k is not None and top_k < sc_logits.shape[-1]:
            # as DGModel: the k most likely tokens per position, renormalized; only their rows are decoded
            vals, idx = sc_logits.float().topk(top_k, dim=-1)  # [B, C, k]
            p = torch.softmax(vals, dim=-1).to(self.dtype)
            soft = torch.einsum("bck,bckh->bch", p, self.embed_tokens.lookup(idx, self.dtype))
            return soft * self._scale().to(p.device)
        p = sc_logits.softmax(dim=-1, dtype=torch.float32).to(self.dtype)
        return self.embed_tokens.matmul(p) * self._scale().to(p.device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed_tokens, GGUFEmbedding):
            x = self.embed_tokens.matmul_t(h).float()
            cap = self.cfg.final_logit_softcapping
            return torch.tanh(x / cap) * cap if cap else x
        return super().logits(h)


class _Builder:
    """Fills a meta-built GGUFDGModel from the file's tensors."""

    def __init__(self, f: GGUFFile, model: GGUFDGModel, device: torch.device, dtype: torch.dtype,
                 plan_names: set[str]):
        self.f, self.m, self.device, self.dtype = f, model, device, dtype
        self.plan_names = plan_names  # `.scale` tensors of the plan (router.scale, per_expert_scale) are not companions

    def _set(self, name: str, value: torch.Tensor) -> None:
        mod_name, _, attr = name.rpartition(".")
        mod = self.m.get_submodule(mod_name) if mod_name else self.m
        if isinstance(getattr(mod, attr), torch.nn.Parameter):
            setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))
        else:
            mod._buffers[attr] = value

    def _swap(self, path: str, module: torch.nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.m.get_submodule(parent) if parent else self.m, attr, module)

    def _scale_of(self, gname: str) -> torch.Tensor | None:
        name = gname[: -len(".weight")] + ".scale"
        if name in self.plan_names:
            return None
        t = self.f.tensors.get(name)
        return None if t is None else _dense(t).reshape(-1)

    def dense(self, rt_name: str, gname: str) -> None:
        mod_name, _, attr = rt_name.rpartition(".")
        shape = tuple(getattr(self.m.get_submodule(mod_name), attr).shape)
        self._set(rt_name, _dense(self.f.tensors[gname]).reshape(shape).to(device=self.device, dtype=self.dtype))

    def linear(self, rt_name: str, gname: str) -> None:
        mod_path = rt_name[: -len(".weight")]
        mod = self.m.get_submodule(mod_path)
        assert isinstance(mod, Linear), mod_path
        t, scale = self.f.tensors[gname], self._scale_of(gname)
        if t.tensor_type in DENSE_TYPES:
            w = _dense(t)
            if scale is not None:
                w = w * scale  # a dense weight with a second-level scale: fold it in
            self._set(rt_name, w.to(device=self.device, dtype=self.dtype))
        else:
            q = GGUFLinear(mod.in_features, mod.out_features, t.tensor_type, _raw(t).to(self.device),
                           None if scale is None else scale.to(self.device))
            self._swap(mod_path, q)

    def embedding(self, gname: str) -> None:
        t = self.f.tensors[gname]
        V, H = self.m.cfg.vocab_size, self.m.cfg.hidden_size
        if t.tensor_type in DENSE_TYPES:
            self._set("embed_tokens.weight", _dense(t).to(device=self.device, dtype=self.dtype))
        else:
            self._swap("embed_tokens", GGUFEmbedding(V, H, t.tensor_type, _raw(t).to(self.device)))

    def _part(self, gname: str, rows: int, cols: int, with_scale: bool) -> ExpertPart:
        t = self.f.tensors[gname]
        scale = self._scale_of(gname) if with_scale else None
        if scale is not None:
            scale = scale.expand(t.shape[2]).contiguous().to(self.device)  # (1,) -> one per expert
        if t.tensor_type in DENSE_TYPES:
            return ExpertPart(rows, cols, _dense(t).to(device=self.device, dtype=self.dtype), None, scale)
        return ExpertPart(rows, cols, _raw(t).to(self.device), t.tensor_type, scale)

    def experts(self, i: int, split: bool) -> None:
        cfg, b = self.m.cfg, f"blk.{i}."
        E, Ie, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        down = self._part(b + "ffn_down_exps.weight", H, Ie, with_scale=False)  # its .scale is per_expert_scale
        if split:
            gate = self._part(b + "ffn_gate_exps.weight", Ie, H, True)
            up = self._part(b + "ffn_up_exps.weight", Ie, H, True)
            parts = dict(gate=gate, up=up)
        else:
            parts = dict(gate_up=self._part(b + "ffn_gate_up_exps.weight", 2 * Ie, H, True))
        every = [*parts.values(), down]
        if all(p.qtype is None for p in every):  # all dense: the plain module, scales folded in
            def w(p: ExpertPart) -> torch.Tensor:
                return p.data if p.scale is None else (p.data.float() * p.scale[:, None, None]).to(self.dtype)

            gu = w(parts["gate_up"]) if "gate_up" in parts else torch.cat([w(parts["gate"]), w(parts["up"])], 1)
            self._set(f"layers.{i}.experts.gate_up_proj", gu)
            self._set(f"layers.{i}.experts.down_proj", w(down))
        else:
            self._swap(f"layers.{i}.experts", GGUFExperts(E, down=down, **parts))


def load_gguf(path: str | Path, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> tuple[DGModel, Tokenizer]:
    """Load a diffusion-gemma GGUF: (model, tokenizer), both from the file alone.

    dtype None: float32 on CPU, bfloat16 elsewhere. Quantized weights stay in GGUF blocks on `device`
    (memory-mapped on CPU); F32/F16/BF16 weights become parameters in `dtype`."""
    f = read_gguf(path)
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if f.kv.get("general.architecture") not in (ARCH, None):
        raise FormatError(f"{f.path}: GGUF architecture is {f.kv['general.architecture']!r}, not {ARCH!r}; "
                          "dgemma only runs DiffusionGemma")
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        if k not in f.kv:
            raise FormatError(f"{f.path}: missing required metadata key {k}")
    tok = Tokenizer.from_gguf_kv(f.kv)
    tok.source = str(f.path)
    root, gen = gguf_config_dicts(f, tok.eos_ids)
    try:
        cfg = DGConfig.from_dict(root, gen, source=f"{f.path} [metadata]", gen_source=f"{f.path} [diffusion.eb_*]")
    except ConfigError as e:
        raise FormatError(f"{f.path}: the metadata does not describe a valid DiffusionGemma: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise FormatError(f"{f.path}: {tok.vocab_size} tokens but token_embd has {cfg.vocab_size} rows")
    plan = gguf_tensor_plan(cfg)
    rf = np.asarray(f.tensors["rope_freqs.weight"].data, dtype=np.float32).reshape(-1)
    if not np.array_equal(rf, rope_freqs_values(cfg)):
        raise FormatError(f"{f.path}: rope_freqs.weight does not match the rotary factor of the metadata")
    split = _check_tensors(f, cfg, plan)

    with torch.device("meta"):
        model = GGUFDGModel(cfg, dtype)
    bld = _Builder(f, model, device, dtype, {s.gguf_name for s in plan})
    for s in plan:
        n = s.gguf_name
        if n == "rope_freqs.weight" or ".ffn_gate_up_exps." in n or ".ffn_down_exps.weight" in n:
            continue  # generated / handled per layer below
        assert s.role == COPY, s
        rt = runtime_name(s.hf_sources[0])
        if n == "token_embd.weight":
            bld.embedding(n)
        elif len(s.gguf_shape) == 2 and isinstance(model.get_submodule(rt.rpartition(".")[0]), Linear):
            bld.linear(rt, n)
        else:
            bld.dense(rt, n)
    for i in range(cfg.num_hidden_layers):
        bld.experts(i, split[i])
    for lt, p in cfg.rope.items():
        hd = next(g.head_dim for g in cfg.layers if g.layer_type == lt)
        model._buffers[f"inv_freq_{lt}"] = rope_inv_freq(p, hd).to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise RuntimeError(f"GGUF loader left tensors unset: {left[:5]}")  # a bug, not bad input
    model.eval()
    n_q = sum(isinstance(m, (GGUFLinear, GGUFEmbedding, GGUFExperts)) for m in model.modules())
    log.info("loaded %s: %d tensors, %d modules in GGUF blocks", f.path, len(f.tensors), n_q)
    return model, tok
