"""NVFP4 weight modules for the runtime: weights stay packed (4.5 bits/weight); every call dequantizes on the fly.

Legend: N out features, K in features, E experts, I expert intermediate, H hidden, T tokens, k top-k.

- `NVFP4Linear` replaces `model.Linear`: buffers `weight` uint8 [N, K/2] (E2M1 codes, even k in the low nibble),
  `weight_scale` float8_e4m3fn [N, K/16], `weight_scale_2` float32 0-d and optionally `input_scale` float32 0-d
  (the ModelOpt names, so a state dict reads like the checkpoint).
- `NVFP4Experts` replaces `model.Experts`: stacked experts `gate_up_proj` [E, 2I, ...] (gate rows first) and
  `down_proj` [E, H, ...]; each projection is either packed (`<p>` uint8, `<p>_scale` e4m3, `<p>_scale_2`
  float32 [E] (gate_up: [E, 2] when a checkpoint gives gate and up different global scales), optional
  `<p>_input_scale`) or dense (a float parameter `<p>`, as in `Experts`), so partially quantized checkpoints load.

Matmuls go through `dgemma.kernels.dispatch` (Triton W4A16 kernels on CUDA, their torch twins elsewhere; the
twins dequantize a bounded number of rows / one expert at a time). The activation scales are kept for export and
inspection only: this runtime computes W4A16 (activations are not quantized).

The packed / scale / global-scale buffers keep their dtypes when the module is cast (`.to(bf16)`, `.float()`):
casting an fp32 global scale to bf16 would silently change every weight.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch as _kd
from ..kernels.fused_moe import NVFP4Experts as _KernelExperts
from .errors import CheckpointError

log = logging.getLogger(__name__)

BLOCK = 16


def _check_packed(name: str, w: torch.Tensor, s: torch.Tensor, lead: tuple[int, ...]) -> tuple[int, int]:
    """Validate packed weight [*lead, N, K/2] and block scales [*lead, N, K/16]; returns (N, K)."""
    if w.dtype != torch.uint8 or s.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"{name}: NVFP4 weight must be uint8 and its scale float8_e4m3fn, got {w.dtype} / {s.dtype}")
    if w.dim() != len(lead) + 2 or tuple(w.shape[: len(lead)]) != lead:
        raise CheckpointError(f"{name}: packed weight has shape {tuple(w.shape)}, expected leading dims {lead}")
    n, k = w.shape[-2], w.shape[-1] * 2
    if tuple(s.shape) != (*w.shape[:-1], k // BLOCK) or k % BLOCK:
        raise CheckpointError(f"{name}: weight_scale has shape {tuple(s.shape)}, expected {(*w.shape[:-1], k // BLOCK)} "
                              f"for packed weight {tuple(w.shape)}")
    return n, k


def _check_global(name: str, g: torch.Tensor, shapes: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    if g.dtype != torch.float32 or tuple(g.shape) not in shapes:
        raise CheckpointError(f"{name}: expected float32 of shape {' or '.join(map(str, shapes))}, "
                              f"got {g.dtype} {tuple(g.shape)}")
    if g.device.type != "meta" and not bool((torch.isfinite(g) & (g > 0)).all()):
        raise CheckpointError(f"{name}: global scales must be finite and positive")
    return g


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_BYTE_LUT: dict[torch.device, torch.Tensor] = {}


def _byte_lut(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: a packed byte -> (value of its low nibble, value of its high nibble)."""
    lut = _BYTE_LUT.get(device)
    if lut is None:
        v = torch.tensor(_E2M1, dtype=torch.float32)
        lut = _BYTE_LUT[device] = torch.stack([v.repeat(16), v.repeat_interleave(16)], dim=-1).to(device)
    return lut


def dequantize_packed(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K/2] packed + [..., N, K/16] e4m3 (+ global) -> [..., N, K]: (e2m1 * scale) * global in fp32.

    Bit-identical to `kernels.nvfp4_gemm.dequantize_nvfp4` (same products in the same order; e2m1 * scale is exact)
    but one byte-indexed lookup instead of unpacking nibbles to int64 codes: about 4x faster on CPU, which is
    what per-expert dequantization in the torch paths (runtime loop, calibration) spends its time on."""
    lead, half = weight.shape[:-1], weight.shape[-1]
    vals = _byte_lut(weight.device)[weight.long()].view(*lead, half * 2 // BLOCK, BLOCK)
    out = (vals * weight_scale.float().unsqueeze(-1)).view(*lead, half * 2)
    if weight_scale_2 is not None:
        g = weight_scale_2.float()
        out = out * (g.reshape(()) if g.numel() == 1 else g.reshape(*g.shape, 1, 1))
    return out.to(dtype)


class _PackedModule(nn.Module):
    """Buffers keep their dtype under module casts; only their device follows (parameters cast normally)."""

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        kept = {k: b for k, b in self._buffers.items() if b is not None}
        for k in kept:
            self._buffers[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for k, b in kept.items():
                moved = fn(b)
                self._buffers[k] = moved if moved.dtype == b.dtype else b.to(device=moved.device)
        return self


class NVFP4Linear(_PackedModule):
    """y = x @ W.T with W = E2M1(weight) * weight_scale (per 16 inputs) * weight_scale_2."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                 input_scale: torch.Tensor | None = None, name: str = "NVFP4Linear"):
        super().__init__()
        self.out_features, self.in_features = _check_packed(name, weight, weight_scale, ())
        _check_global(f"{name}.weight_scale_2", weight_scale_2, ((),))
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_scale_2", weight_scale_2)
        if input_scale is not None:
            _check_global(f"{name}.input_scale", input_scale, ((),))
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def from_nvfp4(cls, q, input_scale: torch.Tensor | float | None = None, name: str = "NVFP4Linear") -> NVFP4Linear:
        """From a `converter.nvfp4.NVFP4Tensor` (2-D)."""
        inp = None if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32).reshape(())
        return cls(q.weight, q.weight_scale, q.weight_scale_2.reshape(()).float(), inp, name=name)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K] (the whole matrix: for tests and tools, not for inference)."""
        return dequantize_packed(self.weight, self.weight_scale, self.weight_scale_2, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kd.nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nvfp4"


class NVFP4Experts(_PackedModule):
    """Routed experts with NVFP4 (or dense) stacks; same math and order of operations as `model.Experts`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self._packed: dict[str, bool] = {}

    # ---- construction --------------------------------------------------------------------------------------
    def _rows(self, proj: str) -> tuple[int, int]:
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        return (2 * I, H) if proj == "gate_up_proj" else (H, I)

    def set_packed(self, proj: str, weight: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                   input_scale: torch.Tensor | None = None) -> None:
        """proj 'gate_up_proj' | 'down_proj': weight uint8 [E, N, K/2], scale e4m3 [E, N, K/16], scale_2 fp32 [E]
        (gate_up also [E, 2]: gate rows use [:, 0], up rows [:, 1]); input_scale fp32 0-d or [E] (unused here)."""
        E = self.num_experts
        n, k = _check_packed(proj, weight, scale, (E,))
        if (n, k) != self._rows(proj):
            raise CheckpointError(f"{proj}: NVFP4 expert weight is [{E}, {n}, {k}], expected [{E}, *{self._rows(proj)}]")
        shapes = ((E,), (E, 2)) if proj == "gate_up_proj" else ((E,),)
        _check_global(f"{proj}_scale_2", scale_2, shapes)
        if input_scale is not None:
            _check_global(f"{proj}_input_scale", input_scale, ((), (E,)))
        self._drop(proj)
        self.register_buffer(proj, weight)
        self.register_buffer(f"{proj}_scale", scale)
        self.register_buffer(f"{proj}_scale_2", scale_2)
        self.register_buffer(f"{proj}_input_scale", input_scale)
        self._packed[proj] = True

    def set_dense(self, proj: str, weight: torch.Tensor) -> None:
        """A projection kept in a float dtype: weight [E, N, K] as in `model.Experts`."""
        E = self.num_experts
        if not weight.is_floating_point() or tuple(weight.shape) != (E, *self._rows(proj)):
            raise CheckpointError(f"{proj}: dense expert weight is {weight.dtype} {tuple(weight.shape)}, "
                                  f"expected a float tensor of shape {(E, *self._rows(proj))}")
        self._drop(proj)
        self.register_parameter(proj, nn.Parameter(weight, requires_grad=False))
        self._packed[proj] = False

    def _drop(self, proj: str) -> None:
        for n in (proj, f"{proj}_scale", f"{proj}_scale_2", f"{proj}_input_scale"):
            self._buffers.pop(n, None)
            self._parameters.pop(n, None)

    def is_packed(self, proj: str) -> bool:
        if proj not in self._packed:
            raise CheckpointError(f"NVFP4Experts: {proj} was never set")
        return self._packed[proj]

    # ---- weights -------------------------------------------------------------------------------------------
    def expert_weight(self, proj: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert e's dense weight [N, K] (one expert at a time: never the whole stack)."""
        if not self.is_packed(proj):
            return getattr(self, proj)[e].to(dtype)
        w, s, g = getattr(self, proj)[e], getattr(self, f"{proj}_scale")[e], getattr(self, f"{proj}_scale_2")[e]
        if g.dim() == 0:
            return dequantize_packed(w, s, g, dtype=dtype)
        d = dequantize_packed(w, s, None)  # [2I, H] block-scaled only
        half = d.shape[0] // 2
        d[:half] *= g[0]
        d[half:] *= g[1]
        return d.to(dtype)

    def dequantize(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole dense stack [E, N, K] (tests and tools only)."""
        return torch.stack([self.expert_weight(proj, e, dtype) for e in range(self.num_experts)])

    def _kernel_experts(self) -> _KernelExperts | None:
        """The kernels' view when both projections are packed with one global per expert, else None."""
        if not (self.is_packed("gate_up_proj") and self.is_packed("down_proj")) or self.gate_up_proj_scale_2.dim() != 1:
            return None
        return _KernelExperts(self.gate_up_proj, self.gate_up_proj_scale, self.gate_up_proj_scale_2,
                              self.down_proj, self.down_proj_scale, self.down_proj_scale_2)

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H], idx/w [T, k] (w includes the per-expert scale) -> [T, H] in x's dtype.

        CUDA with both stacks packed: the fused Triton MoE kernel (`kernels.dispatch.fused_moe`). Elsewhere the
        torch loop below (tested against the kernels' own twin `fused_moe_torch`, but with the faster dequant)."""
        if x.is_cuda:
            kx = self._kernel_experts()
            if kx is not None:
                return _kd.fused_moe(x, w, idx, kx)
        return self.forward_loop(x, idx, w)

    def forward_loop(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Torch path for any mix of packed/dense projections: pairs sorted by expert, one expert's weights
        dequantized at a time, fp32 matmuls, each step stored in x's dtype as `Experts.forward` does."""
        T, k = idx.shape
        sorted_e, perm = torch.sort(idx.reshape(-1))  # [T*k]
        xs = x[perm // k]
        counts = torch.bincount(sorted_e, minlength=self.num_experts).tolist()
        ys = torch.empty(xs.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
        I = self.intermediate_size
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            rows = slice(start, start + c)
            gu = xs[rows].float() @ self.expert_weight("gate_up_proj", e).t()  # [c, 2I]
            a = (F.gelu(gu[:, :I], approximate="tanh") * gu[:, I:]).to(x.dtype)
            ys[rows] = (a.float() @ self.expert_weight("down_proj", e).t()).to(x.dtype)
            start += c
        ys = ys * w.reshape(-1)[perm, None].to(ys.dtype)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return ys[inv].view(T, k, -1).sum(dim=1).to(x.dtype)

    def extra_repr(self) -> str:
        kinds = {p: ("nvfp4" if v else "dense") for p, v in self._packed.items()}
        return f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, {kinds}"


def packed_nbytes(module: nn.Module) -> int:
    """Bytes held by a module tree's buffers and parameters (to check that weights stayed packed)."""
    return sum(t.numel() * t.element_size() for t in list(module.buffers()) + list(module.parameters()))


__all__ = ["NVFP4Linear", "NVFP4Experts", "packed_nbytes"]
