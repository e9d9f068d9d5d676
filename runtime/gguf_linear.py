"""Modules that keep GGUF-quantized weights in their GGUF blocks and dequantize per call.

Legend: N rows of x, H hidden, V vocab, E experts, R rows of one weight, C its row length, B bytes per row.

- `GGUFLinear`: y = x @ W.T with W stored as GGUF blocks `raw` [R, B] (optionally times a second-level `.scale`).
- `GGUFEmbedding`: the tied embedding / head in GGUF blocks: row lookup (only the rows asked for are decoded),
  `h @ W.T` (logits) and `p @ W` (self-conditioning soft embedding), decoded in row chunks.
- `GGUFExperts`: routed experts whose weights stay in blocks; only the experts a batch routes to are decoded,
  one at a time. Parts are the fused `gate_up` [E, 2Ie, H] or split `gate` / `up` [E, Ie, H], plus `down`
  [E, H, Ie]; each part is GGUF blocks or a dense tensor, with an optional per-expert scale (GGUF NVFP4 `.scale`).

Decoding: on CUDA with Triton, `dgemma.kernels` (Q8_0, Q5_0, Q4_K, Q5_K, Q6_K, MXFP4, NVFP4); everywhere else
the numpy twin (`dgemma.converter.gguf_quants.dequantize`, bit-identical to gguf-py's, or gguf-py's own for the
types we do not decode). Never more than one row chunk (`CHUNK_ELEMS` values) or one expert is decoded at once.
"""
from __future__ import annotations

import logging

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgemma.converter.gguf_quants import QUANTIZABLE, dequantize as _dequantize_ours

from .errors import FormatError, GenerationError

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
DENSE_TYPES = (QT.F32, QT.F16, QT.BF16)
CHUNK_ELEMS = 1 << 22  # weight values decoded per chunk (16 MiB in fp32)
_KERNEL_TYPES = ("Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "NVFP4")  # dgemma.kernels.gguf_dequant


def can_dequantize(qtype: QT) -> bool:
    """Types the runtime reads: ours plus everything gguf-py can decode (IQ*, Q2_K, Q3_K, Q4_0 ...)."""
    from gguf.quants import _type_traits  # gguf-py's registry of block types it can (de)quantize

    return qtype in QUANTIZABLE or qtype in _type_traits


def row_bytes(qtype: QT, n: int) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if n % bs:
        raise FormatError(f"row length {n} is not a multiple of the {qtype.name} block size {bs}")
    return n // bs * ts


def dequantize_numpy(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """Decode GGUF blocks (uint8, rows in the last axis) to float32 of `shape` on the CPU."""
    if qtype in QUANTIZABLE:
        return _dequantize_ours(raw, qtype, shape)
    from gguf.quants import dequantize as gguf_dequantize

    return np.asarray(gguf_dequantize(np.ascontiguousarray(raw).reshape(-1), qtype), dtype=np.float32).reshape(shape)


def dequantize_rows(raw: torch.Tensor, qtype: QT, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """raw uint8 [..., B] -> [..., cols] in `dtype` on raw's device (Triton on CUDA, the numpy twin otherwise)."""
    shape = (*raw.shape[:-1], cols)
    if raw.device.type == "cuda" and qtype.name in _KERNEL_TYPES:
        from dgemma.kernels.dispatch import gguf_dequantize, use_triton

        if use_triton(raw.device):
            return gguf_dequantize(raw.contiguous(), qtype, shape, dtype)
    arr = raw.detach().cpu().numpy()
    out = torch.from_numpy(dequantize_numpy(arr, qtype, shape))
    return out.to(device=raw.device, dtype=dtype)


def dequantize_rows_torch(raw: torch.Tensor, qtype: QT, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The twin of `dequantize_rows`: always the numpy path (what the CPU runs)."""
    arr = raw.detach().cpu().numpy()
    out = torch.from_numpy(dequantize_numpy(arr, qtype, (*raw.shape[:-1], cols)))
    return out.to(device=raw.device, dtype=dtype)


def _rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK_ELEMS // max(cols, 1))


class GGUFLinear(nn.Module):
    """y = x @ W.T (* scale) for W [out_features, in_features] held as GGUF blocks `raw` [out, B]."""

    def __init__(self, in_features: int, out_features: int, qtype: QT, raw: torch.Tensor,
                 scale: torch.Tensor | None = None):
        super().__init__()
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (out_features, row_bytes(qtype, in_features)):
            raise FormatError(f"GGUFLinear: raw {tuple(raw.shape)} {raw.dtype} does not hold a {qtype.name} "
                              f"[{out_features}, {in_features}] weight")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("raw", raw, persistent=False)
        self.register_buffer("scale", None if scale is None else scale.reshape(1).float(), persistent=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight [out, in] (tests and small layers only)."""
        return dequantize_rows(self.raw, self.qtype, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and self.qtype.name in _KERNEL_TYPES:
            from dgemma.kernels.dispatch import gguf_linear, use_triton

            if use_triton(x.device):
                return gguf_linear(x, self.raw, self.qtype, self.out_features, self.in_features, scale=self.scale)
        x2 = x.reshape(-1, self.in_features)  # [N, in]
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        step = _rows_per_chunk(self.in_features)
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            w = dequantize_rows(self.raw[r0:r1], self.qtype, self.in_features, x.dtype)  # [r, in]
            y[:, r0:r1] = F.linear(x2, w)
        if self.scale is not None:
            y = y * self.scale.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"
        return s + (", scale" if self.scale is not None else "")


class GGUFEmbedding(nn.Module):
    """The tied token embedding [V, H] held as GGUF blocks `raw` [V, B]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: QT, raw: torch.Tensor):
        super().__init__()
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (num_embeddings, row_bytes(qtype, embedding_dim)):
            raise FormatError(f"GGUFEmbedding: raw {tuple(raw.shape)} does not hold a {qtype.name} "
                              f"[{num_embeddings}, {embedding_dim}] embedding")
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, qtype
        self.register_buffer("raw", raw, persistent=False)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ids [...] -> [..., H]; only the requested rows are decoded."""
        flat = ids.reshape(-1).to(self.raw.device)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise GenerationError(f"token id out of range for a vocabulary of {self.num_embeddings}")
        rows = dequantize_rows(self.raw.index_select(0, flat), self.qtype, self.embedding_dim, dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def matmul_t(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] @ W.T -> [..., V] in h's dtype (the tied head)."""
        h2 = h.reshape(-1, self.embedding_dim)
        y = torch.empty(h2.shape[0], self.num_embeddings, dtype=h.dtype, device=h.device)
        step = _rows_per_chunk(self.embedding_dim)
        for r0 in range(0, self.num_embeddings, step):
            r1 = min(self.num_embeddings, r0 + step)
            y[:, r0:r1] = F.linear(h2, dequantize_rows(self.raw[r0:r1], self.qtype, self.embedding_dim, h.dtype))
        return y.reshape(*h.shape[:-1], self.num_embeddings)

    def matmul(self, p: torch.Tensor) -> torch.Tensor:
        """p [..., V] @ W -> [..., H] in p's dtype (the soft embedding of self-conditioning)."""
        p2 = p.reshape(-1, self.num_embeddings)
        y = torch.zeros(p2.shape[0], self.embedding_dim, dtype=p.dtype, device=p.device)
        step = _rows_per_chunk(self.embedding_dim)
        for r0 in range(0, self.num_embeddings, step):
            r1 = min(self.num_embeddings, r0 + step)
            y += p2[:, r0:r1] @ dequantize_rows(self.raw[r0:r1], self.qtype, self.embedding_dim, p.dtype)
        return y.reshape(*p.shape[:-1], self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


class ExpertPart:
    """One expert weight set [E, R, C]: GGUF blocks (`qtype` set, `data` uint8 [E, R, B]) or dense (`qtype`
    None, `data` [E, R, C] in the compute dtype), with an optional per-expert scale [E] (float32)."""

    def __init__(self, rows: int, cols: int, data: torch.Tensor, qtype: QT | None, scale: torch.Tensor | None):
        E = data.shape[0]
        want = (E, rows, cols) if qtype is None else (E, rows, row_bytes(qtype, cols))
        if tuple(data.shape) != want or (qtype is not None and data.dtype != torch.uint8):
            raise FormatError(f"expert weights: {tuple(data.shape)} {data.dtype} do not match {want}")
        if scale is not None and tuple(scale.shape) != (E,):
            raise FormatError(f"expert scale: shape {tuple(scale.shape)}, expected ({E},)")
        self.rows, self.cols, self.data, self.qtype, self.scale = rows, cols, data, qtype, scale


class GGUFExperts(nn.Module):
    """Routed experts with the `Experts` interface; weights decoded per active expert per call."""

    def __init__(self, num_experts: int, down: ExpertPart, gate_up: ExpertPart | None = None,
                 gate: ExpertPart | None = None, up: ExpertPart | None = None):
        super().__init__()
        if (gate_up is None) == (gate is None or up is None):
            raise FormatError("GGUFExperts needs either fused gate_up or both gate and up")
        self.num_experts = num_experts
        self.parts: dict[str, ExpertPart] = {}
        for name, part in (("gate_up", gate_up), ("gate", gate), ("up", up), ("down", down)):
            if part is None:
                continue
            if part.data.shape[0] != num_experts:
                raise FormatError(f"experts {name}: {part.data.shape[0]} experts, expected {num_experts}")
            self.parts[name] = part
            # buffers so that .to(device) moves them; the ExpertPart objects point at the moved tensors
            self.register_buffer(f"{name}_data", part.data, persistent=False)
            self.register_buffer(f"{name}_scale", part.scale, persistent=False)

    def _apply(self, fn, recurse=True):  # keep ExpertPart views in sync with moved buffers
        out = super()._apply(fn, recurse)
        for name, part in self.parts.items():
            part.data = getattr(self, f"{name}_data")
            part.scale = getattr(self, f"{name}_scale")
        return out

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight of part `name` as [R, C] in dtype (scale applied)."""
        p = self.parts[name]
        w = p.data[e].to(dtype) if p.qtype is None else dequantize_rows(p.data[e], p.qtype, p.cols, dtype)
        if p.scale is not None:
            w = w * p.scale[e].to(dtype)
        return w

    def _gate_up(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        if "gate_up" in self.parts:
            return self.expert_weight("gate_up", e, dtype)
        return torch.cat([self.expert_weight("gate", e, dtype), self.expert_weight("up", e, dtype)], dim=0)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, H], idx/w [N, K] -> [N, H], same order of operations as `Experts.forward` per expert."""
        from .model import gelu_tanh

        N, K = idx.shape
        sorted_e, perm = torch.sort(idx.reshape(-1))  # [N*K]
        xs = x[perm // K]
        counts = torch.bincount(sorted_e, minlength=self.num_experts).tolist()
        H = self.parts["down"].rows
        ys = torch.zeros(xs.shape[0], H, dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = xs[start : start + n]
                gate, up = F.linear(xe, self._gate_up(e, x.dtype)).chunk(2, dim=-1)
                ys[start : start + n] = F.linear(gelu_tanh(gate) * up, self.expert_weight("down", e, x.dtype))
            start += n
        ys = ys * w.reshape(-1)[perm, None].to(ys.dtype)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return ys[inv].view(N, K, -1).sum(dim=1).to(x.dtype)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={p.qtype.name if p.qtype is not None else 'dense'}" for n, p in self.parts.items())
        return f"num_experts={self.num_experts}, {parts}"
