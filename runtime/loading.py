"""Load an HF DiffusionGemma safetensors checkpoint into `DGModel`, strictly and tensor by tensor.

The model is built on the `meta` device; each tensor is read from the memory-mapped file, checked (shape,
dtype, finite values), converted and moved to the target device, and assigned: there is never a second full copy
of the weights in RAM.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import DGConfig
from .errors import CheckpointError
from .hf_names import DEC, ENC, checkpoint_tensors, encoder_alias, is_vision
from .model import DGModel, build_meta, rope_inv_freq
from .safetensors_io import CheckpointFiles

log = logging.getLogger("dgemma.loading")

FLOAT_DTYPES = ("F32", "BF16", "F16")


def runtime_name(hf_name: str) -> str:
    """HF checkpoint name -> DGModel parameter/buffer name."""
    if hf_name.startswith(ENC + ".layers.") and hf_name.endswith(".layer_scalar"):
        return hf_name[len(ENC) + 1 : -len("layer_scalar")] + "encoder_layer_scalar"
    if hf_name.startswith(DEC + "."):
        return hf_name[len(DEC) + 1 :]
    raise KeyError(hf_name)


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(getattr(mod, attr), torch.nn.Parameter):
        setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        mod._buffers[attr] = value


def resolve_sources(cfg: DGConfig, files: CheckpointFiles, path: Path) -> tuple[dict, dict[str, str]]:
    """Expected tensor specs by name, and the stored name each one is read from (its own name, or the encoder
    copy when only that exists). Raises CheckpointError for unexpected, missing or mis-shaped tensors; vision
    tensors are skipped with one log line."""
    expected = {s.name: s for s in checkpoint_tensors(cfg)}
    vision = [n for n in files.tensors if is_vision(n)]
    if vision:
        log.info("skipping %d vision-tower tensors (dgemma is text-only)", len(vision))
    unexpected = []
    for n in files.tensors:
        if n in expected or is_vision(n) or n == "lm_head.weight":
            continue
        alias = encoder_alias(n)
        if alias is not None and alias in expected:
            continue  # the encoder copy of a tied tensor; the decoder copy is used
        unexpected.append(n)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensors for this config: {', '.join(unexpected[:5])}{more}")

    # Pick the source of every expected tensor: its own name, or the encoder copy when only that exists.
    sources: dict[str, str] = {}
    missing = []
    for name in expected:
        if name in files:
            sources[name] = name
            continue
        enc = ENC + name[len(DEC) :] if name.startswith(DEC + ".") else None
        if enc is not None and enc in files:
            sources[name] = enc
        else:
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:5])}{more}")

    # Tied copies that are stored twice must at least agree in shape.
    for n in files.tensors:
        alias = encoder_alias(n)
        if alias is not None and alias in expected and files.tensors[n].shape != expected[alias].shape:
            raise CheckpointError(
                f"{path}: tensor {n!r} has shape {list(files.tensors[n].shape)}, "
                f"expected {list(expected[alias].shape)} (tied to {alias})"
            )
    if "lm_head.weight" in files and files.tensors["lm_head.weight"].shape != expected[DEC + ".embed_tokens.weight"].shape:
        raise CheckpointError(f"{path}: lm_head.weight shape does not match the embedding it is tied to")
    for name, src in sources.items():
        info = files.tensors[src]
        if info.shape != expected[name].shape:
            raise CheckpointError(
                f"{info.file.name}: tensor {info.name!r} has shape {list(info.shape)}, expected {list(expected[name].shape)}"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file.name}: tensor {info.name!r} has dtype {info.dtype}, expected one of {FLOAT_DTYPES}")
    return expected, sources


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> DGModel:
    """Load a checkpoint directory. dtype None keeps the checkpoint's float dtype (bf16 for the real model)."""
    path = Path(path)
    cfg = DGConfig.from_pretrained(path)
    files = CheckpointFiles(path)
    device = torch.device(device or "cpu")

    expected, sources = resolve_sources(cfg, files, path)

    load_dtype = dtype
    model = build_meta(cfg)
    for name, spec in expected.items():
        info = files.tensors[sources[name]]
        t = files.get(info.name)
        if check_finite and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{info.file.name}: tensor {info.name!r} contains NaN or Inf values")
        if load_dtype is None:
            load_dtype = t.dtype
        _set_tensor(model, runtime_name(name), t.to(device=device, dtype=load_dtype))
    files.close()
    # non-persistent buffers built on meta: recompute on the device
    for lt, p in cfg.rope.items():
        hd = next(g.head_dim for g in cfg.layers if g.layer_type == lt)
        model._buffers[f"inv_freq_{lt}"] = rope_inv_freq(p, hd).to(device)
    model.eval()
    return model
