"""dgemma: run Google's DiffusionGemma on one consumer GPU.

The public library API lives here; the implementation is in `dgemma.runtime`,
`dgemma.converter` and `dgemma.kernels`.
"""
from __future__ import annotations

__version__ = "0.1.0"
