"""Shared helpers for dgemma.kernels: optional Triton import, input checks, launch checks.

Triton is optional: on a machine without it (or without a GPU) every op still works through its torch twin.
Nothing here reads environment variables or changes global state; whether a kernel runs in Triton's CPU
interpreter is decided by Triton itself when the kernel module is imported (``TRITON_INTERPRET=1`` set by the
*caller's* process, e.g. the test suite's subprocess), and we only observe it.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from dgemma.runtime.errors import DGemmaError

log = logging.getLogger(__name__)

try:  # Triton is an optional dependency (Linux x86-64 only).
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception as exc:  # ImportError, or a broken install raising something else at import
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAVE_TRITON = False
    log.debug("triton unavailable (%s); kernels fall back to their torch twins", exc)


class KernelInputError(DGemmaError, ValueError):
    """A kernel was called with tensors of the wrong shape, dtype, layout or device."""


class KernelUnavailableError(DGemmaError, RuntimeError):
    """A Triton kernel was requested where it cannot run (no Triton, or tensors not on a CUDA device)."""


ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(cond: bool, msg: str) -> None:
    """Raise KernelInputError(msg) unless cond; used by every public wrapper."""
    if not cond:
        raise KernelInputError(msg)


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    check(t.dtype in allowed, f"{name}: dtype {t.dtype} not supported (expected one of {list(allowed)})")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    check(tuple(t.shape) == tuple(shape), f"{name}: shape {tuple(t.shape)} != expected {tuple(shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    bad = {n: str(d) for n, d in devs.items() if d != first}
    check(not bad, f"all tensors must be on one device; got {({n: str(d) for n, d in devs.items()})}")
    return first


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated while Triton's CPU interpreter was active in this process."""
    if not HAVE_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - very old Triton
        return False
    return isinstance(kernel, InterpretedFunction)


def require_launchable(kernel: Any, device: torch.device) -> None:
    """Refuse to launch a Triton kernel on tensors it cannot address (CPU tensors without the interpreter)."""
    if not HAVE_TRITON:
        raise KernelUnavailableError("triton is not installed; use the *_torch twin (dgemma.kernels.dispatch picks it)")
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise KernelUnavailableError("Triton interpreter mode needs CPU tensors")
        return
    if device.type != "cuda":
        raise KernelUnavailableError(
            f"Triton kernels need CUDA tensors, got {device}; use the *_torch twin (dgemma.kernels.dispatch picks it)"
        )


def tl_dtype(dtype: torch.dtype) -> Any:
    """torch dtype -> triton.language dtype for the dot-operand constexpr."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def pick_block_k(k: int, candidates: tuple[int, ...] = (128, 64, 32, 16)) -> int:
    """Largest candidate dividing k, so the K loop needs no masks (k is a multiple of 16 in every format here)."""
    for c in candidates:
        if k % c == 0:
            return c
    return candidates[-1]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
