"""Memory planner: what a DiffusionGemma run needs on the compute device, item by item, and whether it fits.

`plan(source, fmt, context_length, vram_budget)` works on
- a `DGConfig` (or the path of a `config.json` directory) plus a format name (no weights needed),
- a checkpoint directory (HF bf16/fp32 or NVFP4) or a `.gguf` file: the tensors actually stored there,
- a loaded `DGModel`: the tensors it actually holds.
Weight bytes come from the same tensor lists the loaders and converters use (`hf_names.checkpoint_tensors`,
`converter.policy.tensor_plan`, `converter.gguf_mix.tensor_types`), so plan and loaded model agree.

Non-weight items and the assumptions behind them (printed with every table):
- KV cache exactly as `KVCache` allocates it: full-attention layers `context + canvas` slots, sliding layers
  `min(window - 1 + rollback, context) + canvas` slots, K and V each `kv_heads x head_dim`, compute dtype.
- Decode-step scratch at canvas C: the vocabulary-sized tensors (fp32 logits with softcap and temperature applied
  in place, plus the self-conditioning logits of the previous and the current step in the compute dtype:
  `4 + 2 * dtype_bytes` bytes per logit), attention temporaries (K/V repeated to all query heads where SDPA
  cannot broadcast GQA: head_dim > 256), and hidden/MoE activations of one layer.
- Prefill scratch for a prompt chunk of `prefill_chunk` tokens (same items without the vocabulary tensors).
  Scratch = the larger of the two (they never coexist).
- A fixed allowance for the CUDA context, cuBLAS/Triton workspaces and allocator slack (`CUDA_CONTEXT_BYTES`).
GiB = 2^30 bytes; a "16 GB" graphics card has 16 GiB.

Verdicts, for a budget: fits fully resident; fits with N experts per layer resident (the rest streamed from host
memory every pass, `expert_store`); fits with N experts per layer and the non-expert layer weights streamed one
layer ahead (`weight_stream`); does not fit (then `min_budget` is the smallest budget that would work).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import DGConfig
from .errors import ConfigError, DGemmaError

GiB = 2**30
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS/Triton workspaces + allocator slack, assumed
DEFAULT_PREFILL_CHUNK = 1024
GQA_BROADCAST_MAX_HEAD_DIM = 256  # model.Attention._attend repeats K/V above this head_dim (or with a mask)

DENSE_FORMATS = {"bf16": 2, "f16": 2, "fp32": 4}
NVFP4_FORMATS = {"nvfp4-experts": "experts", "nvfp4-default": "default"}

# weight rows, in table order: (key, label)
WEIGHT_ROWS = (
    ("embedding", "embeddings + tied head"),
    ("attention", "attention q/k/v/o"),
    ("dense_mlp", "dense MLP"),
    ("experts", "routed experts"),
    ("router", "routers"),
    ("norms+scalars", "norms + scalars"),
    ("self_conditioning", "self-conditioning"),
)
_ROW_OF = {"norms": "norms+scalars", "scalars": "norms+scalars"}

_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16,
                "fp16": torch.float16, "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32}


def format_names() -> list[str]:
    """Every format name `plan` accepts with a config."""
    from ..converter.gguf_mix import MIXES

    gguf = [m for m in MIXES if m not in ("bf16", "f16", "nvfp4")] + ["gguf-" + m for m in MIXES]
    return [*DENSE_FORMATS, *NVFP4_FORMATS, *gguf]


def parse_size(s: str | int | float) -> int:
    """'16' / 16 -> 16 GiB; '16GiB', '16G' -> 16 GiB; '16GB' -> 16e9 bytes; '500MiB', '500MB' likewise."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if not math.isfinite(s) or s <= 0:
            raise DGemmaError(f"memory size must be a positive number of GiB, got {s!r}")
        return int(s * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    units = {"": GiB, "g": GiB, "gib": GiB, "gb": 10**9, "m": 2**20, "mib": 2**20, "mb": 10**6, "t": 2**40,
             "tib": 2**40, "tb": 10**12}
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise DGemmaError(f"cannot read memory size {s!r} (examples: 16, 16GiB, 16GB, 12000MiB)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


# ---- tensor tallies -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightItem:
    name: str
    component: str  # a WEIGHT_ROWS key
    layer: int | None
    nbytes: int
    fmt: str  # storage format label ("bf16", "nvfp4", "q4_K", ...)
    streamable: bool  # a layer matrix that weight streaming may move (attention, dense MLP, router.proj)


def component_of(name: str) -> tuple[str, int | None]:
    """(weight row, layer) of an HF checkpoint name, a GGUF-free runtime name (`DGModel` attribute path) or an
    NVFP4 companion name (`...weight_scale`, `experts.3.gate_proj.weight`)."""
    n = name
    for p in ("model.decoder.", "model.encoder.language_model."):
        if n.startswith(p):
            n = n[len(p):]
    m = re.match(r"layers\.(\d+)\.(.*)$", n)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest.startswith("experts."):
            return "experts", layer
        if rest.startswith("router."):
            return "router", layer
        if rest.startswith("mlp."):
            return "dense_mlp", layer
        if rest.startswith("self_attn."):
            return ("norms+scalars" if "_norm." in rest else "attention"), layer
        if "layernorm" in rest or "layer_scalar" in rest:
            return "norms+scalars", layer
        return "other", layer
    if n.startswith("embed_tokens."):
        return "embedding", None
    if n.startswith("self_conditioning."):
        return "self_conditioning", None
    if n.startswith("norm."):
        return "norms+scalars", None
    return "other", None


def _streamable(name: str, component: str, layer: int | None, ndim: int) -> bool:
    if layer is None or ndim < 2:
        return False
    return component in ("attention", "dense_mlp") or (component == "router" and ".proj." in name)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise DGemmaError(f"unknown dtype {dtype!r} (bfloat16, float16, float32)")
    return _DTYPE_NAMES[dtype]


def weights_from_config(cfg: DGConfig, fmt: str, dtype: torch.dtype = torch.bfloat16) -> list[WeightItem]:
    """The weights a runtime holds for `cfg` converted to `fmt` (see `format_names()`)."""
    from .hf_names import checkpoint_tensors

    a = _dtype_bytes(dtype)
    out: list[WeightItem] = []
    if fmt in DENSE_FORMATS:
        b = DENSE_FORMATS[fmt]
        for s in checkpoint_tensors(cfg):
            c = _ROW_OF.get(s.component, s.component)
            out.append(WeightItem(s.name, c, s.layer, s.numel * b, fmt, _streamable(s.name, c, s.layer, len(s.shape))))
        return out
    if fmt in NVFP4_FORMATS:
        from ..converter.policy import tensor_bytes, tensor_plan

        for s, f in tensor_plan(cfg, NVFP4_FORMATS[fmt]):
            c = _ROW_OF.get(s.component, s.component)
            nb = tensor_bytes(s, f) if f == "nvfp4" else s.numel * a  # bf16-kept tensors live in the compute dtype
            out.append(WeightItem(s.name, c, s.layer, nb, "nvfp4" if f == "nvfp4" else _dtype_label(dtype),
                                  _streamable(s.name, c, s.layer, len(s.shape))))
        return out
    mix = fmt[len("gguf-"):] if fmt.startswith("gguf-") else fmt
    from ..converter.gguf_mix import MIXES

    if mix not in MIXES or fmt in ("nvfp4",):
        hint = " ('nvfp4' is ambiguous: nvfp4-default, nvfp4-experts or gguf-nvfp4)" if fmt == "nvfp4" else ""
        raise ConfigError(f"unknown format {fmt!r}{hint}; choose one of: {', '.join(format_names())}")
    return _gguf_items_from_config(cfg, mix, dtype)


def _dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _gguf_items_from_config(cfg: DGConfig, mix: str, dtype: torch.dtype) -> list[WeightItem]:
    from gguf import GGMLQuantizationType as QT

    from ..converter.gguf_mix import ggml_type_name, tensor_types
    from ..converter.gguf_names import DOWN_EXPS_SCALE, GATE_EXPS_SCALE, ROPE_FREQS, UP_EXPS_SCALE  # noqa: F401
    from ..converter.gguf_quants import tensor_nbytes

    comp = _hf_components(cfg)
    a = _dtype_bytes(dtype)
    out = []
    for s, t in tensor_types(cfg, mix):
        if s.role == ROPE_FREQS:
            continue  # generated; the runtime builds its own inverse frequencies
        c, layer = comp[s.hf_sources[0]]
        if s.role in (GATE_EXPS_SCALE, UP_EXPS_SCALE):
            nb, label = s.numel * 4, "f32"  # per-expert NVFP4 globals of the split experts stay float32
        elif s.role == DOWN_EXPS_SCALE:
            nb, label = s.numel * a, _dtype_label(dtype)  # becomes router.per_expert_scale
        elif t in (QT.F32, QT.F16, QT.BF16):
            nb, label = s.numel * a, _dtype_label(dtype)  # the GGUF loader makes these compute-dtype parameters
        else:
            nb, label = tensor_nbytes(t, s.torch_shape), ggml_type_name(t)
        out.append(WeightItem(s.gguf_name, c, layer, nb, label,
                              _streamable(s.hf_sources[0], c, layer, s.n_dims)))
    return out


def _hf_components(cfg: DGConfig) -> dict[str, tuple[str, int | None]]:
    from .hf_names import checkpoint_tensors

    return {s.name: (_ROW_OF.get(s.component, s.component), s.layer) for s in checkpoint_tensors(cfg)}


def weights_from_model(model: torch.nn.Module) -> list[WeightItem]:
    """The tensors a loaded model holds (parameters and buffers, without the computed RoPE tables)."""
    out = []
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or name.startswith("inv_freq_") or id(t) in seen:
            continue
        seen.add(id(t))
        c, layer = component_of(name)
        out.append(WeightItem(name, c, layer, t.numel() * t.element_size(), _dtype_label(t.dtype),
                              _streamable(name, c, layer, t.dim())))
    return out


def weights_from_checkpoint(path: Path, dtype: torch.dtype | None) -> tuple[DGConfig, list[WeightItem], str]:
    """(config, items, format label) of an HF or NVFP4 checkpoint directory, from its safetensors headers."""
    from .api import detect_format
    from .hf_names import checkpoint_tensors, encoder_alias, is_vision
    from .safetensors_io import CheckpointFiles

    cfg = DGConfig.from_pretrained(path)
    files = CheckpointFiles(path)
    kind = detect_format(path)
    out: list[WeightItem] = []
    if kind == "hf":
        expected = checkpoint_tensors(cfg)
        first = expected[0].name
        enc = "model.encoder.language_model" + first[len("model.decoder"):]
        info = files.tensors.get(first) or files.tensors.get(enc)
        file_dtype = info.torch_dtype if info is not None else torch.bfloat16
        dt = dtype or file_dtype  # load_model keeps the embedding's dtype when no dtype is asked for
        b = _dtype_bytes(dt)
        for s in expected:
            c = _ROW_OF.get(s.component, s.component)
            out.append(WeightItem(s.name, c, s.layer, s.numel * b, _dtype_label(dt),
                                  _streamable(s.name, c, s.layer, len(s.shape))))
        return cfg, out, _dtype_label(dt)
    # NVFP4 (ModelOpt or compressed-tensors): what is on disk; float weights in the compute dtype
    a = _dtype_bytes(dtype) if dtype is not None else None
    kv_scale = re.compile(r"\.(k_scale|v_scale|q_scale|prob_scale)$")
    # per-expert linears are re-fused at load: gate and up share one global pair per expert
    up_global = re.compile(
        r"\.experts\.\d+\.up_proj\.(weight_scale_2|input_scale|weight_global_scale|input_global_scale)$")
    for n, info in files.tensors.items():
        if is_vision(n) or n == "lm_head.weight" or kv_scale.search(n) or up_global.search(n):
            continue
        alias = encoder_alias(n)
        if alias is not None and alias in files.tensors:
            continue  # a stored-twice tied copy: the loader uses the decoder's
        c, layer = component_of(n)
        nb = info.nbytes
        label = info.dtype.lower()
        is_scale = re.search(r"(scale|scale_2|global_scale)$", n) is not None
        if info.dtype in ("BF16", "F16", "F32") and a is not None and not is_scale:
            nb = math.prod(info.shape) * a
            label = _dtype_label(dtype)  # type: ignore[arg-type]
        if info.dtype == "U8":
            label = "nvfp4"
        out.append(WeightItem(n, c, layer, nb, label, _streamable(n, c, layer, len(info.shape))))
    return cfg, out, "nvfp4"


def weights_from_gguf(path: Path, dtype: torch.dtype) -> tuple[DGConfig, list[WeightItem], str]:
    """(config, items, file type) of a GGUF file, from its header (tensor data is not read)."""
    from gguf import GGMLQuantizationType as QT

    from ..converter.gguf_mix import ggml_type_name
    from ..converter.gguf_names import gguf_tensor_plan
    from .gguf_loading import gguf_config_dicts, read_gguf

    f = read_gguf(path)
    eos = f.kv.get("tokenizer.ggml.eos_token_id", 1)
    eos_ids = [int(x) for x in eos] if isinstance(eos, list) else [int(eos)]
    root, gen = gguf_config_dicts(f, eos_ids)
    cfg = DGConfig.from_dict(root, gen, source=f"{path} [metadata]")
    comp = _hf_components(cfg)
    by_name: dict[str, tuple[str, int | None, str]] = {}
    has_split = any(n.endswith(".ffn_gate_exps.weight") for n in f.tensors)  # the NVFP4 expert layout
    for split in (False, True) if has_split else (False,):
        for s in gguf_tensor_plan(cfg, nvfp4_experts=split):
            if s.hf_sources:
                c, layer = comp[s.hf_sources[0]]
                by_name[s.gguf_name] = (c, layer, s.hf_sources[0])
    a = _dtype_bytes(dtype)
    out = []
    for n, t in f.tensors.items():
        if n in ("rope_freqs.weight", "output.weight") or n.endswith(".input_scale"):
            continue  # generated / tied copy / activation scales the loader ignores
        base = n if n in by_name else n.rsplit(".", 1)[0] + ".weight"
        if base not in by_name:
            continue
        c, layer, hf = by_name[base]
        shape = tuple(int(x) for x in t.shape)
        if n.endswith(".scale") and (n not in by_name or c == "experts"):
            nb, label = math.prod(shape) * 4, "f32"  # second-level scales of linears / split experts stay fp32
        elif t.tensor_type in (QT.F32, QT.F16, QT.BF16):
            nb, label = math.prod(shape) * a, _dtype_label(dtype)
        else:
            nb, label = int(t.n_bytes), ggml_type_name(t.tensor_type)
        out.append(WeightItem(n, c, layer, nb, label, _streamable(hf, c, layer, len(shape))))
    ft = f.kv.get("general.file_type")
    return cfg, out, f"gguf (file_type {ft})" if ft is not None else "gguf"


# ---- the plan -------------------------------------------------------------------------------------------------


@dataclass
class PlanRow:
    section: str  # "weights" | "kv" | "scratch" | "runtime"
    item: str
    nbytes: int
    note: str = ""
    counted: bool = True  # False for informational rows not added to the total (e.g. the smaller scratch)


@dataclass
class Plan:
    source: str
    fmt: str
    context_length: int
    batch: int
    canvas: int
    dtype: str
    device: str
    prefill_chunk: int
    rows: list[PlanRow]
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: list[int]  # per layer: bytes of one expert
    layer_stream_bytes: list[int]  # per layer: the matrices weight streaming moves
    vram_budget: int | None = None
    verdict: str = "resident"  # "resident" (no budget) | "fits" | "offload" | "stream" | "no_fit"
    experts_per_layer: int | None = None  # resident experts per layer under the budget
    stream_layers: bool = False
    min_budget: int = 0
    traffic_per_pass: int = 0  # host -> device bytes per forward pass under the verdict
    assumptions: list[str] = field(default_factory=list)

    # ---- totals ---------------------------------------------------------------------------------------------
    def section_bytes(self, section: str) -> int:
        return sum(r.nbytes for r in self.rows if r.section == section and r.counted)

    @property
    def weight_bytes(self) -> int:
        return self.section_bytes("weights")

    @property
    def kv_bytes(self) -> int:
        return self.section_bytes("kv")

    @property
    def scratch_bytes(self) -> int:
        return self.section_bytes("scratch")

    @property
    def runtime_bytes(self) -> int:
        return self.section_bytes("runtime")

    @property
    def total_bytes(self) -> int:
        """Everything resident on the device when no weight is offloaded."""
        return sum(r.nbytes for r in self.rows if r.counted)

    @property
    def expert_total(self) -> int:
        return sum(r.nbytes for r in self.rows if r.section == "weights" and r.item == "routed experts")

    def resident_bytes(self, experts_per_layer: int, stream_layers: bool = False) -> int:
        """Device bytes with `experts_per_layer` resident experts per layer (and optional layer streaming)."""
        b = self.total_bytes - self.expert_total + sum(experts_per_layer * e for e in self.expert_bytes)
        if stream_layers and self.layer_stream_bytes:
            b -= sum(self.layer_stream_bytes) - 2 * max(self.layer_stream_bytes)
        return b

    # ---- output ---------------------------------------------------------------------------------------------
    def verdict_text(self) -> str:
        E = self.num_experts
        full = self.total_bytes
        if self.verdict == "resident":
            return (f"needs {full / GiB:.2f} GiB fully resident; smallest workable budget "
                    f"{self.min_budget / GiB:.2f} GiB ({self.top_k} experts per layer resident, layers streamed)")
        B = self.vram_budget or 0
        if self.verdict == "fits":
            return f"fits fully resident in {B / GiB:.2f} GiB ({(B - full) / GiB:.2f} GiB free)"
        if self.verdict in ("offload", "stream"):
            n = self.experts_per_layer or 0
            used = self.resident_bytes(n, self.stream_layers)
            s = (f"fits with {n} of {E} experts per layer resident, {E - n} streamed per layer per pass "
                 f"({self.traffic_per_pass / 1e9:.2f} GB host->device per pass)")
            if self.stream_layers:
                s += "; non-expert layer weights streamed one layer ahead"
            return s + f"; uses {used / GiB:.2f} of {B / GiB:.2f} GiB (fully resident would need {full / GiB:.2f})"
        return (f"does not fit in {B / GiB:.2f} GiB: the smallest budget that works is {self.min_budget / GiB:.2f} GiB "
                f"({self.top_k} experts per layer resident, layer weights streamed); fully resident needs "
                f"{full / GiB:.2f} GiB")

    def format_table(self) -> str:
        lines = [
            f"dgemma memory plan: {self.source}, format {self.fmt}, text-only",
            f"context {self.context_length} tokens, batch {self.batch}, canvas {self.canvas}, "
            f"compute/KV dtype {self.dtype}, device {self.device}",
            f"{'item':<50} {'GiB':>9} {'GB':>9}  note",
        ]
        titles = {"weights": "weights", "kv": "KV cache", "scratch": "activations and sampler scratch",
                  "runtime": "runtime"}
        for sec in ("weights", "kv", "scratch", "runtime"):
            rows = [r for r in self.rows if r.section == sec]
            if not rows:
                continue
            lines.append(titles[sec])
            for r in rows:
                mark = "" if r.counted else " (not added)"
                lines.append(f"  {r.item:<48} {r.nbytes / GiB:>9.3f} {r.nbytes / 1e9:>9.3f}  {r.note}{mark}")
            tot = self.section_bytes(sec)
            lines.append(f"  {'= ' + titles[sec]:<48} {tot / GiB:>9.3f} {tot / 1e9:>9.3f}")
        lines.append(f"{'TOTAL (fully resident)':<50} {self.total_bytes / GiB:>9.3f} {self.total_bytes / 1e9:>9.3f}")
        lines.append(f"verdict: {self.verdict_text()}")
        lines += [f"assumes: {a}" for a in self.assumptions]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "format": self.fmt, "context_length": self.context_length, "batch": self.batch,
            "canvas": self.canvas, "dtype": self.dtype, "device": self.device, "prefill_chunk": self.prefill_chunk,
            "rows": [dict(section=r.section, item=r.item, bytes=r.nbytes, note=r.note, counted=r.counted)
                     for r in self.rows],
            "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes, "scratch_bytes": self.scratch_bytes,
            "runtime_bytes": self.runtime_bytes, "total_bytes": self.total_bytes,
            "vram_budget": self.vram_budget, "verdict": self.verdict, "verdict_text": self.verdict_text(),
            "experts_per_layer": self.experts_per_layer, "stream_layers": self.stream_layers,
            "min_budget": self.min_budget, "traffic_per_pass": self.traffic_per_pass,
            "num_experts": self.num_experts, "top_k": self.top_k, "expert_bytes": self.expert_bytes,
            "assumptions": self.assumptions,
        }


def kv_cache_bytes(cfg: DGConfig, context_length: int, batch: int = 1, dtype_bytes: int = 2,
                   rollback: int = 0) -> dict[str, tuple[int, int, int]]:
    """{layer type: (layers, slots per layer, bytes)} exactly as `KVCache` allocates K and V."""
    C, W = cfg.canvas_length, cfg.sliding_window
    ring = min(W - 1 + max(rollback, 0), context_length)
    out: dict[str, list[int]] = {}
    for g in cfg.layers:
        slots = (ring if g.is_sliding else context_length) + C
        b = 2 * batch * g.num_kv_heads * slots * g.head_dim * dtype_bytes
        acc = out.setdefault(g.layer_type, [0, slots, 0])
        acc[0] += 1
        acc[2] += b
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def _layer_activation_bytes(cfg: DGConfig, tokens: int, batch: int, a: int) -> int:
    """One layer's live activations for `tokens` positions (a estimate of the peak, freed between layers):
    residual/normed states, q/k/v/attention output, dense MLP, router probabilities and the MoE pair buffers
    (sorted inputs, gate/up, activation, expert outputs, weighted and unsorted copies)."""
    T = tokens * batch
    H, I, Ie = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size
    K, E = cfg.top_k_experts, cfg.num_experts
    g = max(cfg.layers, key=lambda g: cfg.num_attention_heads * g.head_dim + 2 * g.num_kv_heads * g.head_dim)
    attn = cfg.num_attention_heads * g.head_dim * 2 + 2 * g.num_kv_heads * g.head_dim
    P = T * K
    return a * (T * (6 * H + attn + 3 * I) + P * (4 * H + 3 * Ie)) + 4 * T * E * 2


def _attention_temp_bytes(cfg: DGConfig, queries: int, keys: int, batch: int, a: int, masked: bool) -> int:
    """Largest per-layer attention temporary: K/V repeated to every query head where SDPA cannot broadcast
    (head_dim > 256, or a mask), plus a boolean mask [B, T, S] when one is built."""
    best = 0
    for g in cfg.layers:
        S = keys if not g.is_sliding else min(keys, cfg.sliding_window - 1 + queries)
        rep = 0
        if (g.head_dim > GQA_BROADCAST_MAX_HEAD_DIM or masked) and g.num_kv_heads != cfg.num_attention_heads:
            rep = 2 * batch * cfg.num_attention_heads * S * g.head_dim * a
        mask = batch * queries * S if masked else 0
        best = max(best, rep + mask)
    return best


def build_plan(
    cfg: DGConfig, items: list[WeightItem], *, source: str, fmt: str, context_length: int = 8192, batch: int = 1,
    dtype: torch.dtype = torch.bfloat16, device: str = "cuda", vram_budget: int | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, rollback: int = 0,
    vocab_bytes_per_logit: float | None = None, cuda_context_bytes: int = CUDA_CONTEXT_BYTES,
) -> Plan:
    """A plan from an explicit weight list (the entry point `plan` calls this)."""
    if context_length < 1:
        raise DGemmaError(f"context length must be >= 1, got {context_length}")
    if batch < 1:
        raise DGemmaError(f"batch must be >= 1, got {batch}")
    a = _dtype_bytes(dtype)
    L, E, C, V = cfg.num_hidden_layers, cfg.num_experts, cfg.canvas_length, cfg.vocab_size
    rows: list[PlanRow] = []
    by_row: dict[str, list[WeightItem]] = {}
    for it in items:
        by_row.setdefault(it.component, []).append(it)
    labels = dict(WEIGHT_ROWS)
    for key in [k for k, _ in WEIGHT_ROWS] + sorted(set(by_row) - set(labels)):
        its = by_row.get(key, [])
        if not its:
            continue
        fmts: dict[str, int] = {}
        for it in its:
            fmts[it.fmt] = fmts.get(it.fmt, 0) + it.nbytes
        note = " + ".join(f for f, _ in sorted(fmts.items(), key=lambda kv: -kv[1]))
        if key == "experts":
            per = sum(it.nbytes for it in its) / max(1, L * E)
            note += f" ({L} layers x {E} experts, {per / 1e6:.2f} MB each)"
        rows.append(PlanRow("weights", labels.get(key, key), sum(it.nbytes for it in its), note))

    expert_bytes = [0] * L
    stream = [0] * L
    for it in items:
        if it.component == "experts" and it.layer is not None:
            expert_bytes[it.layer] += it.nbytes
        if it.streamable and it.layer is not None:
            stream[it.layer] += it.nbytes
    if any(b % E for b in expert_bytes):
        raise DGemmaError("expert tensors are not a whole number of bytes per expert")  # a malformed tensor list
    expert_bytes = [b // E for b in expert_bytes]

    for lt, (n, slots, b) in sorted(kv_cache_bytes(cfg, context_length, batch, a, rollback).items(), reverse=True):
        g = next(g for g in cfg.layers if g.layer_type == lt)
        kind = "sliding" if g.is_sliding else "full"
        rows.append(PlanRow("kv", f"{kind} layers ({n} x {slots} slots)", b,
                            f"K+V {g.num_kv_heads} heads x {g.head_dim} x {_dtype_label(dtype)}"))

    logit_b = vocab_bytes_per_logit if vocab_bytes_per_logit is not None else 4 + 2 * a
    vocab = int(batch * C * V * logit_b)
    attn_dec = _attention_temp_bytes(cfg, C, context_length + C, batch, a, masked=batch > 1)
    act_dec = _layer_activation_bytes(cfg, C, batch, a)
    decode = vocab + attn_dec + act_dec
    chunk = min(prefill_chunk or context_length, context_length)
    attn_pre = _attention_temp_bytes(cfg, chunk, context_length, batch, a, masked=True)
    act_pre = _layer_activation_bytes(cfg, chunk, batch, a)
    prefill = attn_pre + act_pre
    dec_counted = decode >= prefill
    rows += [
        PlanRow("scratch", f"decode: logits + SC logits [{batch}x{C}x{V}]", vocab,
                f"{logit_b:g} B/logit" + (": fp32 logits + old/new SC logits" if vocab_bytes_per_logit is None
                                          else " (as given)"), dec_counted),
        PlanRow("scratch", "decode: attention temporaries", attn_dec,
                f"K/V repeated to {cfg.num_attention_heads} heads where head_dim > {GQA_BROADCAST_MAX_HEAD_DIM}",
                dec_counted),
        PlanRow("scratch", "decode: layer + MoE activations", act_dec,
                f"{batch * C} tokens x {cfg.top_k_experts} experts", dec_counted),
        PlanRow("scratch", f"prefill chunk of {chunk}: attention temporaries", attn_pre,
                "repeated K/V + mask", not dec_counted),
        PlanRow("scratch", f"prefill chunk of {chunk}: layer + MoE activations", act_pre,
                f"{batch * chunk} tokens x {cfg.top_k_experts} experts", not dec_counted),
    ]
    if device.startswith("cuda"):
        rows.append(PlanRow("runtime", "CUDA context + workspaces", cuda_context_bytes, "assumed allowance"))

    plan = Plan(source=source, fmt=fmt, context_length=context_length, batch=batch, canvas=C,
                dtype=_dtype_label(dtype), device=device, prefill_chunk=chunk, rows=rows, num_layers=L,
                num_experts=E, top_k=cfg.top_k_experts, expert_bytes=expert_bytes, layer_stream_bytes=stream,
                vram_budget=vram_budget)
    plan.assumptions = [
        f"scratch = max(decode step, prefill chunk); the prompt is encoded in chunks of {chunk} tokens",
        f"vocabulary-sized tensors: {logit_b:g} bytes per logit (fp32 logits, softcap/temperature in place, "
        "previous and new self-conditioning logits in the compute dtype)",
        "KV cache as KVCache allocates it (sliding layers window-1 slots + canvas, full layers context + canvas)",
        (f"CUDA context/workspaces {cuda_context_bytes / 2**20:.0f} MiB" if device.startswith("cuda")
         else "no accelerator context (CPU)"),
        "streamed experts: every pass touches every expert at canvas 256 (performance.md section 1)",
    ]
    _decide(plan)
    return plan


def _decide(p: Plan) -> None:
    E, k = p.num_experts, p.top_k
    p.min_budget = p.resident_bytes(k, stream_layers=True)
    B = p.vram_budget
    if B is None:
        p.verdict = "resident"
        p.experts_per_layer = E
        return
    if p.total_bytes <= B:
        p.verdict, p.experts_per_layer = "fits", E
        return
    per_slot = sum(p.expert_bytes)
    for stream in (False, True):
        base = p.resident_bytes(0, stream)
        n = min(E - 1, (B - base) // per_slot) if per_slot else E - 1
        if n >= k:
            p.verdict = "stream" if stream else "offload"
            p.experts_per_layer, p.stream_layers = int(n), stream
            p.traffic_per_pass = (E - int(n)) * per_slot + (sum(p.layer_stream_bytes) if stream else 0)
            return
    p.verdict, p.experts_per_layer = "no_fit", None


def plan(
    model_or_config: Any,
    fmt: str | None = None,
    context_length: int = 8192,
    vram_budget: int | str | float | None = None,
    batch: int = 1,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    rollback: int = 0,
    vocab_bytes_per_logit: float | None = None,
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES,
) -> Plan:
    """Plan the device memory of a run. `model_or_config`: a `DGConfig`, a loaded `DGModel`, a checkpoint
    directory, a `.gguf` file, or a directory with only config.json (then `fmt` is required). `fmt`: a format
    name (`format_names()`) to plan a conversion; None plans what is stored / loaded. `vram_budget`: bytes (int),
    or a size string ("16GiB", "16GB") or a float number of GiB (`parse_size`). `dtype`: compute and KV dtype
    (default bfloat16; a loaded model uses its own). `device`: 'cuda' (default: adds the CUDA context allowance)
    or 'cpu'. `prefill_chunk`, `vocab_bytes_per_logit`, `cuda_context_bytes`: the scratch assumptions (module
    docstring); `prefill_chunk=None` plans the whole prompt in one encoder pass."""
    from .model import DGModel

    if vram_budget is None or (isinstance(vram_budget, int) and not isinstance(vram_budget, bool)):
        budget = vram_budget  # bytes
    else:
        budget = parse_size(vram_budget)  # "16GiB", "16GB", or a float number of GiB
    dt = _resolve_dtype(dtype, torch.bfloat16)
    kw: dict[str, Any] = dict(context_length=context_length, batch=batch, vram_budget=budget,
                              prefill_chunk=prefill_chunk, rollback=rollback,
                              vocab_bytes_per_logit=vocab_bytes_per_logit, cuda_context_bytes=cuda_context_bytes)
    if isinstance(model_or_config, DGModel):
        m = model_or_config
        if fmt is not None:
            return build_plan(m.cfg, weights_from_config(m.cfg, fmt, dt), source="model config", fmt=fmt,
                              dtype=dt, device=device or "cuda", **kw)
        dev = device or m.device.type
        return build_plan(m.cfg, weights_from_model(m), source="loaded model", fmt="as loaded",
                          dtype=_resolve_dtype(dtype, m.dtype), device=dev, **kw)
    if isinstance(model_or_config, DGConfig):
        if fmt is None:
            raise DGemmaError("planning from a config needs a format name (fmt=...): " + ", ".join(format_names()))
        cfg = model_or_config
        return build_plan(cfg, weights_from_config(cfg, fmt, dt), source=Path(cfg.source).parent.name or cfg.source,
                          fmt=fmt, dtype=dt, device=device or "cuda", **kw)
    if isinstance(model_or_config, (str, Path)):
        p = Path(model_or_config)
        if not p.exists():
            raise DGemmaError(f"{p}: no such checkpoint directory, GGUF file or config")
        name = p.name
        if p.is_file():
            with open(p, "rb") as f:
                is_gguf = f.read(4) == b"GGUF"
            if is_gguf:
                if fmt is not None:
                    raise DGemmaError(f"{p}: a GGUF file has its own format; leave out the format name")
                cfg, items, label = weights_from_gguf(p, dt)
                return build_plan(cfg, items, source=name, fmt=label, dtype=dt, device=device or "cuda", **kw)
            if p.name != "config.json":
                raise DGemmaError(f"{p}: not a GGUF file, config.json or checkpoint directory")
            p = p.parent
            name = p.name
        if fmt is not None:
            cfg = DGConfig.from_pretrained(p)
            return build_plan(cfg, weights_from_config(cfg, fmt, dt), source=name, fmt=fmt, dtype=dt,
                              device=device or "cuda", **kw)
        has_weights = any(p.glob("*.safetensors"))
        if not has_weights:
            raise DGemmaError(f"{p}: no weights here; give a format name to plan from the config alone "
                              f"({', '.join(format_names())})")
        cfg, items, label = weights_from_checkpoint(p, None if dtype is None else dt)
        if dtype is None and label in ("bf16", "f16", "fp32"):
            dt = _DTYPE_NAMES[label]  # a dense checkpoint runs in its own dtype unless told otherwise
        return build_plan(cfg, items, source=name, fmt=label, dtype=dt, device=device or "cuda", **kw)
    raise DGemmaError(f"cannot plan from a {type(model_or_config).__name__}: pass a DGConfig, a loaded model, "
                      "a checkpoint directory or a GGUF file")


__all__ = ["Plan", "PlanRow", "WeightItem", "plan", "build_plan", "kv_cache_bytes", "parse_size", "format_names",
           "component_of", "weights_from_config", "weights_from_model", "CUDA_CONTEXT_BYTES", "GiB"]
