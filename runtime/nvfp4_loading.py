"""Load an NVFP4 DiffusionGemma checkpoint (ModelOpt or compressed-tensors layout) into `DGModel`, weights packed.

Which modules are quantized is decided by what is on disk, not by the config's exclude/ignore lists:
- ModelOpt (`hf_quant_config.json` or `quantization_config.quant_method == "modelopt"`): a linear `<m>` is NVFP4
  when `<m>.weight` is uint8 [N, K/2] next to `<m>.weight_scale` (e4m3 [N, K/16]), `<m>.weight_scale_2`
  (float32, 0-d or [1], multiplied) and optionally `<m>.input_scale`;
- compressed-tensors (`quant_method == "compressed-tensors"`, format `nvfp4-pack-quantized`): `<m>.weight_packed`,
  `<m>.weight_scale`, `<m>.weight_global_scale` ([1], divided: weight_scale_2 = 1 / it) and optionally
  `<m>.input_global_scale` (input_scale = 1 / it) and `<m>.weight_shape`.
Anything else is a plain float tensor. Routed experts may be stacked float tensors (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I], as HF stores them) or per-expert 2-D linears
`experts.{e}.{gate_proj,up_proj,down_proj}` (how both tools export MoE); per-expert tensors are re-fused at load:
gate rows first, then up, into `NVFP4Experts` stacks [E, 2I, H/2] / [E, H, I/2].

Tied text weights may be stored once under `model.decoder.*` (the usual case) or under the encoder's names
(`model.encoder.language_model.*`); the encoder's own `layer_scalar`s are always separate. Vision tensors,
`lm_head.weight` and FP8 KV-cache scales (`*.k_scale`, `*.v_scale`: this runtime keeps a bf16/fp32 cache) are
skipped with a log line. Everything else is strict: a missing, unexpected, misshapen or mistyped tensor is a
`CheckpointError` naming the tensor and the file.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DGConfig
from .errors import CheckpointError, ConfigError
from .hf_names import DEC, ENC, checkpoint_tensors, is_vision
from .loading import FLOAT_DTYPES, _set_tensor, runtime_name
from .model import DGModel, Experts, build_meta, rope_inv_freq
from .nvfp4_linear import NVFP4Experts, NVFP4Linear
from .safetensors_io import CheckpointFiles, TensorInfo

log = logging.getLogger("dgemma.nvfp4_loading")

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
LAYOUTS = (MODELOPT, COMPRESSED_TENSORS)
_MODELOPT_ALGOS = ("NVFP4", "W4A16_NVFP4")
_KV_SCALE = re.compile(r"\.(k_scale|v_scale|q_scale|prob_scale)$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")


@dataclass(frozen=True)
class QuantFormat:
    layout: str  # MODELOPT | COMPRESSED_TENSORS
    quant_algo: str  # "NVFP4" (W4A4 scales present) or "W4A16_NVFP4"
    source: str  # the file that declared it


def _read_json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: cannot read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: expected a JSON object")
    return data


def _check_ct_args(args: object, where: str) -> None:
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: expected an object, got {args!r}")
    if args.get("num_bits") != 4 or args.get("type") != "float" or args.get("group_size", 16) != 16:
        raise ConfigError(f"{where}: only NVFP4 (num_bits 4, type float, group_size 16) is supported, got {args}")


def read_quant_format(path: str | Path) -> QuantFormat:
    """The NVFP4 layout a checkpoint directory declares; ConfigError for anything that is not NVFP4."""
    path = Path(path)
    hq = path / "hf_quant_config.json"
    if hq.is_file():
        q = _read_json(hq).get("quantization")
        if not isinstance(q, dict):
            raise ConfigError(f"{hq}: missing the 'quantization' object")
        algo = str(q.get("quant_algo", "")).upper()
        if algo == "MIXED_PRECISION":
            layers = q.get("quantized_layers") or {}
            algos = {str(v.get("quant_algo", "")).upper() for v in layers.values() if isinstance(v, dict)}
            if not algos or not algos <= set(_MODELOPT_ALGOS):
                raise ConfigError(f"{hq}: MIXED_PRECISION with {sorted(algos)}; dgemma loads NVFP4 only")
            algo = "NVFP4" if "NVFP4" in algos else "W4A16_NVFP4"
        elif algo not in _MODELOPT_ALGOS:
            raise ConfigError(f"{hq}: quant_algo {q.get('quant_algo')!r} is not supported (dgemma loads {_MODELOPT_ALGOS})")
        if q.get("group_size", 16) != 16:
            raise ConfigError(f"{hq}: group_size {q.get('group_size')} is not NVFP4's 16")
        return QuantFormat(MODELOPT, algo, str(hq))
    cfg_file = path / "config.json"
    qc = _read_json(cfg_file).get("quantization_config") if cfg_file.is_file() else None
    if not isinstance(qc, dict) or not qc:
        raise ConfigError(f"{path}: no hf_quant_config.json and no quantization_config in config.json (not NVFP4)")
    method = str(qc.get("quant_method", "")).lower()
    where = f"{cfg_file} quantization_config"
    if method.startswith(MODELOPT):
        algo = str(qc.get("quant_algo", "")).upper()
        if algo not in _MODELOPT_ALGOS:
            raise ConfigError(f"{where}: quant_algo {qc.get('quant_algo')!r} is not supported (dgemma loads {_MODELOPT_ALGOS})")
        return QuantFormat(MODELOPT, algo, where)
    if method == COMPRESSED_TENSORS:
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConfigError(f"{where}: config_groups is missing")
        fmt = qc.get("format")
        w4a4 = False
        for gname, g in groups.items():
            gfmt = g.get("format", fmt) if isinstance(g, dict) else None
            if gfmt != "nvfp4-pack-quantized":
                raise ConfigError(f"{where}: group {gname!r} has format {gfmt!r}; dgemma loads 'nvfp4-pack-quantized' only")
            _check_ct_args(g.get("weights"), f"{where} config_groups.{gname}.weights")
            if g.get("input_activations") is not None:
                _check_ct_args(g["input_activations"], f"{where} config_groups.{gname}.input_activations")
                w4a4 = True
        return QuantFormat(COMPRESSED_TENSORS, "NVFP4" if w4a4 else "W4A16_NVFP4", where)
    raise ConfigError(f"{where}: quant_method {qc.get('quant_method')!r} is not supported (modelopt or compressed-tensors NVFP4)")


class _Tensors:
    """Checkpoint tensors under decoder-normalized names, with strict shape/dtype reads and use tracking."""

    def __init__(self, files: CheckpointFiles, path: Path, device: torch.device, check_finite: bool):
        self.files, self.path, self.device, self.check_finite = files, path, device, check_finite
        self.by_name: dict[str, TensorInfo] = {}
        self.skipped: dict[str, int] = {"vision": 0, "lm_head": 0, "kv-cache scale": 0}
        for n, info in files.tensors.items():
            if is_vision(n):
                self.skipped["vision"] += 1
                continue
            if n == "lm_head.weight":
                self.skipped["lm_head"] += 1
                continue
            if _KV_SCALE.search(n):
                self.skipped["kv-cache scale"] += 1
                continue
            key = n
            if n.startswith(ENC + ".") and not n.endswith(".layer_scalar"):
                key = DEC + n[len(ENC):]  # the encoder copy of a tied tensor
            prev = self.by_name.get(key)
            if prev is not None:
                if prev.shape != info.shape or prev.dtype != info.dtype:
                    raise CheckpointError(f"{path}: tied copies {prev.name!r} and {n!r} differ in shape or dtype")
                if not n.startswith(DEC + "."):
                    continue  # keep the decoder copy
            self.by_name[key] = info
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def info(self, name: str) -> TensorInfo:
        if name not in self.by_name:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self.by_name[name]

    def get(self, name: str, shape: tuple[int, ...] | tuple[tuple[int, ...], ...], dtypes: tuple[str, ...]) -> torch.Tensor:
        """Read a tensor after checking its header; `shape` may be one shape or a tuple of allowed shapes."""
        info = self.info(name)
        shapes = shape if shape and isinstance(shape[0], tuple) else (shape,)
        if info.shape not in shapes:
            want = " or ".join(str(list(s)) for s in shapes)
            raise CheckpointError(f"{info.file.name}: tensor {info.name!r} has shape {list(info.shape)}, expected {want}")
        if info.dtype not in dtypes:
            raise CheckpointError(f"{info.file.name}: tensor {info.name!r} has dtype {info.dtype}, expected one of {dtypes}")
        t = self.files.get(info.name)
        fp8 = t.dtype == torch.float8_e4m3fn
        if self.check_finite and t.is_floating_point() and not bool(torch.isfinite(t.float() if fp8 else t).all()):
            raise CheckpointError(f"{info.file.name}: tensor {info.name!r} contains NaN or Inf values")
        self.used.add(name)
        return t.to(self.device)


def _global(t: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    """A 0-d fp32 global scale; compressed-tensors stores the reciprocal (divide) convention."""
    g = t.reshape(()).float()
    return (1.0 / g.double()).float() if reciprocal else g


def _read_linear(ts: _Tensors, fmt: QuantFormat, m: str, n: int, k: int, float_dtype: torch.dtype | None):
    """Linear module `m` [n, k]: ("packed", (w, s, ws2, input_scale|None)) or ("dense", weight)."""
    ct = fmt.layout == COMPRESSED_TENSORS
    wname = f"{m}.weight_packed" if ct else f"{m}.weight"
    packed = wname in ts and (ct or ts.info(wname).dtype == "U8")
    if not packed:
        if ct and f"{m}.weight_scale" in ts:
            raise CheckpointError(f"{ts.path}: {m}.weight_scale without {m}.weight_packed")
        w = ts.get(f"{m}.weight", (n, k), FLOAT_DTYPES)
        return "dense", (w if float_dtype is None else w.to(float_dtype))
    if k % 16:
        raise CheckpointError(f"{ts.path}: {m} is NVFP4 but in_features {k} is not a multiple of 16")
    w = ts.get(wname, (n, k // 2), ("U8",))
    s = ts.get(f"{m}.weight_scale", (n, k // 16), ("F8_E4M3",))
    if ct:
        g = _global(ts.get(f"{m}.weight_global_scale", ((1,), ()), ("F32",)), True)
        inp = None
        if f"{m}.input_global_scale" in ts:
            inp = _global(ts.get(f"{m}.input_global_scale", ((1,), ()), ("F32",)), True)
        if f"{m}.weight_shape" in ts:
            shp = ts.get(f"{m}.weight_shape", (2,), ("I64", "I32"))
            if shp.tolist() != [n, k]:
                raise CheckpointError(f"{ts.path}: {m}.weight_shape is {shp.tolist()}, expected {[n, k]}")
    else:
        g = _global(ts.get(f"{m}.weight_scale_2", ((), (1,)), ("F32",)), False)
        inp = _global(ts.get(f"{m}.input_scale", ((), (1,)), ("F32",)), False) if f"{m}.input_scale" in ts else None
    return "packed", (w, s, g, inp)


def _load_experts(ts: _Tensors, fmt: QuantFormat, cfg: DGConfig, layer: int, float_dtype: torch.dtype | None):
    """The layer's experts module: `Experts` when both stacks are stored fused in a float dtype, else NVFP4Experts."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    p = f"{DEC}.layers.{layer}.experts"
    per_expert = any(f"{p}.0.{proj}.{suf}" in ts for proj in ("gate_proj", "up_proj", "down_proj")
                     for suf in ("weight", "weight_packed"))
    mod = NVFP4Experts(E, H, I)
    kinds: dict[str, str] = {}
    for fused, parts, (n, k) in (("gate_up_proj", ("gate_proj", "up_proj"), (I, H)), ("down_proj", ("down_proj",), (H, I))):
        stacked = f"{p}.{fused}"
        have_parts = any(f"{p}.0.{q}.{suf}" in ts for q in parts for suf in ("weight", "weight_packed"))
        if stacked in ts:
            if have_parts:
                raise CheckpointError(f"{ts.path}: layer {layer} stores {fused} both fused and per expert")
            rows = n * len(parts)
            w = ts.get(stacked, (E, rows, k), FLOAT_DTYPES)
            mod.set_dense(fused, w if float_dtype is None else w.to(float_dtype))
            kinds[fused] = "dense"
            continue
        if not per_expert:
            ts.info(stacked)  # raises "missing tensor"
        got: list[list[tuple[str, object]]] = []  # [expert][part] -> (kind, data)
        for e in range(E):
            got.append([_read_linear(ts, fmt, f"{p}.{e}.{q}", n, k, float_dtype) for q in parts])
        ks = {kind for row in got for kind, _ in row}
        if len(ks) != 1:
            raise CheckpointError(f"{ts.path}: layer {layer} {fused}: experts mix NVFP4 and float tensors; "
                                  "dgemma needs one format per projection")
        kind = ks.pop()
        kinds[fused] = kind
        if kind == "dense":
            mod.set_dense(fused, torch.stack([torch.cat([d for _, d in row], dim=0) for row in got]))
            continue
        w = torch.stack([torch.cat([d[0] for _, d in row], dim=0) for row in got])  # [E, rows, k/2]
        s = torch.stack([torch.cat([d[1] for _, d in row], dim=0) for row in got])
        g = torch.stack([torch.stack([d[2] for _, d in row]) for row in got])  # [E, parts]
        if len(parts) == 2 and bool((g[:, 0] != g[:, 1]).any()):
            bad = int((g[:, 0] != g[:, 1]).sum())
            log.warning("layer %d: gate and up global scales differ in %d of %d experts; using the per-projection "
                        "path (slower; dgemma's own export shares them)", layer, bad, E)
        else:
            g = g[:, 0].contiguous()
        inps = [[d[3] for _, d in row] for row in got]
        have_inp = {x is not None for row in inps for x in row}
        if len(have_inp) != 1:
            raise CheckpointError(f"{ts.path}: layer {layer} {fused}: input scales present for some experts only")
        inp = torch.stack([torch.stack(row).amax() for row in inps]) if have_inp.pop() else None
        mod.set_packed(fused, w, s, g, inp)
        del got
    if kinds["gate_up_proj"] == "dense" and kinds["down_proj"] == "dense":
        with torch.device("meta"):
            plain = Experts(cfg)  # the runtime's own module for an all-float layer
        plain.gate_up_proj = torch.nn.Parameter(mod.gate_up_proj.data, requires_grad=False)
        plain.down_proj = torch.nn.Parameter(mod.down_proj.data, requires_grad=False)
        return plain, kinds
    return mod, kinds


def load_nvfp4_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> DGModel:
    """Load an NVFP4 checkpoint directory. Quantized linears become `NVFP4Linear` / `NVFP4Experts` with packed
    weights (never expanded); float tensors are converted to `dtype` (None keeps the checkpoint's float dtype)."""
    path = Path(path)
    fmt = read_quant_format(path)
    cfg = DGConfig.from_pretrained(path)
    files = CheckpointFiles(path)
    device = torch.device(device or "cpu")
    ts = _Tensors(files, path, device, check_finite)
    for what, n in ts.skipped.items():
        if n:
            log.info("skipping %d %s tensor(s) (not used by dgemma)", n, what)

    float_dtype = dtype
    if float_dtype is None:
        emb = ts.info(f"{DEC}.embed_tokens.weight")
        float_dtype = emb.torch_dtype if emb.dtype in FLOAT_DTYPES else torch.float32
    model = build_meta(cfg)
    n_packed = n_dense = 0
    for spec in checkpoint_tensors(cfg):
        name = spec.name
        if spec.component == "experts":
            if name.endswith("gate_up_proj"):
                mod, kinds = _load_experts(ts, fmt, cfg, spec.layer, float_dtype)
                model.layers[spec.layer].experts = mod
                n_packed += sum(k == "packed" for k in kinds.values())
                n_dense += sum(k == "dense" for k in kinds.values())
            continue
        if len(spec.shape) == 2 and name.endswith(".weight") and spec.component != "embedding":
            m = name[: -len(".weight")]
            kind, data = _read_linear(ts, fmt, m, spec.shape[0], spec.shape[1], float_dtype)
            if kind == "dense":
                _set_tensor(model, runtime_name(name), data)
                n_dense += 1
            else:
                w, s, g, inp = data
                parent_name, _, attr = runtime_name(name).rpartition(".")[0].rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, attr, NVFP4Linear(w, s, g, inp, name=m))
                n_packed += 1
            continue
        if name.endswith(".weight") and spec.component == "embedding" and (
                f"{name[:-7]}.weight_scale" in ts or f"{name[:-7]}.weight_packed" in ts):
            raise CheckpointError(f"{path}: a quantized embedding ({name}) is not supported; keep it in bf16")
        t = ts.get(name, spec.shape, FLOAT_DTYPES)
        _set_tensor(model, runtime_name(name), t.to(float_dtype))
    unexpected = sorted(set(ts.by_name) - ts.used)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors for this config: {', '.join(unexpected[:5])}{more}")
    files.close()
    for lt, p in cfg.rope.items():
        hd = next(g.head_dim for g in cfg.layers if g.layer_type == lt)
        model._buffers[f"inv_freq_{lt}"] = rope_inv_freq(p, hd).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None and t.is_meta]
    if left:
        raise CheckpointError(f"{path}: tensors never loaded: {', '.join(left[:5])}")
    if n_packed == 0:
        log.warning("%s declares NVFP4 (%s) but holds no quantized tensor", path, fmt.layout)
    log.info("loaded %s NVFP4 checkpoint (%s): %d packed, %d float linear/expert stacks", fmt.layout, fmt.quant_algo,
             n_packed, n_dense)
    model.eval()
    return model


def quantized_modules(model: DGModel) -> dict[str, torch.nn.Module]:
    """Runtime name -> NVFP4Linear / NVFP4Experts module (for reports and tests)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (NVFP4Linear, NVFP4Experts))}


__all__ = ["LAYOUTS", "MODELOPT", "COMPRESSED_TENSORS", "QuantFormat", "read_quant_format", "load_nvfp4_model",
           "quantized_modules"]
