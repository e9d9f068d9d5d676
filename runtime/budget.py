"""Load a checkpoint under a device-memory budget: plan first, refuse before loading if it cannot fit, otherwise
load (HF checkpoints mapped lazily) and install expert offload / weight streaming as the plan says."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .errors import DGemmaError, PlanError
from .planner import Plan, plan

log = logging.getLogger("dgemma.budget")


def plan_error(p: Plan) -> PlanError:
    return PlanError(
        f"the model does not fit in {(p.vram_budget or 0) / 2**30:.2f} GiB; the smallest budget that works is "
        f"{p.min_budget / 2**30:.2f} GiB\n{p.format_table()}"
    )


def load_with_budget(
    path: str | Path,
    vram_budget: int | str | float,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    context_length: int = 8192,
    policy: str = "lfu",
    lazy: bool = True,
    host: str = "auto",
):
    """A `DiffusionGemma` whose device memory stays within `vram_budget` (bytes, "16GiB", or GiB as a float).

    Raises PlanError (with the plan table and the smallest workable budget) before reading any weight when the
    budget is below one layer's working set. The plan is attached as `.plan`."""
    from .api import DiffusionGemma, detect_format, load_parts, resolve_device, resolve_dtype
    from .expert_store import enable_expert_offload
    from .weight_stream import enable_weight_streaming

    p_path = Path(path)
    if not p_path.exists():
        raise DGemmaError(f"{p_path}: no such model directory or file")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    pl = plan(p_path, context_length=context_length, vram_budget=vram_budget, dtype=dt, device=dev.type)
    if pl.verdict == "no_fit":
        raise plan_error(pl)
    fmt = detect_format(p_path)
    # offloaded/streamed tensors start in host memory; a lazy HF load maps straight onto the device
    load_dev = dev if (fmt == "hf" and lazy) else torch.device("cpu")
    model, tok = load_parts(p_path, load_dev, dt, fmt=fmt, lazy=lazy)
    E = model.cfg.num_experts
    n = pl.experts_per_layer or E
    if n < E:
        enable_expert_offload(model, n, policy=policy, host=host, device=dev)
    if pl.stream_layers:
        enable_weight_streaming(model, device=dev, host=host)
    if not (fmt == "hf" and lazy):
        model.to(dev)  # what is still registered: the resident part (offloaded/streamed tensors are not)
    dg = DiffusionGemma(model, tok, p_path, time.perf_counter() - t0)
    dg.plan = pl
    log.info("%s", pl.verdict_text())
    return dg


__all__ = ["load_with_budget", "plan_error"]
