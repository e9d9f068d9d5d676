"""GGUF block dequantization: Triton kernels for Q8_0, Q5_0, Q4_K, Q5_K, Q6_K, MXFP4 and NVFP4, gguf-py as twin.

A GGUF weight with numpy/torch shape [..., n] (ggml ne0 = n, fastest) is stored as consecutive quant blocks of
``block_elems`` values per ``block_bytes`` bytes along the last dim (gguf.md §5; gguf-py 0.19.0
``GGML_QUANT_SIZES``). :func:`gguf_dequantize` decodes a byte tensor to a dense tensor (used on row chunks as a
scratch tile by :func:`dgemma.kernels.dispatch.gguf_linear`); :func:`gguf_dequantize_torch` is the twin
(``gguf.quants.dequantize`` on the CPU, the format's reference implementation).

GGUF NVFP4 has no global scale inside the blocks: a separate ``<name>.scale`` tensor multiplies the result
(gguf.md §5.1) and is the caller's business.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ._common import HAVE_TRITON, check, require_launchable

if HAVE_TRITON:
    from . import _gguf_dequant_triton as _k

log = logging.getLogger(__name__)

# ggml type id -> (name, elements per block, bytes per block, kernel attribute, blocks per program)
_TYPES: dict[int, tuple[str, int, int, str, int]] = {
    8: ("Q8_0", 32, 34, "dequant_q8_0_kernel", 32),
    6: ("Q5_0", 32, 22, "dequant_q5_0_kernel", 32),
    12: ("Q4_K", 256, 144, "dequant_q4_k_kernel", 4),
    13: ("Q5_K", 256, 176, "dequant_q5_k_kernel", 4),
    14: ("Q6_K", 256, 210, "dequant_q6_k_kernel", 4),
    39: ("MXFP4", 32, 17, "dequant_mxfp4_kernel", 32),
    40: ("NVFP4", 64, 36, "dequant_nvfp4_kernel", 16),
}
_BY_NAME = {v[0]: k for k, v in _TYPES.items()}

SUPPORTED_TYPES = tuple(v[0] for v in _TYPES.values())


def qtype_id(qtype: Any) -> int:
    """Accept a ggml type id, a name ("Q4_K") or a ``gguf.GGMLQuantizationType``; return the id."""
    if isinstance(qtype, str):
        check(qtype.upper() in _BY_NAME, f"GGUF type {qtype!r} not supported (supported: {SUPPORTED_TYPES})")
        return _BY_NAME[qtype.upper()]
    tid = int(qtype)
    check(tid in _TYPES, f"GGUF type id {tid} not supported (supported: {SUPPORTED_TYPES})")
    return tid


def block_layout(qtype: Any) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    _, qk, nbytes, _, _ = _TYPES[qtype_id(qtype)]
    return qk, nbytes


def _check(raw: torch.Tensor, qtype: Any, shape: tuple[int, ...]) -> tuple[int, int, int]:
    tid = qtype_id(qtype)
    name, qk, nbytes, _, _ = _TYPES[tid]
    check(raw.dtype == torch.uint8, f"raw: expected uint8 bytes, got {raw.dtype}")
    check(len(shape) >= 1 and all(int(s) >= 0 for s in shape), f"shape {shape} invalid")
    check(shape[-1] % qk == 0, f"{name}: last dim {shape[-1]} is not a multiple of the block size {qk}")
    n_el = int(np.prod(shape)) if shape else 1
    n_blocks = n_el // qk
    check(raw.numel() == n_blocks * nbytes,
          f"{name}: {raw.numel()} bytes for shape {tuple(shape)}, expected {n_blocks * nbytes}")  # fmt: skip
    return tid, n_blocks, n_el


def gguf_dequantize_torch(
    raw: torch.Tensor, qtype: Any, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Twin: gguf-py's reference dequantization (numpy, on the CPU), returned on raw's device in ``dtype``."""
    tid, _, _ = _check(raw, qtype, tuple(shape))
    from gguf.quants import dequantize  # gguf is a hard dependency of dgemma; imported lazily (numpy-heavy)
    from gguf import GGMLQuantizationType

    arr = raw.detach().reshape(-1).cpu().numpy()
    vals = dequantize(arr, GGMLQuantizationType(tid))
    return torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32)).reshape(shape).to(raw.device, dtype)


def gguf_dequantize(
    raw: torch.Tensor,
    qtype: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode GGUF blocks (``raw`` uint8, contiguous) into a ``shape`` tensor of ``dtype`` on the GPU.

    ``out`` (contiguous, numel = prod(shape), dtype) lets callers reuse a scratch buffer across row chunks.
    Values are computed in fp32 with gguf-py's operation order, then cast once.
    """
    tid, n_blocks, n_el = _check(raw, qtype, tuple(shape))
    name, qk, _, attr, blocks = _TYPES[tid]
    kernel = getattr(_k, attr) if HAVE_TRITON else None
    require_launchable(kernel, raw.device)
    check(raw.is_contiguous(), "raw: bytes must be contiguous")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=raw.device)
    else:
        check(out.is_contiguous() and out.numel() == n_el and out.dtype == dtype and out.device == raw.device,
              f"out: expected a contiguous {dtype} buffer of {n_el} elements on {raw.device}")  # fmt: skip
        out = out.view(shape)
    if n_blocks:
        kernel[(-(-n_blocks // blocks),)](raw, out, n_blocks, BLOCKS=blocks, num_warps=4)
    return out


def aot_specs() -> list[Any]:
    """AOT specs (dgemma.kernels.aot) for each dequant kernel, bf16 output, at an expert-sized tensor."""
    from .aot import KernelSpec, Ptr

    specs = []
    for tid, (name, qk, _, attr, blocks) in _TYPES.items():
        n_blocks = 128 * 1408 * 2816 // qk  # gate_up experts of one layer
        specs.append(KernelSpec(
            f"gguf_dequant[{name}]", "_gguf_dequant_triton", attr,
            dict(raw_ptr=Ptr("u8"), out_ptr=Ptr("bf16"), n_blocks=n_blocks, BLOCKS=blocks), 4, 1,
            expect_wide_loads=False,
            notes="GGUF blocks are 2-byte aligned: bytewise gathers by design; stores are contiguous",
        ))  # fmt: skip
    return specs
