"""HF DiffusionGemma safetensors -> GGUF in llama.cpp's `diffusion-gemma` layout (PR #24423 / Unsloth files).

`export_gguf(GGUFExportOptions(src, out, mix))` streams the checkpoint tensor by tensor: every tensor info is
registered with gguf-py's `GGUFWriter` first (the header needs all of them), then each tensor is read from the
memory-mapped safetensors, checked (finite), quantized (`gguf_mix.quantize_planned`) and written with
`write_tensor_data`; only one source tensor and its encoding are in RAM at a time.

What is written (shared/reference/gguf.md sections 2, 3, 9):
- the 44 metadata keys of the Unsloth file in its order (`gguf_metadata`), plus the six `diffusion.eb_*`
  sampler defaults when the source has a generation_config.json (#24423's converter writes them);
- the `gemma4` tokenizer from the checkpoint's own tokenizer files (`Tokenizer.to_gguf_metadata`);
- exactly the tensor plan of `gguf_names.gguf_tensor_plan` in the types of `gguf_mix.tensor_types`.
The output is written to a temporary file next to OUT and renamed at the end: an error or Ctrl-C leaves nothing.

Importance for the K-quant / Q5_0 / NVFP4 searches: `--calib` pointing at a calibration statistics file
(safetensors of per-linear-input mean squares, `converter/calibrate.py`); without it the quantizers weight the
error by the weights themselves (as llama.cpp does without an imatrix).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import CheckpointError, ConfigError, DGemmaError, FormatError
from dgemma.runtime.hf_names import DEC, ENC, encoder_alias, is_vision
from dgemma.runtime.safetensors_io import CheckpointFiles
from dgemma.runtime.tokenizer import GGUFTokenizerMetadata, Tokenizer, TokenType

from .gguf_mix import MIXES, file_type, ggml_type_name, quantize_planned, tensor_types
from .gguf_names import ARCH, COPY, DOWN_EXPS_SCALE, GATE_EXPS, UP_EXPS, GGUFTensorSpec, gguf_tensor_data

logger = logging.getLogger(__name__)

A = ARCH  # key prefix
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
FLOAT_DTYPES = ("F32", "BF16", "F16")

# key -> (GGUF value type, array element type or None), in the file order of the Unsloth Q4_K_M (gguf.md §2)
KEY_TYPES: dict[str, tuple[VT, VT | None]] = {
    "general.architecture": (VT.STRING, None),
    "general.type": (VT.STRING, None),
    "general.name": (VT.STRING, None),
    "general.size_label": (VT.STRING, None),
    f"{A}.block_count": (VT.UINT32, None),
    f"{A}.context_length": (VT.UINT32, None),
    f"{A}.embedding_length": (VT.UINT32, None),
    f"{A}.feed_forward_length": (VT.UINT32, None),
    f"{A}.attention.head_count": (VT.UINT32, None),
    f"{A}.attention.head_count_kv": (VT.ARRAY, VT.INT32),
    f"{A}.rope.freq_base": (VT.FLOAT32, None),
    f"{A}.rope.freq_base_swa": (VT.FLOAT32, None),
    f"{A}.attention.layer_norm_rms_epsilon": (VT.FLOAT32, None),
    f"{A}.expert_count": (VT.UINT32, None),
    f"{A}.expert_used_count": (VT.UINT32, None),
    f"{A}.attention.key_length": (VT.UINT32, None),
    f"{A}.attention.value_length": (VT.UINT32, None),
    f"{A}.final_logit_softcapping": (VT.FLOAT32, None),
    f"{A}.attention.sliding_window": (VT.UINT32, None),
    f"{A}.attention.shared_kv_layers": (VT.UINT32, None),
    f"{A}.embedding_length_per_layer_input": (VT.UINT32, None),
    f"{A}.attention.sliding_window_pattern": (VT.ARRAY, VT.BOOL),
    f"{A}.attention.key_length_swa": (VT.UINT32, None),
    f"{A}.attention.value_length_swa": (VT.UINT32, None),
    f"{A}.expert_feed_forward_length": (VT.UINT32, None),
    f"{A}.rope.dimension_count": (VT.UINT32, None),
    f"{A}.rope.dimension_count_swa": (VT.UINT32, None),
    f"{A}.attention.causal": (VT.BOOL, None),
    "diffusion.canvas_length": (VT.UINT32, None),
    # optional sampler defaults (#24423 converter, from generation_config.json; absent in the Unsloth file)
    "diffusion.eb_max_steps": (VT.UINT32, None),
    "diffusion.eb_t_min": (VT.FLOAT32, None),
    "diffusion.eb_t_max": (VT.FLOAT32, None),
    "diffusion.eb_entropy_bound": (VT.FLOAT32, None),
    "diffusion.eb_stability_threshold": (VT.UINT32, None),
    "diffusion.eb_confidence_threshold": (VT.FLOAT32, None),
    "tokenizer.ggml.model": (VT.STRING, None),
    "tokenizer.ggml.tokens": (VT.ARRAY, VT.STRING),
    "tokenizer.ggml.scores": (VT.ARRAY, VT.FLOAT32),
    "tokenizer.ggml.token_type": (VT.ARRAY, VT.INT32),
    "tokenizer.ggml.merges": (VT.ARRAY, VT.STRING),
    "tokenizer.ggml.bos_token_id": (VT.UINT32, None),
    "tokenizer.ggml.eos_token_id": (VT.UINT32, None),
    "tokenizer.ggml.unknown_token_id": (VT.UINT32, None),
    "tokenizer.ggml.padding_token_id": (VT.UINT32, None),
    "tokenizer.ggml.mask_token_id": (VT.UINT32, None),
    "tokenizer.chat_template": (VT.STRING, None),
    "tokenizer.ggml.add_space_prefix": (VT.BOOL, None),
    "tokenizer.ggml.add_bos_token": (VT.BOOL, None),
    "general.quantization_version": (VT.UINT32, None),
    "general.file_type": (VT.UINT32, None),
}
EB_KEYS = tuple(k for k in KEY_TYPES if k.startswith("diffusion.eb_"))


@dataclass(frozen=True)
class GGUFExportOptions:
    src: Path  # HF checkpoint directory
    out: Path  # the .gguf file to write
    mix: str  # one of gguf_mix.MIXES
    calib: Path | None = None  # calibration statistics (safetensors) or calibration text (then ignored)
    force: bool = False  # overwrite an existing OUT


@dataclass
class GGUFExportResult:
    path: Path
    mix: str
    n_tensors: int
    n_keys: int
    type_counts: dict[str, int]
    tensor_bytes: int  # tensor data written (without alignment padding)
    file_bytes: int
    source_bytes: int  # bytes of the source tensors read
    seconds: float
    importance_tensors: int  # tensors quantized with calibration importance
    notes: list[str] = field(default_factory=list)


ProgressFn = Callable[[int, int, str], None]  # (bytes of source done, total source bytes, current tensor name)


# ---- metadata ------------------------------------------------------------------------------------------------


def gguf_metadata(
    cfg: DGConfig,
    tok: GGUFTokenizerMetadata,
    mix: str,
    *,
    name: str,
    size_label: str,
    with_sampler_defaults: bool,
) -> list[tuple[str, Any, VT, VT | None]]:
    """Every metadata key (key, value, type, array element type) in file order, `general.architecture`
    included (GGUFWriter writes that one itself)."""
    full, sliding = cfg.full_layer_ids, cfg.sliding_layer_ids
    if not full:
        raise ConfigError(f"{cfg.source}: no full-attention layer; the diffusion-gemma layout needs one")
    g_full = cfg.layers[full[0]]
    g_swa = cfg.layers[sliding[0]] if sliding else None
    hd_swa = g_swa.head_dim if g_swa is not None else cfg.head_dim
    if any(cfg.layers[i].head_dim != g_full.head_dim for i in full) or any(
        cfg.layers[i].head_dim != hd_swa for i in sliding
    ):
        raise ConfigError(f"{cfg.source}: llama.cpp needs one head_dim for all full and one for all sliding layers")
    rp_full, rp_swa = cfg.rope["full_attention"], cfg.rope.get("sliding_attention")
    if rp_swa is not None and rp_swa.rope_type != "default" and rp_swa.partial_rotary_factor != 1.0:
        raise ConfigError(f"{cfg.source}: sliding rope_type {rp_swa.rope_type!r} with a partial factor cannot be "
                          "written in the diffusion-gemma GGUF layout")
    theta_swa = rp_swa.theta if rp_swa is not None else rp_full.theta
    rot_swa = int(hd_swa * rp_swa.partial_rotary_factor) if rp_swa is not None else hd_swa

    kv: dict[str, Any] = {
        "general.architecture": ARCH,
        "general.type": "model",
        "general.name": name,
        "general.size_label": size_label,
        f"{A}.block_count": cfg.num_hidden_layers,
        f"{A}.context_length": cfg.max_position_embeddings,
        f"{A}.embedding_length": cfg.hidden_size,
        f"{A}.feed_forward_length": cfg.intermediate_size,
        f"{A}.attention.head_count": cfg.num_attention_heads,
        f"{A}.attention.head_count_kv": [g.num_kv_heads for g in cfg.layers],
        f"{A}.rope.freq_base": rp_full.theta,
        f"{A}.rope.freq_base_swa": theta_swa,
        f"{A}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{A}.expert_count": cfg.num_experts,
        f"{A}.expert_used_count": cfg.top_k_experts,
        f"{A}.attention.key_length": g_full.head_dim,
        f"{A}.attention.value_length": g_full.head_dim,
        f"{A}.final_logit_softcapping": cfg.final_logit_softcapping,  # None (no softcap): key left out
        f"{A}.attention.sliding_window": cfg.sliding_window,
        f"{A}.attention.shared_kv_layers": 0,
        f"{A}.embedding_length_per_layer_input": 0,
        f"{A}.attention.sliding_window_pattern": [g.is_sliding for g in cfg.layers],
        f"{A}.attention.key_length_swa": hd_swa,
        f"{A}.attention.value_length_swa": hd_swa,
        f"{A}.expert_feed_forward_length": cfg.moe_intermediate_size,
        # = key_length, not the rotated count: proportional RoPE comes from the rope_freqs tensor
        f"{A}.rope.dimension_count": g_full.head_dim,
        f"{A}.rope.dimension_count_swa": rot_swa,
        f"{A}.attention.causal": False,
        "diffusion.canvas_length": cfg.canvas_length,
    }
    if with_sampler_defaults:
        g = cfg.generation
        kv |= {
            "diffusion.eb_max_steps": g.max_denoising_steps,
            "diffusion.eb_t_min": g.t_min,
            "diffusion.eb_t_max": g.t_max,
            "diffusion.eb_entropy_bound": g.entropy_bound,
            "diffusion.eb_stability_threshold": g.stability_threshold,
            "diffusion.eb_confidence_threshold": g.confidence_threshold,
        }
    kv |= tok.as_kv()
    kv |= {"general.quantization_version": QUANTIZATION_VERSION, "general.file_type": file_type(mix)}
    out = []
    for key, (vt, sub) in KEY_TYPES.items():  # KEY_TYPES fixes the order
        if key in kv and kv[key] is not None:
            out.append((key, _typed(key, kv[key], vt, sub), vt, sub))
    unknown = set(kv) - set(KEY_TYPES)
    if unknown:
        raise ValueError(f"metadata keys without a declared type: {sorted(unknown)}")  # a bug, not bad input
    return out


def _typed(key: str, v: Any, vt: VT, sub: VT | None) -> Any:
    """Plain Python values of the declared type (GGUFWriter infers array element types from them otherwise)."""
    def one(x: Any, t: VT) -> Any:
        if t in (VT.UINT32, VT.INT32):
            if isinstance(x, bool) or int(x) != x or (t == VT.UINT32 and x < 0):
                raise ConfigError(f"GGUF key {key}: {x!r} is not a valid {t.name.lower()}")
            return int(x)
        if t == VT.FLOAT32:
            return float(x)
        if t == VT.BOOL:
            return bool(x)
        if t == VT.STRING:
            return str(x)
        raise ValueError(t)

    if vt == VT.ARRAY:
        assert sub is not None
        return [one(x, sub) for x in v]
    return one(v, vt)


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> GGUFTokenizerMetadata:
    """The tokenizer's GGUF arrays, padded with UNUSED `[PAD{i}]` tokens up to the embedding's row count (as
    convert_hf_to_gguf does: llama.cpp needs one token per embedding row)."""
    md = tok.to_gguf_metadata()
    n = len(md.tokens)
    if n > vocab_size:
        raise ConfigError(f"{tok.source}: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    if not md.merges:
        raise ConfigError(f"{tok.source}: the tokenizer has no BPE merges; llama.cpp's gemma4 vocab requires them")
    if md.mask_id is None:
        logger.warning("%s: no <mask> token; llama-diffusion-cli needs tokenizer.ggml.mask_token_id", tok.source)
    if n < vocab_size:
        logger.info("padding the vocabulary from %d to %d tokens with [PAD{i}]", n, vocab_size)
        pad = [f"[PAD{i}]" for i in range(n, vocab_size)]
        md = GGUFTokenizerMetadata(
            tokens=md.tokens + pad, scores=md.scores + [-1000.0] * len(pad),
            token_types=md.token_types + [int(TokenType.UNUSED)] * len(pad), merges=md.merges, bos_id=md.bos_id,
            eos_id=md.eos_id, unk_id=md.unk_id, pad_id=md.pad_id, mask_id=md.mask_id, add_bos=md.add_bos,
            add_space_prefix=md.add_space_prefix, chat_template=md.chat_template, model=md.model)
    return md


# ---- source checkpoint ---------------------------------------------------------------------------------------


class _Source:
    """The HF tensors a plan needs, read one at a time (encoder copies stand in for missing decoder names).

    Reads are plain file reads (calibrate.RawReader), not memory maps: pages of a mapped checkpoint stay in the
    process's resident set once touched, so a mapped 50 GB source would show as 50 GB RSS by the end."""

    def __init__(self, path: Path, plan: list[GGUFTensorSpec]):
        from .calibrate import RawReader

        self.files = CheckpointFiles(path)
        self.reader = RawReader(self.files)
        self.path = path
        need: dict[str, tuple[int, ...]] = {}
        for s in plan:
            for n, shp in zip(s.hf_sources, s.hf_shapes, strict=True):
                need[n] = shp
        self.sources: dict[str, str] = {}
        missing = []
        for n in need:
            if n in self.files:
                self.sources[n] = n
            elif n.startswith(DEC + ".") and (ENC + n[len(DEC):]) in self.files:
                self.sources[n] = ENC + n[len(DEC):]
            else:
                missing.append(n)
        if missing:
            raise CheckpointError(f"{path}: missing tensors: {_few(missing)}")
        unexpected = [
            n for n in self.files.tensors
            if n not in need and not is_vision(n) and n != "lm_head.weight" and encoder_alias(n) not in need
        ]
        if unexpected:
            raise CheckpointError(f"{path}: unexpected tensors for this config: {_few(unexpected)}")
        for n, shp in need.items():
            info = self.files.tensors[self.sources[n]]
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{info.file.name}: tensor {info.name!r} has dtype {info.dtype}; GGUF export needs a float "
                    f"(bf16/f16/f32) checkpoint, not an already quantized one"
                )
            if info.shape != shp and not (shp == (1,) and info.shape == ()):
                raise CheckpointError(
                    f"{info.file.name}: tensor {info.name!r} has shape {list(info.shape)}, expected {list(shp)}"
                )
        self.bytes_by_name = {n: self.files.tensors[self.sources[n]].nbytes for n in need}
        self._last: tuple[str, torch.Tensor] | None = None  # split experts read the same source twice in a row

    def get(self, name: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None  # drop the previous tensor before reading the next (one source tensor in RAM)
        t = self.reader.read(self.sources[name])
        if not all_finite(t):
            raise CheckpointError(f"{self.path}: tensor {self.sources[name]!r} contains NaN or Inf values")
        self._last = (name, t)
        return t

    def close(self) -> None:
        self._last = None
        self.files.close()


_EXP_MASK = {torch.float32: (np.int32, 0x7F800000), torch.bfloat16: (np.int16, 0x7F80),
             torch.float16: (np.int16, 0x7C00)}


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN / Inf, by the exponent bits in numpy, `chunk` elements at a time (no tensor-sized temporaries;
    torch.isfinite is much slower on CPU, and torch's threaded elementwise ops stall on a busy machine)."""
    if t.dtype not in _EXP_MASK:
        return bool(torch.isfinite(t).all())
    itype, mask = _EXP_MASK[t.dtype]
    bits = t.detach().contiguous().view(torch.int32 if itype == np.int32 else torch.int16).numpy().reshape(-1)
    m = itype(mask)
    return not any(((bits[i : i + chunk] & m) == m).any() for i in range(0, bits.size, chunk))


def _few(names: list[str], k: int = 5) -> str:
    more = f" (and {len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _check_source_config(src: Path) -> None:
    cfg_file = src / "config.json"
    if not src.is_dir() or not cfg_file.is_file():
        raise ConfigError(f"{src}: not an HF checkpoint directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: cannot read ({e})") from None
    if isinstance(raw, dict) and raw.get("quantization_config"):
        raise ConfigError(f"{src}: the checkpoint is already quantized (quantization_config in config.json); "
                          "convert from the bf16 checkpoint")


# ---- calibration importance ---------------------------------------------------------------------------------

IMPORTANCE_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q5_0, QT.NVFP4)  # the quantizers that use importance


class ImportanceSource:
    """Per-input-channel importance for each GGUF weight from a `calibration_stats.safetensors`
    (converter/calibrate.py: `<HF module>.input_sq_mean`, [K] or [E, K] for expert stacks). A weight
    `...q_proj.weight` takes its module's statistics, the expert tensors (fused or split gate/up, down) those of
    `experts.gate_up_proj` / `experts.down_proj`, the tied embedding those of `lm_head` when present. Experts
    that saw no calibration token get uniform importance (`CalibrationStats.importance`)."""

    def __init__(self, path: Path, stats: Any):
        self.path, self.stats = path, stats
        self.used: list[str] = []
        self.missing: list[str] = []
        self.starved: dict[str, int] = {}

    @staticmethod
    def module_name(s: GGUFTensorSpec) -> str | None:
        if not s.hf_sources:
            return None
        h = s.hf_sources[0]
        if h == f"{DEC}.embed_tokens.weight":
            return "lm_head"
        if s.role in (GATE_EXPS, UP_EXPS) or h.endswith(".experts.gate_up_proj"):
            return h
        if s.role == COPY and (h.endswith(".weight") or h.endswith(".experts.down_proj")):
            return h.removesuffix(".weight")
        return None

    def for_spec(self, s: GGUFTensorSpec, t: QT) -> np.ndarray | None:
        if t not in IMPORTANCE_TYPES or s.role == DOWN_EXPS_SCALE:
            return None
        name = self.module_name(s)
        if name is None:
            return None
        if name not in self.stats:
            if name != "lm_head":
                self.missing.append(s.gguf_name)
            return None
        imp = self.stats.importance(name).to(torch.float32).numpy()
        K = s.torch_shape[-1]
        E = s.torch_shape[0] if len(s.torch_shape) == 3 else None
        if imp.shape not in ((K,), (E, K)):
            raise FormatError(f"{self.path}: statistics for {name} have shape {list(imp.shape)}; {s.gguf_name} "
                              f"needs [{K}]" + (f" or [{E}, {K}]" if E else ""))
        starved = self.stats.starved_experts(name)
        if starved:
            self.starved[name] = len(starved)
        self.used.append(s.gguf_name)
        return imp

    def report(self) -> list[str]:
        out = [f"calibration importance from {self.path.name}: {len(self.used)} tensors"]
        if self.missing:
            out.append(f"no statistics for {len(self.missing)} quantized tensors (weight-based importance): "
                       f"{_few(self.missing)}")
        if self.starved:
            n = sum(self.starved.values())
            out.append(f"{n} expert slots in {len(self.starved)} expert stacks saw no calibration token "
                       "(uniform importance)")
        return out


def _is_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 8 + n <= path.stat().st_size


def load_importance(path: Path, cfg: DGConfig) -> tuple[ImportanceSource | None, str | None]:
    """(importance source, note). A calibration *text* file (text / jsonl) gives no statistics: the GGUF
    converter does not run the model, so importance then comes from the weights (with a note saying so)."""
    if not path.is_file():
        raise FormatError(f"{path}: calibration file does not exist")
    if not _is_safetensors(path):
        return None, (f"{path.name} is calibration text, not a statistics file: the GGUF converter does not run "
                      "calibration itself, so importance comes from the weights. Pass a calibration statistics "
                      "file (calibration_stats.safetensors) to use activation statistics.")
    from .calibrate import CalibrationStats

    stats = CalibrationStats.load(path)  # FormatError unless it is a dgemma statistics file
    if not stats.inputs:
        raise FormatError(f"{path}: the statistics file holds no linear inputs")
    return ImportanceSource(path, stats), None


# ---- export --------------------------------------------------------------------------------------------------


def plan_summary(cfg: DGConfig, mix: str) -> list[tuple[GGUFTensorSpec, QT]]:
    """(spec, type) per tensor: what `export_gguf` will write."""
    if mix not in MIXES:
        raise ConfigError(f"unknown GGUF type {mix!r}; choose one of {', '.join(MIXES)}")
    return tensor_types(cfg, mix)


def export_gguf(opts: GGUFExportOptions, progress: ProgressFn | None = None) -> GGUFExportResult:
    """Convert `opts.src` to `opts.out` (see the module docstring). Raises DGemmaError subclasses on bad input."""
    t0 = time.perf_counter()
    src, out = Path(opts.src), Path(opts.out)
    if out.exists() and not opts.force:
        raise DGemmaError(f"{out}: already exists (use --force to overwrite)")
    if out.is_dir():
        raise DGemmaError(f"{out}: is a directory; give the path of the .gguf file to write")
    if not out.parent.is_dir():
        raise DGemmaError(f"{out.parent}: output directory does not exist")
    _check_source_config(src)
    cfg = DGConfig.from_pretrained(src)
    types = plan_summary(cfg, opts.mix)
    plan = [s for s, _ in types]
    notes: list[str] = []

    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{src}: no tokenizer.json or tokenizer.model; a GGUF must carry the tokenizer")
    tok = Tokenizer.from_pretrained(src)
    tok_md = tokenizer_metadata(tok, cfg.vocab_size)
    if tok_md.chat_template is None:
        notes.append("the checkpoint has no chat template; tokenizer.chat_template is not written")

    importance: ImportanceSource | None = None
    if opts.calib is not None:
        importance, note = load_importance(Path(opts.calib), cfg)
        if note:
            notes.append(note)
    src_files = _Source(src, plan)

    writer: gguf.GGUFWriter | None = None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    counts: Counter[str] = Counter()
    n_imp = 0
    tensor_bytes = 0
    try:
        writer = gguf.GGUFWriter(None, arch=ARCH)
        nbytes = {}
        for s, t in types:
            nb = _tensor_nbytes(s, t)
            nbytes[s.gguf_name] = nb
            # element shape (torch order) and a non-uint8 placeholder dtype: GGUFWriter then takes the shape as is
            writer.add_tensor_info(s.gguf_name, s.torch_shape, np.dtype(np.float32), nb, raw_dtype=t)
        total, shared, expert, n_exp = writer.get_total_parameter_count()
        label = gguf.size_label(total, shared, expert, n_exp)
        meta = gguf_metadata(cfg, tok_md, opts.mix, name=src.resolve().name, size_label=label,
                             with_sampler_defaults=(src / "generation_config.json").is_file())
        for key, value, vt, sub in meta:
            if key == "general.architecture":
                continue  # GGUFWriter added it first
            writer.add_key_value(key, value, vt, sub_type=sub)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        src_total = sum(src_files.bytes_by_name.values())
        done = 0
        seen: set[str] = set()
        for s, t in types:
            if progress is not None:
                progress(done, src_total, s.gguf_name)
            data = gguf_tensor_data(cfg, s, src_files.get)  # torch-shaped, source dtype (or float32)
            imp = importance.for_spec(s, t) if importance is not None else None
            n_imp += imp is not None
            q = quantize_planned(s, data, t, imp)
            if q.nbytes != nbytes[s.gguf_name]:
                raise RuntimeError(f"{s.gguf_name}: encoded {q.nbytes} bytes, planned {nbytes[s.gguf_name]}")
            writer.write_tensor_data(np.ascontiguousarray(q))
            tensor_bytes += q.nbytes
            counts[ggml_type_name(t)] += 1
            del data, q
            for n in s.hf_sources:
                if n not in seen:
                    seen.add(n)
                    done += src_files.bytes_by_name[n]
        if progress is not None:
            progress(done, src_total, "")
        writer.flush()
        assert writer.fout is not None
        for f in writer.fout:
            os.fsync(f.fileno())
        writer.close()
        writer = None
        os.replace(tmp, out)
    except BaseException:
        # an error or Ctrl-C: remove the partial file; nothing is left at OUT
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        src_files.close()

    if importance is not None:
        notes += importance.report()
    return GGUFExportResult(
        path=out, mix=opts.mix, n_tensors=len(types), n_keys=len(meta), type_counts=dict(counts.most_common()),
        tensor_bytes=tensor_bytes, file_bytes=out.stat().st_size, source_bytes=src_total,
        seconds=time.perf_counter() - t0, importance_tensors=n_imp, notes=notes,
    )


def _tensor_nbytes(s: GGUFTensorSpec, t: QT) -> int:
    from .gguf_quants import tensor_nbytes

    try:
        return tensor_nbytes(t, s.torch_shape)
    except FormatError as e:
        raise ConfigError(f"{s.gguf_name}: {e}") from None
