"""HF DiffusionGemma (bf16) -> NVFP4 safetensors in the ModelOpt or compressed-tensors layout, streamed.

Legend: E experts, I expert intermediate, H hidden, N out features, K in features.

Memory: one layer's source tensors, its quantized tensors and the calibration activations; source bytes are read
with plain file reads (`calibrate.RawReader`) and written with a streaming safetensors writer whose headers are
computed up front from the config, so no shard is ever assembled in memory.

Layouts (names exactly as the tools write them; `nvfp4.md` §2-§3):
- `modelopt`: `hf_quant_config.json` {producer, quantization {quant_algo "NVFP4", kv_cache_quant_algo null,
  group_size 16, exclude_modules [fnmatch patterns]}} and the same converted into `config.json`
  `quantization_config` {config_groups.group_0 {weights, input_activations {num_bits 4, type float, group_size 16,
  dynamic false}, targets ["Linear"]}, ignore, quant_algo, producer, quant_method "modelopt"}. A quantized linear
  `<m>`: `<m>.weight` U8 [N, K/2], `<m>.weight_scale` F8_E4M3 [N, K/16], `<m>.weight_scale_2` F32 [] (multiply),
  `<m>.input_scale` F32 [].
- `compressed-tensors`: `quantization_config` {quant_method "compressed-tensors", format "nvfp4-pack-quantized",
  quantization_status "compressed", config_groups.group_0 {targets ["Linear"], weights {num_bits 4, type float,
  symmetric true, group_size 16, strategy "tensor_group", dynamic false, scale_dtype "float8_e4m3fn"},
  input_activations {... dynamic "local", observer "static_minmax"}}, ignore [names / "re:" regexes]}.
  `<m>.weight_packed` U8, `<m>.weight_scale` F8_E4M3, `<m>.weight_global_scale` F32 [1] = 1 / weight_scale_2
  (divide), `<m>.input_global_scale` F32 [1] = 1 / input_scale. The stored weight_scale_2 is nudged (at most one
  ulp) to a value whose fp32 reciprocal round-trips exactly, so both conventions decode the same bytes identically.
- Experts (both layouts): per-expert 2-D linears `model.decoder.layers.{L}.experts.{e}.{gate_proj,up_proj,down_proj}`;
  gate and up of an expert share one global scale (quantized as HF's fused [2I, H] rows), and every expert of a
  projection shares one input scale (ModelOpt's shared input quantizer). In the default preset q/k/v share one
  global scale, as do the dense gate/up (kernels fuse them). Tied text weights are stored once under decoder
  names; the encoder's `layer_scalar`s are kept; vision tensors are copied unchanged (bf16, excluded).
Tensors that stay unquantized keep the source dtype and name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..runtime.config import DGConfig
from ..runtime.errors import CheckpointError, ConfigError, DGemmaError, FormatError
from ..runtime.hf_names import DEC, ENC, checkpoint_tensors, encoder_alias, is_vision, layer_tensors
from ..runtime.nvfp4_linear import NVFP4Experts, NVFP4Linear
from ..runtime.safetensors_io import DTYPES, CheckpointFiles
from ..runtime.tokenizer import Tokenizer
from .calib_data import load_calibration
from .calibrate import STATS_FILE, CalibOptions, CalibrationStats, RawReader, StreamingCalibrator, build_layer, \
    layer_tensor_names
from .nvfp4 import NVFP4Tensor, global_scale_from_amax, input_scale_from_amax, quantize, shared_weight_scale_2, \
    tensor_amax
from .policy import NVFP4, check_preset, describe_plan, tensor_plan
from .scale_search import mse_quantize

log = logging.getLogger(__name__)

LAYOUTS = ("modelopt", "compressed-tensors")
SCALE_SEARCHES = ("rtn", "mse")
REPORT_FILE = "nvfp4_conversion_report.json"
COPY_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
              "preprocessor_config.json", "processor_config.json")
COPY_GLOBS = ("*.jinja", "LICENSE*", "NOTICE*", "USE_POLICY*")
_ST_NAME = {torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16",
            torch.float16: "F16", torch.int64: "I64"}
_COPY_CHUNK = 64 << 20
_VERSION = "0.1"


@dataclass(frozen=True)
class ConvertOptions:
    preset: str = "experts"
    layout: str = "modelopt"
    scale_search: str = "mse"  # "rtn": ModelOpt's max; "mse": importance-weighted E4M3 block-scale sweep
    calib: Path | None = None  # None: the packaged calibration set
    calib_samples: int | None = None
    force: bool = False
    seed: int = 0
    shard_bytes: int = 5_000_000_000
    progress: bool = True
    max_prompt_tokens: int = 256
    chunk_tokens: int = 4096

    def __post_init__(self) -> None:
        check_preset(self.preset)
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.scale_search not in SCALE_SEARCHES:
            raise ConfigError(f"unknown scale search {self.scale_search!r}; choose one of {', '.join(SCALE_SEARCHES)}")


@dataclass
class ConvertReport:
    dst: str
    options: dict
    layer_errors: list[dict] = field(default_factory=list)
    starved_experts: dict[int, list[int]] = field(default_factory=dict)
    layer_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    calibration: dict = field(default_factory=dict)


# ---- streaming safetensors writer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for s in self.shape:
            n *= s
        return n


class ShardWriter:
    """Writes a known, ordered list of tensors into size-limited safetensors shards, one tensor at a time."""

    def __init__(self, out_dir: Path, plan: list[OutTensor], shard_bytes: int):
        self.out_dir, self.plan = out_dir, plan
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in plan:
            if shards[-1] and size + t.nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
        self.shards = shards
        self._order = [(si, t) for si, sh in enumerate(shards) for t in sh]
        self._next = 0
        self._fh = None
        self._shard = -1
        self.total = sum(t.nbytes for t in plan)

    def _open(self, si: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for t in self.shards[si]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / self.names[si], "wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._shard = si

    def expect(self) -> OutTensor | None:
        return self._order[self._next][1] if self._next < len(self._order) else None

    def write(self, name: str, t: torch.Tensor) -> None:
        si, spec = self._order[self._next] if self._next < len(self._order) else (None, None)
        if spec is None or spec.name != name:
            raise RuntimeError(f"writer: got {name!r}, expected {spec.name if spec else 'nothing'}")
        if _ST_NAME.get(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
            raise RuntimeError(f"writer: {name} is {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}")
        if si != self._shard:
            self._open(si)
        self.write_bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def write_bytes(self, data) -> None:
        self._fh.write(memoryview(data))

    def begin_raw(self, name: str) -> OutTensor:
        """Start a tensor whose bytes the caller streams with write_bytes (call end_raw after)."""
        si, spec = self._order[self._next]
        if spec.name != name:
            raise RuntimeError(f"writer: got {name!r}, expected {spec.name}")
        if si != self._shard:
            self._open(si)
        return spec

    def end_raw(self) -> None:
        self._next += 1

    def close(self) -> dict[str, str]:
        if self._next != len(self._order):
            raise RuntimeError(f"writer: {len(self._order) - self._next} planned tensors were never written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        weight_map = {t.name: self.names[si] for si, sh in enumerate(self.shards) for t in sh}
        # always an index, also for one shard: loaders that glob *.safetensors (vLLM, dgemma) then skip
        # calibration_stats.safetensors, which lives in the same directory
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map


# ---- output plan (names, dtypes, shapes) ------------------------------------------------------------------------


def _linear_names(m: str, N: int, K: int, layout: str) -> list[OutTensor]:
    if layout == "modelopt":
        return [OutTensor(f"{m}.weight", "U8", (N, K // 2)), OutTensor(f"{m}.weight_scale", "F8_E4M3", (N, K // 16)),
                OutTensor(f"{m}.weight_scale_2", "F32", ()), OutTensor(f"{m}.input_scale", "F32", ())]
    return [OutTensor(f"{m}.weight_packed", "U8", (N, K // 2)), OutTensor(f"{m}.weight_scale", "F8_E4M3", (N, K // 16)),
            OutTensor(f"{m}.weight_global_scale", "F32", (1,)), OutTensor(f"{m}.input_global_scale", "F32", (1,))]


def _layer_out(cfg: DGConfig, i: int, fmts: dict[str, str], layout: str, src_dtype: Callable[[str], str]) -> list[OutTensor]:
    out: list[OutTensor] = []
    specs = layer_tensors(cfg, i)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    exp = f"{DEC}.layers.{i}.experts"
    per_expert = any(fmts[s.name] == NVFP4 for s in specs if s.component == "experts")
    for s in specs:
        if s.component == "experts":
            if not per_expert:
                out.append(OutTensor(s.name, src_dtype(s.name), s.shape))
            elif s.name.endswith("down_proj"):  # all per-expert tensors once, at the down_proj slot
                for e in range(E):
                    for proj, fused, (N, K) in (("gate_proj", "gate_up_proj", (I, H)), ("up_proj", "gate_up_proj", (I, H)),
                                                ("down_proj", "down_proj", (H, I))):
                        m = f"{exp}.{e}.{proj}"
                        if fmts[f"{exp}.{fused}"] == NVFP4:
                            out += _linear_names(m, N, K, layout)
                        else:
                            out.append(OutTensor(f"{m}.weight", src_dtype(f"{exp}.{fused}"), (N, K)))
            continue
        if fmts[s.name] == NVFP4:
            out += _linear_names(s.name[: -len(".weight")], s.shape[0], s.shape[1], layout)
        else:
            out.append(OutTensor(s.name, src_dtype(s.name), s.shape))
    enc = f"{ENC}.layers.{i}.layer_scalar"
    out.append(OutTensor(enc, src_dtype(enc), (1,)))
    return out


def _exclusions(cfg: DGConfig, fmts: dict[str, str]) -> list[str]:
    """fnmatch patterns (HF module names) of every linear that stays unquantized, compressed per module kind."""
    pats = ["lm_head", f"{DEC}.embed_tokens", "model.encoder.vision_tower*", "model.encoder.embed_vision*"]
    kinds: dict[str, list[int]] = {}
    for i in range(cfg.num_hidden_layers):
        for s in layer_tensors(cfg, i):
            if len(s.shape) not in (2, 3) or fmts[s.name] == NVFP4:
                continue
            rel = s.name[len(f"{DEC}.layers.{i}."):]
            mods = [rel[: -len(".weight")]] if s.component != "experts" else (
                ["experts.*.gate_proj", "experts.*.up_proj"] if rel.endswith("gate_up_proj") else ["experts.*.down_proj"])
            for m in mods:
                kinds.setdefault(m, []).append(i)
    for m, layers in kinds.items():
        if len(layers) == cfg.num_hidden_layers:
            pats.append(f"{DEC}.layers.*.{m}")
        else:
            pats += [f"{DEC}.layers.{i}.{m}" for i in layers]
    sc = [s for s in checkpoint_tensors(cfg) if s.component == "self_conditioning" and len(s.shape) == 2]
    if all(fmts[s.name] != NVFP4 for s in sc):
        pats.append(f"{DEC}.self_conditioning*")
    return pats


def _ct_ignore(patterns: list[str]) -> list[str]:
    """fnmatch patterns -> compressed-tensors ignore entries (plain names, or 're:' regexes)."""
    out = []
    for p in patterns:
        if "*" not in p:
            out.append(p)
        else:
            out.append("re:^" + re.escape(p).replace(r"\*", ".*") + "$")
    return out


def quant_configs(cfg: DGConfig, fmts: dict[str, str], layout: str) -> tuple[dict | None, dict]:
    """(hf_quant_config.json or None, config.json quantization_config)."""
    excl = _exclusions(cfg, fmts)
    producer = {"name": "dgemma", "version": _VERSION}
    if layout == "modelopt":
        hf = {"producer": producer, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                                     "group_size": 16, "exclude_modules": excl}}
        args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        qc = {"config_groups": {"group_0": {"input_activations": dict(args), "weights": dict(args), "targets": ["Linear"]}},
              "ignore": excl, "quant_algo": "NVFP4", "producer": producer, "quant_method": "modelopt"}
        return hf, qc
    w = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
         "dynamic": False, "scale_dtype": "float8_e4m3fn", "actorder": None, "block_structure": None, "observer": "minmax"}
    a = dict(w, dynamic="local", observer="static_minmax")
    qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a,
                                        "output_activations": None, "format": "nvfp4-pack-quantized"}},
          "ignore": _ct_ignore(excl), "kv_cache_scheme": None, "sparsity_config": {}, "producer": producer}
    return None, qc


# ---- quantizing one layer -------------------------------------------------------------------------------------


def _ct_fixpoint(g: torch.Tensor) -> torch.Tensor:
    """Nudge fp32 global scales to values whose reciprocal round-trips: 1/(1/g) == g exactly in fp32."""
    for _ in range(4):
        nxt = (1.0 / (1.0 / g.double()).float().double()).float()
        if torch.equal(nxt, g):
            return g
        g = nxt
    raise RuntimeError("reciprocal fixed point not reached")


@dataclass
class _QLinear:
    q: NVFP4Tensor  # 2-D (dense linear) or 3-D (experts stack)
    input_scale: torch.Tensor  # 0-d fp32


class LayerQuantizer:
    """Chooses scales for one layer's NVFP4 tensors from calibration statistics and builds its runtime modules."""

    def __init__(self, cfg: DGConfig, fmts: dict[str, str], options: ConvertOptions):
        self.cfg, self.fmts, self.options = cfg, fmts, options

    def _q(self, ws: list[torch.Tensor], names: list[str], imp: torch.Tensor | None) -> list[NVFP4Tensor]:
        """Quantize tensors that share one global scale (per expert for 3-D) and one input."""
        ws2 = shared_weight_scale_2(ws, name=names[0]) if len(ws) > 1 else \
            global_scale_from_amax(tensor_amax(ws[0], name=names[0]))
        if self.options.layout == "compressed-tensors":
            ws2 = _ct_fixpoint(ws2)
        out = []
        for w, n in zip(ws, names):
            if self.options.scale_search == "rtn":
                out.append(quantize(w, weight_scale_2=ws2, name=n))
            else:
                out.append(mse_quantize(w, imp, weight_scale_2=ws2, name=n))
        return out

    def quantize_layer(self, i: int, tensors: dict[str, torch.Tensor], stats: CalibrationStats,
                       release: bool = False) -> dict[str, _QLinear]:
        """HF module name (dense) or expert-stack tensor name -> quantized tensor + input scale.
        `release`: drop each source tensor from `tensors` once quantized (bounds the peak memory)."""
        cfg, fmts = self.cfg, self.fmts
        pre = f"{DEC}.layers.{i}."
        groups: list[list[str]] = []
        q_names = [pre + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v")]
        groups.append([n for n in q_names if n in fmts and fmts[n] == NVFP4])
        groups.append([pre + f"mlp.{p}_proj.weight" for p in ("gate", "up") if fmts[pre + f"mlp.{p}_proj.weight"] == NVFP4])
        for s in layer_tensors(cfg, i):
            if fmts[s.name] == NVFP4 and not any(s.name in g for g in groups[:2]):
                groups.append([s.name])
        out: dict[str, _QLinear] = {}
        for g in groups:
            if not g:
                continue
            mods = [n[: -len(".weight")] if n.endswith(".weight") else n for n in g]
            use_stats = mods[0] in stats
            imp = stats.importance(mods[0]) if use_stats and self.options.scale_search == "mse" else None
            qs = self._q([tensors[n] for n in g], g, imp)
            amax = stats.input_amax(mods[0]) if use_stats else None
            if amax is None or float(amax) == 0.0:
                raise CheckpointError(f"{mods[0]}: no calibration activations reached this linear")
            inp = input_scale_from_amax(amax).reshape(())
            for m, q in zip(mods, qs):
                out[m] = _QLinear(q, inp)
            if release:
                for n in g:
                    tensors.pop(n)
        return out

    def runtime_modules(self, i: int, qs: dict[str, _QLinear], tensors: dict[str, torch.Tensor]) -> dict:
        """HF module name -> NVFP4Linear / NVFP4Experts for `calibrate.build_layer`."""
        cfg = self.cfg
        mods: dict[str, torch.nn.Module] = {}
        exp = f"{DEC}.layers.{i}.experts"
        for name, ql in qs.items():
            if name.startswith(exp + "."):
                continue
            mods[name] = NVFP4Linear.from_nvfp4(ql.q, ql.input_scale, name=name)
        if any(n.startswith(exp + ".") for n in qs):
            m = NVFP4Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
            for proj in ("gate_up_proj", "down_proj"):
                ql = qs.get(f"{exp}.{proj}")
                if ql is None:
                    m.set_dense(proj, tensors[f"{exp}.{proj}"])
                else:
                    m.set_packed(proj, ql.q.weight, ql.q.weight_scale, ql.q.weight_scale_2,
                                 ql.input_scale.expand(cfg.num_experts).contiguous())
            mods[exp] = m
        return mods


def _linear_tensors(m: str, q: NVFP4Tensor, inp: torch.Tensor, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    g = q.weight_scale_2.reshape(()).float()
    if layout == "modelopt":
        yield f"{m}.weight", q.weight
        yield f"{m}.weight_scale", q.weight_scale
        yield f"{m}.weight_scale_2", g
        yield f"{m}.input_scale", inp.reshape(()).float()
    else:
        yield f"{m}.weight_packed", q.weight
        yield f"{m}.weight_scale", q.weight_scale
        yield f"{m}.weight_global_scale", (1.0 / g.double()).float().reshape(1)
        yield f"{m}.input_global_scale", (1.0 / inp.double()).float().reshape(1)


def _layer_tensors_out(cfg: DGConfig, i: int, fmts: dict[str, str], layout: str, tensors: dict[str, torch.Tensor],
                       qs: dict[str, _QLinear]) -> Iterator[tuple[str, torch.Tensor]]:
    """The layer's output tensors in `_layer_out` order."""
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    exp = f"{DEC}.layers.{i}.experts"
    per_expert = any(n.startswith(exp + ".") for n in qs)
    for s in layer_tensors(cfg, i):
        if s.component == "experts":
            if not per_expert:
                yield s.name, tensors[s.name]
            elif s.name.endswith("down_proj"):
                gu, dn = qs.get(f"{exp}.gate_up_proj"), qs.get(f"{exp}.down_proj")
                for e in range(E):
                    for proj, rows in (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))):
                        m = f"{exp}.{e}.{proj}"
                        if gu is None:
                            yield f"{m}.weight", tensors[f"{exp}.gate_up_proj"][e, rows]
                        else:
                            q = NVFP4Tensor(gu.q.weight[e, rows], gu.q.weight_scale[e, rows], gu.q.weight_scale_2[e])
                            yield from _linear_tensors(m, q, gu.input_scale, layout)
                    m = f"{exp}.{e}.down_proj"
                    if dn is None:
                        yield f"{m}.weight", tensors[f"{exp}.down_proj"][e]
                    else:
                        q = NVFP4Tensor(dn.q.weight[e], dn.q.weight_scale[e], dn.q.weight_scale_2[e])
                        yield from _linear_tensors(m, q, dn.input_scale, layout)
            continue
        m = s.name[: -len(".weight")] if s.name.endswith(".weight") else s.name
        if m in qs:
            yield from _linear_tensors(m, qs[m].q, qs[m].input_scale, layout)
        else:
            yield s.name, tensors[s.name]
    enc = f"{ENC}.layers.{i}.layer_scalar"
    yield enc, tensors[enc]


# ---- the conversion ----------------------------------------------------------------------------------------------


def _sources(files: CheckpointFiles, cfg: DGConfig, src: Path) -> dict[str, str]:
    """Expected text tensor -> the stored name holding it (its own, or the encoder copy of a tied tensor)."""
    expected = {s.name: s for s in checkpoint_tensors(cfg)}
    out, missing = {}, []
    for name, spec in expected.items():
        cand = [name] + ([ENC + name[len(DEC):]] if name.startswith(DEC + ".") else [])
        got = next((c for c in cand if c in files), None)
        if got is None:
            missing.append(name)
            continue
        info = files.tensors[got]
        if info.shape != spec.shape:
            raise CheckpointError(f"{info.file.name}: tensor {got!r} has shape {list(info.shape)}, expected {list(spec.shape)}")
        if info.dtype not in ("BF16", "F16", "F32"):
            raise CheckpointError(f"{info.file.name}: tensor {got!r} has dtype {info.dtype}; the source must be a float "
                                  "(bf16/fp16/fp32) checkpoint")
        out[name] = got
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{src}: not a complete DiffusionGemma checkpoint for its config; missing "
                              f"{', '.join(missing[:5])}{more}")
    unexpected = [n for n in files.tensors if n not in expected and not is_vision(n) and n != "lm_head.weight"
                  and not (encoder_alias(n) in expected)]
    if unexpected:
        raise CheckpointError(f"{src}: unexpected tensors for this config: {', '.join(sorted(unexpected)[:5])}")
    return out


def _check_finite(name: str, t: torch.Tensor, chunk: int = 1 << 24) -> None:
    """In pieces: a full-size bool mask of a 1 GB expert stack would be a 0.5 GB temporary."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        if not bool(torch.isfinite(flat[i:i + chunk]).all()):
            raise CheckpointError(f"source tensor {name!r} contains NaN or Inf values; refusing to convert")


def _copy_raw(reader: RawReader, writer: ShardWriter, src_name: str, out_name: str) -> None:
    """Stream a tensor's bytes unchanged from source to output in pieces, checking values are finite."""
    info = reader.info(src_name)
    writer.begin_raw(out_name)
    start = reader._data_start(info)
    esize = DTYPES[info.dtype][1]
    step = max(esize, _COPY_CHUNK // esize * esize)
    with open(info.file, "rb", buffering=0) as fh:
        fh.seek(start)
        left = info.nbytes
        while left:
            buf = torch.empty(min(step, left), dtype=torch.uint8)
            mv = memoryview(buf.numpy())
            got = 0
            while got < buf.numel():
                n = fh.readinto(mv[got:])
                if not n:
                    raise FormatError(f"{info.file}: truncated while reading {src_name!r}")
                got += n
            if info.torch_dtype.is_floating_point:
                _check_finite(src_name, buf.view(info.torch_dtype))
            writer.write_bytes(buf.numpy())
            left -= buf.numel()
    writer.end_raw()


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    names = {n for n in COPY_FILES if (src / n).is_file()}
    for pat in COPY_GLOBS:
        names |= {p.name for p in src.glob(pat) if p.is_file()}
    for n in sorted(names):
        shutil.copy2(src / n, dst / n)
    return sorted(names)


def _prepare(src: Path, dst: Path, options: ConvertOptions) -> tuple[DGConfig, dict]:
    if not src.is_dir():
        raise DGemmaError(f"{src}: not a checkpoint directory")
    cfg = DGConfig.from_pretrained(src)  # ConfigError for anything that is not a DiffusionGemma config
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if raw.get("quantization_config") or (src / "hf_quant_config.json").exists():
        raise ConfigError(f"{src}: already quantized (quantization_config / hf_quant_config.json); convert the bf16 model")
    if dst.exists() and not options.force:
        raise DGemmaError(f"{dst} already exists; pass --force to replace it")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise DGemmaError(f"the output {dst} must not be the source directory, inside it or contain it")
    return cfg, raw


def convert_nvfp4(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions(),
                  tokenizer: Tokenizer | None = None) -> ConvertReport:
    """Convert `src` (HF bf16/fp32 DiffusionGemma) to an NVFP4 checkpoint directory `dst`, atomically."""
    t_start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    cfg, raw_cfg = _prepare(src, dst, options)
    files = CheckpointFiles(src)
    sources = _sources(files, cfg, src)
    reader = RawReader(files)
    plan = tensor_plan(cfg, options.preset)
    fmts = {s.name: f for s, f in plan}
    if not any(f == NVFP4 for f in fmts.values()):
        raise ConfigError(f"{src}: no tensor can be stored as NVFP4 under preset {options.preset!r} "
                          "(in_features must be multiples of 16)")
    log.info("%s", describe_plan(cfg, options.preset))
    if tokenizer is None:
        if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise FormatError(f"{src}: no tokenizer files; calibration needs tokenizer.json or tokenizer.model")
        tokenizer = Tokenizer.from_pretrained(src)
    samples = load_calibration(options.calib, options.calib_samples)

    def src_dtype(name: str) -> str:
        return files.tensors[sources.get(name, name)].dtype

    out_plan = [OutTensor(f"{DEC}.embed_tokens.weight", src_dtype(f"{DEC}.embed_tokens.weight"),
                          files.tensors[sources[f"{DEC}.embed_tokens.weight"]].shape)]
    for i in range(cfg.num_hidden_layers):
        out_plan += _layer_out(cfg, i, fmts, options.layout, src_dtype)
    tail = [s for s in checkpoint_tensors(cfg) if s.layer is None and s.component != "embedding"]
    out_plan += [OutTensor(s.name, src_dtype(s.name), s.shape) for s in tail]
    vision = sorted(n for n in files.tensors if is_vision(n))
    out_plan += [OutTensor(n, files.tensors[n].dtype, files.tensors[n].shape) for n in vision]

    report = ConvertReport(str(dst), {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()})
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        writer = ShardWriter(tmp, out_plan, options.shard_bytes)
        sc_names = [s.name for s in tail if s.component == "self_conditioning"]
        sc_tensors = {n[len(f"{DEC}.self_conditioning."):]: reader.read(sources[n]) for n in sc_names}
        for n, t in sc_tensors.items():
            _check_finite(n, t)
        # a bf16 model keeps its calibration activations in bf16 (as it runs), anything else in fp32
        act = torch.bfloat16 if src_dtype(f"{DEC}.embed_tokens.weight") == "BF16" else torch.float32
        calib = StreamingCalibrator(reader, cfg, samples, tokenizer,
                                    CalibOptions(max_prompt_tokens=options.max_prompt_tokens,
                                                 chunk_tokens=options.chunk_tokens, seed=options.seed,
                                                 state_dtype=act, ref_dtype=act),
                                    sc_tensors=sc_tensors)
        report.calibration = dict(calib.stats.meta, activation_bytes=calib.activation_bytes())
        log.info("calibration: %d samples, %d encoder + %d decoder tokens", calib.n_samples, calib.enc_tokens,
                 calib.dec_tokens)
        _copy_raw(reader, writer, sources[f"{DEC}.embed_tokens.weight"], f"{DEC}.embed_tokens.weight")
        quantizer = LayerQuantizer(cfg, fmts, options)
        bar = tqdm(range(cfg.num_hidden_layers), desc="nvfp4", unit="layer", disable=not options.progress)
        for i in bar:
            t0 = time.perf_counter()
            tensors = {}
            for n in layer_tensor_names(cfg, i):
                t = reader.read(sources[n])
                _check_finite(sources[n], t)
                tensors[n] = t
            calib.collect(i, tensors)
            qs = quantizer.quantize_layer(i, tensors, calib.stats, release=True)
            qlayer = build_layer(cfg, i, tensors, None, quantizer.runtime_modules(i, qs, tensors))
            err = calib.advance(i, qlayer)
            del qlayer
            for name, t in _layer_tensors_out(cfg, i, fmts, options.layout, tensors, qs):
                writer.write(name, t)
            starved = calib.stats.starved_experts(f"{DEC}.layers.{i}.experts.gate_up_proj")
            if starved:
                report.starved_experts[i] = starved
                log.warning("layer %d: %d expert(s) got no calibration tokens (weight-only scales): %s",
                            i, len(starved), starved)
            report.layer_errors.append(asdict(err))
            report.layer_seconds.append(time.perf_counter() - t0)
            bar.set_postfix(enc_err=f"{err.enc_rel:.4f}", dec_err=f"{err.dec_rel:.4f}")
            del tensors, qs
        for s in tail:
            t = reader.read(sources[s.name])
            _check_finite(s.name, t)
            writer.write(s.name, t)
        for n in vision:
            _copy_raw(reader, writer, n, n)
        writer.close()
        calib.stats.meta["source"] = str(src)
        calib.stats.save(tmp / STATS_FILE)
        hf_quant, qc = quant_configs(cfg, fmts, options.layout)
        new_cfg = dict(raw_cfg, quantization_config=qc)
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
        if hf_quant is not None:
            (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
        _copy_side_files(src, tmp)
        report.bytes_written = writer.total
        report.seconds = time.perf_counter() - t_start
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        files.close()
    return report


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished temp dir into place; an existing dst (--force) is removed only after that succeeds."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def plan_bytes(cfg: DGConfig, preset: str, layout: str = "modelopt") -> int:
    """Bytes of the text tensors as this exporter writes them (bf16 source): for sanity checks against policy."""
    fmts = {s.name: f for s, f in tensor_plan(cfg, preset)}
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += sum(t.nbytes for t in _layer_out(cfg, i, fmts, layout, lambda n: "BF16"))
    total += sum(s.numel * 2 for s in checkpoint_tensors(cfg) if s.layer is None)
    return total


__all__ = ["ConvertOptions", "ConvertReport", "convert_nvfp4", "LAYOUTS", "SCALE_SEARCHES", "quant_configs",
           "ShardWriter", "OutTensor", "plan_bytes", "LayerQuantizer", "REPORT_FILE"]
