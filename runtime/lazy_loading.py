"""Fast start: map an HF safetensors checkpoint and materialize the large tensors on first use.

`load_model_lazy(path, device, dtype)` validates the checkpoint exactly as `loading.load_model` does (same
config, same expected tensor list, same missing/unexpected/shape/dtype errors), then:
- maps every shard once (`numpy.memmap`, copy-on-write) and views each tensor's bytes in place: nothing is read;
- materializes at once only what the model's properties and small ops need: the embedding (it defines
  `model.device` / `model.dtype`) and every tensor with fewer than two dims (norms, scalars, router scales);
- leaves the matrices (attention, MLP, router, experts, self-conditioning) as mapped views and registers a
  forward pre-hook on each owning module that converts/moves them (and checks them for NaN/Inf) the first time
  the module runs. On CPU with the checkpoint's own dtype the mapped view is kept as is (zero copy; the OS pages
  it in).
Expert offload (`expert_store`) and weight streaming (`weight_stream`) take these mapped views as their host
copies, so offloaded experts stay memory-mapped in the file; a pre-hook whose tensor was taken skips it.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import DGConfig
from .errors import CheckpointError, FormatError
from .hf_names import is_vision
from .loading import _set_tensor, resolve_sources, runtime_name
from .model import DGModel, build_meta, rope_inv_freq
from .safetensors_io import CheckpointFiles, TensorInfo

log = logging.getLogger("dgemma.lazy_loading")


class _Maps:
    """One copy-on-write memory map per shard; tensors are views into it."""

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[torch.Tensor, dict[str, Any], int]] = {}

    def _open(self, f: Path) -> tuple[torch.Tensor, dict[str, Any], int]:
        if f not in self._maps:
            try:
                mm = np.memmap(f, dtype=np.uint8, mode="c")
            except (OSError, ValueError) as e:
                raise FormatError(f"{f}: cannot memory-map: {e}") from None
            (n,) = struct.unpack("<Q", bytes(mm[:8]))
            header = json.loads(bytes(mm[8 : 8 + n]).decode("utf-8"))  # already validated by read_header
            self._maps[f] = (torch.from_numpy(mm), header, 8 + n)
        return self._maps[f]

    def view(self, info: TensorInfo) -> torch.Tensor:
        raw, header, base = self._open(info.file)
        start, end = header[info.name]["data_offsets"]
        b = raw[base + start : base + end]
        try:
            t = b.view(info.torch_dtype)
        except RuntimeError:
            t = b.clone().view(info.torch_dtype)  # misaligned for its dtype: one copy of this tensor
        return t.view(info.shape)


def _sources(cfg: DGConfig, files: CheckpointFiles, path: Path) -> dict[str, str]:
    """Expected tensor -> stored name, with the eager loader's checks and messages."""
    return resolve_sources(cfg, files, path)[1]


def _materialize(t: torch.Tensor, device: torch.device, dtype: torch.dtype, check_finite: bool,
                 where: str) -> torch.Tensor:
    if check_finite and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where} contains NaN or Inf values")
    if t.device == device and t.dtype == dtype:
        return t  # mapped view kept as is
    return t.to(device=device, dtype=dtype)


def _lazy_hook(module: nn.Module, pending: list[tuple[str, torch.Tensor, str]], device: torch.device,
               dtype: torch.dtype, check_finite: bool):
    state: dict[str, Any] = {}

    def hook(mod: nn.Module, args: Any) -> None:
        for attr, src, where in pending:
            cur = mod._parameters.get(attr)
            if cur is None or cur.data_ptr() != src.data_ptr():
                continue  # taken by expert offload / weight streaming, or replaced by the user
            _set_tensor(mod, attr, _materialize(src, device, dtype, check_finite, where))
        pending.clear()
        state["handle"].remove()

    state["handle"] = module.register_forward_pre_hook(hook)
    return state["handle"]


def load_model_lazy(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> DGModel:
    """Map the checkpoint and return a model whose matrices materialize on first use (see the module docstring).
    `dtype` None keeps the checkpoint's dtype (as `load_model`); `check_finite` runs when a tensor materializes."""
    path = Path(path)
    cfg = DGConfig.from_pretrained(path)
    files = CheckpointFiles(path)
    device = torch.device(device or "cpu")
    sources = _sources(cfg, files, path)
    if any(is_vision(n) for n in files.tensors):
        log.info("skipping vision-tower tensors (dgemma is text-only)")
    maps = _Maps()
    first = next(iter(sources))
    load_dtype = dtype or files.tensors[sources[first]].torch_dtype
    model = build_meta(cfg)
    pending: dict[str, list[tuple[str, torch.Tensor, str]]] = {}
    n_lazy = 0
    for name, src in sources.items():
        info = files.tensors[src]
        t = maps.view(info)
        rt = runtime_name(name)
        where = f"{info.file.name}: tensor {info.name!r}"
        if t.dim() < 2 or rt == "embed_tokens.weight":
            _set_tensor(model, rt, _materialize(t, device, load_dtype, check_finite, where))
            continue
        mod_name, _, attr = rt.rpartition(".")
        # placeholder: the mapped view itself (file dtype, CPU) until the owning module first runs
        _set_tensor(model, rt, t)
        if device.type == "cpu" and t.dtype == load_dtype and not check_finite:
            continue  # zero-copy and nothing to check: the view is the final tensor
        pending.setdefault(mod_name, []).append((attr, t, where))
        n_lazy += 1
    for mod_name, items in pending.items():
        _lazy_hook(model.get_submodule(mod_name), items, device, load_dtype, check_finite)
    for lt, p in cfg.rope.items():
        hd = next(g.head_dim for g in cfg.layers if g.layer_type == lt)
        model._buffers[f"inv_freq_{lt}"] = rope_inv_freq(p, hd).to(device)
    model.eval()
    log.info("mapped %s: %d tensors, %d materialize on first use", path, len(sources), n_lazy)
    return model


def pending_tensors(model: nn.Module) -> int:
    """How many modules still wait for their first forward to materialize (for tests and timings)."""
    return sum(1 for m in model.modules() for h in m._forward_pre_hooks.values()
               if getattr(h, "__name__", "") == "hook" and getattr(h, "__qualname__", "").startswith("_lazy_hook"))


__all__ = ["load_model_lazy", "pending_tensors"]
