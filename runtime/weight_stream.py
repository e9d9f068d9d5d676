"""Streaming of the non-expert layer weights when even they do not fit: one layer ahead, released after use.

Streamed: the matrices of each layer's attention projections, dense MLP and router projection (whatever module
class holds them: `Linear`, `NVFP4Linear`, `GGUFLinear`). Kept resident: norms, layer scalars, router scale
vectors (small, and some are read outside the layer's forward), the embedding, self-conditioning and the experts
(handled by `expert_store`).

Mechanics: the streamed tensors are taken out of their modules' parameter/buffer tables into host memory (pinned
on CUDA), so `model.to()` and `model.parameters()` no longer see them; while a layer is released its modules hold
`None` there, so any use of a released layer fails loudly. A forward pre-hook on layer i makes layer i resident
(waiting for its prefetch) and starts copying layer i+1 (wrapping to layer 0 for the next pass); a forward hook
releases layer i. At most two layers are resident at any time. On CUDA the copies run on a side stream; on CPU
the "device" copy is a separate buffer made synchronously, which is what the tests check.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, DGemmaError

log = logging.getLogger("dgemma.weight_stream")

STREAMED_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "router.proj")


@dataclass
class StreamStats:
    loads: int = 0  # layer copies made
    bytes_moved: int = 0
    max_resident_layers: int = 0
    copy_s: float = 0.0  # CPU: synchronous copy time; CUDA: copy-stream time (from events)
    stall_s: float = 0.0  # compute waiting for a layer's weights


@dataclass
class _Entry:
    module: nn.Module
    name: str
    host: torch.Tensor
    dtype: torch.dtype  # device dtype (floating parameters follow the model's compute dtype)
    is_param: bool


class WeightStreamer:
    """Owns the streamed tensors of every layer; see the module docstring."""

    def __init__(self, model: nn.Module, device: torch.device, host: str = "auto", check_finite: bool = False):
        self.model, self.device, self.check_finite = model, device, check_finite
        self.layers = list(model.layers)
        self.stats = StreamStats()
        pin = host == "pinned" or (host == "auto" and device.type == "cuda")
        self.entries: list[list[_Entry]] = []
        for layer in self.layers:
            ents = []
            for path in STREAMED_MODULES:
                try:
                    mod = layer.get_submodule(path)
                except AttributeError:
                    continue  # v_proj on full-attention layers
                if mod is None:
                    continue
                for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
                    for name, t in list(table.items()):
                        if t is None:
                            continue
                        h = t.detach()
                        h = h if h.device.type == "cpu" else h.to("cpu")
                        if pin and not h.is_pinned():
                            h = h.pin_memory()
                        dt = model.dtype if (is_param and t.is_floating_point()) else t.dtype
                        del table[name]
                        mod.__dict__[name] = None  # released: a use before `_load` fails loudly
                        ents.append(_Entry(mod, name, h, dt, is_param))
            self.entries.append(ents)
        self.layer_nbytes = [sum(e.host.numel() * torch.empty((), dtype=e.dtype).element_size() for e in ents)
                             for ents in self.entries]
        self._resident: dict[int, dict[str, Any]] = {}  # layer -> {"tensors": [...], "ready": event|None}
        self._checked = [False] * len(self.layers)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: list[tuple[str, Any, Any]] = []
        self._handles = []
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(layer.register_forward_hook(self._make_post(i)))

    # ---- residency ------------------------------------------------------------------------------------------
    def _copy_layer(self, i: int) -> None:
        """Start (CUDA) or make (CPU) the device copy of layer i."""
        if i in self._resident:
            return
        cuda = self.copy_stream is not None
        tensors = []
        t0 = time.perf_counter()
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                start.record(self.copy_stream)
                for e in self.entries[i]:
                    tensors.append(e.host.to(device=self.device, dtype=e.dtype, non_blocking=True))
                ready = torch.cuda.Event(enable_timing=True)
                ready.record(self.copy_stream)
            self._pending.append(("copy", start, ready))
        else:
            for e in self.entries[i]:
                d = torch.empty(e.host.shape, dtype=e.dtype, device=self.device)
                tensors.append(d.copy_(e.host))  # a separate buffer: the CPU stand-in for a device copy
            ready = None
            self.stats.copy_s += time.perf_counter() - t0
        if self.check_finite and not self._checked[i]:
            for e, t in zip(self.entries[i], tensors):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"layer {i}: {e.name} of a streamed module contains NaN or Inf values")
            self._checked[i] = True
        self._resident[i] = {"tensors": tensors, "ready": ready}
        self.stats.loads += 1
        self.stats.bytes_moved += self.layer_nbytes[i]
        self.stats.max_resident_layers = max(self.stats.max_resident_layers, len(self._resident))

    def _release(self, i: int) -> None:
        self._resident.pop(i, None)
        for e in self.entries[i]:
            if e.module.__dict__.get(e.name) is not None:
                e.module.__dict__[e.name] = None

    def _make_pre(self, i: int):
        def pre(module: nn.Module, args: Any) -> None:
            nxt = (i + 1) % len(self.layers)
            for j in list(self._resident):
                if j not in (i, nxt):
                    self._release(j)  # a prefetch that was not used (the pass did not go on to it)
            if i not in self._resident:
                t0 = time.perf_counter()
                self._copy_layer(i)
                if self.copy_stream is None:
                    self.stats.stall_s += time.perf_counter() - t0
            r = self._resident[i]
            if r["ready"] is not None:
                main = torch.cuda.current_stream(self.device)
                before = torch.cuda.Event(enable_timing=True)
                before.record(main)
                main.wait_event(r["ready"])
                self._pending.append(("stall", before, r["ready"]))
                for t in r["tensors"]:
                    t.record_stream(main)  # allocated on the copy stream, used on this one
                r["ready"] = None
            for e, t in zip(self.entries[i], r["tensors"]):
                e.module.__dict__[e.name] = t
            if nxt != i:
                self._copy_layer(nxt)  # prefetch one ahead (wraps to layer 0 for the next pass)

        return pre

    def _make_post(self, i: int):
        def post(module: nn.Module, args: Any, output: Any) -> None:
            self._release(i)

        return post

    # ---- stats / teardown -----------------------------------------------------------------------------------
    def resident_layers(self) -> list[int]:
        return sorted(self._resident)

    def resolve_timings(self) -> StreamStats:
        if self._pending:
            torch.cuda.synchronize(self.device)
            for kind, a, b in self._pending:
                ms = a.elapsed_time(b)
                if kind == "copy":
                    self.stats.copy_s += ms / 1e3
                else:
                    self.stats.stall_s += max(0.0, ms) / 1e3
            self._pending.clear()
        return self.stats

    def close(self) -> None:
        """Put every streamed tensor back into its module on the device (streaming off)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._resident.clear()
        for ents in self.entries:
            for e in ents:
                e.module.__dict__.pop(e.name, None)
                t = e.host.to(device=self.device, dtype=e.dtype)
                if e.is_param:
                    e.module._parameters[e.name] = nn.Parameter(t, requires_grad=False)
                else:
                    e.module._buffers[e.name] = t
        self.model.weight_streamer = None


def enable_weight_streaming(model: nn.Module, device: torch.device | str | None = None, host: str = "auto",
                            check_finite: bool = False) -> WeightStreamer:
    """Stream the non-expert layer matrices of `model` to `device` (default: the model's) one layer ahead.
    Returns the streamer (also `model.weight_streamer`); its `stats` count copies, bytes and resident layers."""
    if getattr(model, "weight_streamer", None) is not None:
        raise DGemmaError("weight streaming is already enabled on this model")
    if host not in ("auto", "pinned", "keep"):
        raise DGemmaError(f"host must be auto, pinned or keep, got {host!r}")
    dev = torch.device(device) if device is not None else model.device
    s = WeightStreamer(model, dev, host, check_finite)
    model.weight_streamer = s
    log.info("weight streaming: %d layers, %.1f MB per layer on average, at most 2 resident on %s",
             len(s.layers), sum(s.layer_nbytes) / max(1, len(s.layers)) / 1e6, dev)
    return s


__all__ = ["WeightStreamer", "StreamStats", "enable_weight_streaming", "STREAMED_MODULES"]
