"""Routed experts under a memory budget: host-resident experts, a per-layer cache of resident slots on the
compute device, and per-step statistics.

Legend: E experts, S resident slots per layer, N tokens, K top-k, P = N*K token-expert pairs, H hidden.

`enable_expert_offload(model, experts_per_layer=S)` replaces every layer's experts module (`model.Experts`,
`NVFP4Experts` or `GGUFExperts`) by an `OffloadedExperts`:
- the expert-indexed tensors (leading dim E) move to host memory: pinned when the device is CUDA, otherwise left
  where they are (a memory-mapped checkpoint stays memory-mapped, see `lazy_loading`);
- a module of the same class with S experts ("slots") lives on the device; `slot_expert[s]` says which expert a
  slot holds;
- each call, once the router has chosen, the call is scheduled: resident experts that are needed (hits) run
  first, then the missing experts (misses) are copied into slots whose experts are done or not needed, in
  batches, and run. On CUDA the copies go on a side stream from pinned memory and overlap the computation of
  the previous batch (and the dense MLP, which the layer runs after the router: `_feed_forward_offloaded`);
  on CPU the "device" is a separate resident buffer and copies are synchronous.
- eviction policy: "lfu" keeps the S experts with the highest decayed token counts (score = decay * score +
  tokens routed this call) among the resident and needed ones; "lru" evicts the least recently used slot.
  A 256-token canvas touches nearly every expert every step (performance.md section 1), so recency says little
  and frequency says which experts carry the most tokens.

Exactness: every expert is computed with the same inputs, in the same order, as the resident module computes it,
and the per-pair outputs are combined by the same reduction, so results are bit-identical to the resident model
for every budget (tested on CPU: `model.Experts` through its own grouped GEMM, other classes through their forward
with one pair per row). Statistics are exact: a miss is an expert the router chose that was not resident when the
call began, and each miss is copied exactly once.
"""
from __future__ import annotations

import copy
import logging
import time
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .errors import CheckpointError, DGemmaError, PlanError
from .model import Experts, gelu_tanh, grouped_linear

log = logging.getLogger("dgemma.expert_store")

POLICIES = ("lfu", "lru")
HOST_MODES = ("auto", "pinned", "keep")


# ---- statistics -----------------------------------------------------------------------------------------------


@dataclass
class CallStats:
    """One layer's experts call."""

    pass_index: int
    layer: int
    tokens: int
    needed: int  # distinct experts the router chose
    hits: int  # of those, resident when the call began
    misses: int  # copied during the call
    bytes_moved: int
    chunks: int  # compute calls
    copy_s: float = 0.0
    stall_s: float = 0.0  # compute waiting for copies (CPU: all copy time; CUDA: from events)
    compute_s: float = 0.0
    resident_before: tuple[int, ...] = ()  # trace mode only
    chosen: tuple[int, ...] = ()  # trace mode only
    loaded: tuple[int, ...] = ()  # trace mode only


@dataclass
class PassStats:
    """All layers of one forward pass (an encoder commit or a denoising step)."""

    index: int
    layers: int = 0
    needed: int = 0
    hits: int = 0
    misses: int = 0
    bytes_moved: int = 0
    chunks: int = 0
    copy_s: float = 0.0
    stall_s: float = 0.0
    compute_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 1.0

    def add(self, c: CallStats) -> None:
        self.layers += 1
        self.needed += c.needed
        self.hits += c.hits
        self.misses += c.misses
        self.bytes_moved += c.bytes_moved
        self.chunks += c.chunks
        self.copy_s += c.copy_s
        self.stall_s += c.stall_s
        self.compute_s += c.compute_s


@dataclass
class _Step:
    loads: list[tuple[int, int]] = field(default_factory=list)  # (expert, slot) copied before the compute
    compute: list[tuple[int, int]] = field(default_factory=list)  # (expert, slot) computed in one call
    ready: Any = None  # CUDA event: loads done
    copy_start: Any = None


class ExpertStore:
    """State shared by the offloaded layers of one model: policy, statistics, the CUDA copy stream."""

    def __init__(self, policy: str, decay: float, device: torch.device, check_finite: bool, trace: bool):
        if policy not in POLICIES:
            raise DGemmaError(f"unknown expert eviction policy {policy!r} (choose {', '.join(POLICIES)})")
        if not 0.0 <= decay <= 1.0:
            raise DGemmaError(f"decay must be in [0, 1], got {decay}")
        self.policy, self.decay, self.device = policy, decay, device
        self.check_finite, self.trace = check_finite, trace
        self.layers: list[OffloadedExperts] = []
        self.calls: list[CallStats] = []  # trace mode: every call
        self.passes: list[PassStats] = []
        self._pending: list[tuple[CallStats, list[tuple[str, Any, Any]]]] = []  # CUDA timings to resolve
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def _record(self, c: CallStats, first_layer: bool) -> None:
        if first_layer or not self.passes:
            self.passes.append(PassStats(len(self.passes)))
        c.pass_index = self.passes[-1].index
        if self.trace:
            self.calls.append(c)
        if not self._pending or self._pending[-1][0] is not c:
            self.passes[-1].add(c)

    def resolve_timings(self) -> None:
        """Fill CUDA event timings into the statistics (synchronizes the device)."""
        if not self._pending:
            return
        torch.cuda.synchronize(self.device)
        for c, evs in self._pending:
            for kind, a, b in evs:
                ms = a.elapsed_time(b)
                if kind == "stall":
                    c.stall_s += max(0.0, ms) / 1e3
                elif kind == "copy":
                    c.copy_s += ms / 1e3
                else:
                    c.compute_s += ms / 1e3
            self.passes[c.pass_index].add(c)
        self._pending.clear()

    def pass_stats(self) -> list[PassStats]:
        self.resolve_timings()
        return list(self.passes)

    def reset_stats(self) -> None:
        self.resolve_timings()
        self.calls.clear()
        self.passes.clear()

    def summary(self) -> dict[str, float]:
        ps = self.pass_stats()
        n = max(1, len(ps))
        needed = sum(p.needed for p in ps)
        return {
            "passes": len(ps), "bytes_moved": sum(p.bytes_moved for p in ps),
            "bytes_per_pass": sum(p.bytes_moved for p in ps) / n,
            "hit_rate": sum(p.hits for p in ps) / needed if needed else 1.0,
            "misses_per_pass": sum(p.misses for p in ps) / n,
            "copy_s_per_pass": sum(p.copy_s for p in ps) / n, "stall_s_per_pass": sum(p.stall_s for p in ps) / n,
            "compute_s_per_pass": sum(p.compute_s for p in ps) / n,
        }

    @property
    def experts_per_layer(self) -> int:
        return self.layers[0].num_slots if self.layers else 0

    def resident_nbytes(self) -> int:
        return sum(m.num_slots * m.expert_nbytes for m in self.layers)


# ---- the offloaded module --------------------------------------------------------------------------------------


def _expert_tensor_names(inner: nn.Module, E: int) -> list[tuple[str, bool]]:
    """(name, is_parameter) of the inner module's own tensors indexed by expert (leading dim E)."""
    out = []
    for name, t in inner._parameters.items():
        if t is not None and t.dim() >= 1 and t.shape[0] == E:
            out.append((name, True))
    for name, t in inner._buffers.items():
        if t is not None and t.dim() >= 1 and t.shape[0] == E:
            out.append((name, False))
    return out


def _combine_fp32(inner: nn.Module, device: torch.device) -> bool:
    """Whether the inner module sums the K weighted pair outputs in fp32 (fused MoE kernel and its twin) or in
    the activation dtype (model.Experts' torch path, GGUFExperts, NVFP4Experts.forward_loop)."""
    if type(inner) is Experts:
        return dispatch.use_triton(device)
    kx = getattr(inner, "_kernel_experts", None)
    return callable(kx) and kx() is not None


class OffloadedExperts(nn.Module):
    """A layer's routed experts with S of E resident on the device (see the module docstring)."""

    def __init__(self, inner: nn.Module, layer: int, slots: int, store: ExpertStore, device: torch.device,
                 dtype: torch.dtype, host: str):
        super().__init__()
        E = int(inner.num_experts)
        if not 1 <= slots <= E:
            raise DGemmaError(f"experts per layer must be between 1 and {E}, got {slots}")
        self.num_experts, self.layer_index, self.num_slots = E, layer, slots
        object.__setattr__(self, "_store", store)  # shared, not a submodule
        names = _expert_tensor_names(inner, E)
        if not names:
            raise DGemmaError(f"layer {layer}: {type(inner).__name__} has no expert-indexed tensors to offload")
        self._names = [n for n, _ in names]
        pin = host == "pinned" or (host == "auto" and device.type == "cuda")
        self._host: dict[str, torch.Tensor] = {}
        res = copy.copy(inner)  # same class and attributes; own tensor tables and no hooks
        res._parameters = dict(inner._parameters)  # type: ignore[assignment]
        res._buffers = dict(inner._buffers)  # type: ignore[assignment]
        res._modules = dict(inner._modules)  # type: ignore[assignment]
        res._non_persistent_buffers_set = set(inner._non_persistent_buffers_set)
        res._forward_pre_hooks, res._forward_hooks = type(inner._forward_pre_hooks)(), type(inner._forward_hooks)()
        for name, is_param in names:
            t = (inner._parameters if is_param else inner._buffers)[name].detach()
            h = t if t.device.type == "cpu" else t.to("cpu")
            if pin and not h.is_pinned():
                h = h.pin_memory()
            self._host[name] = h
            sdt = dtype if (is_param and t.is_floating_point()) else t.dtype
            slot_t = torch.empty((slots, *t.shape[1:]), dtype=sdt, device=device)
            if is_param:
                res._parameters[name] = nn.Parameter(slot_t, requires_grad=False)
            else:
                res._buffers[name] = slot_t
        for name, t in list(res._parameters.items()):  # the rest (0-d globals...) moves to the device
            if t is not None and name not in self._host:
                res._parameters[name] = nn.Parameter(t.detach().to(device), requires_grad=False)
        for name, t in list(res._buffers.items()):
            if t is not None and name not in self._host:
                res._buffers[name] = t.to(device)
        if isinstance(getattr(res, "parts", None), dict):  # GGUFExperts: its ExpertPart views follow the buffers
            res.parts = {k: copy.copy(p) for k, p in res.parts.items()}
            for k, p in res.parts.items():
                p.data = res._buffers.get(f"{k}_data", p.data)
                p.scale = res._buffers.get(f"{k}_scale", p.scale)
        res.num_experts = slots
        self.resident = res
        self._dense = type(inner) is Experts
        self._fp32_combine = _combine_fp32(inner, device)
        self.expert_nbytes = sum(getattr(res, n)[0].numel() * getattr(res, n).element_size() for n in self._names)
        self.slot_expert = [-1] * slots
        self._checked = [False] * E
        self.score = [0.0] * E  # lfu: decayed token counts
        self.last_use = [-1] * E  # lru: tick of the last compute
        self._tick = 0
        self._slot_ev: list[Any] = [None] * slots  # CUDA: last compute event per slot
        self._prepared: tuple[torch.Tensor, list[_Step], CallStats, list[int]] | None = None

    # ---- scheduling -------------------------------------------------------------------------------------------
    @property
    def resident_experts(self) -> dict[int, int]:
        return {e: s for s, e in enumerate(self.slot_expert) if e >= 0}

    def _min_stream(self) -> int:
        return 2 if self.num_slots >= 4 else 1

    def _schedule(self, counts: list[int]) -> tuple[list[_Step], list[int], list[int], tuple[int, ...]]:
        """Plan one call from the token count per expert: steps, hits, misses, resident experts before."""
        E, S, st = self.num_experts, self.num_slots, self._store
        needed = [e for e in range(E) if counts[e]]
        needed_set = set(needed)
        res = self.resident_experts
        before = tuple(sorted(res))
        hits = [e for e in needed if e in res]
        misses = [e for e in needed if e not in res]
        lfu = st.policy == "lfu"
        if lfu:
            d = st.decay
            self.score = [d * s + c for s, c in zip(self.score, counts)]

            def keep(e: int) -> tuple:
                return (self.score[e], e in res, -e)

            cands = sorted(set(res) | needed_set, key=keep, reverse=True)
            kstar = set(cands[:S])
            protected = {e for e in kstar if e in res}
            keep_miss = kstar - protected
            while misses and protected and S - len(protected) < min(self._min_stream(), S):
                lo = min(protected, key=keep)  # free a streaming slot: demote the least useful kept expert
                protected.discard(lo)
            misses.sort(key=lambda e: (e in keep_miss, self.score[e], -e))
        else:
            protected, keep_miss = set(), set()
            misses.sort(key=lambda e: (self.last_use[e], e))

        def victim_key(s: int) -> tuple:
            e = sim[s]
            if e < 0:
                return (0, 0.0, 0)
            return (1, self.score[e] if lfu else float(self.last_use[e]), -e)

        sim = list(self.slot_expert)
        steps: list[_Step] = []
        unprot_hits = sorted((e for e in hits if e not in protected), key=lambda e: res[e])
        prot_hits = sorted((e for e in hits if e in protected), key=lambda e: res[e])
        for group in ((unprot_hits, prot_hits) if misses else (unprot_hits + prot_hits,)):
            if group:
                steps.append(_Step(compute=[(e, res[e]) for e in group]))
                for e in group:
                    self.last_use[e] = self._tick
                self._tick += 1
        done = set(hits)
        F = S - len(protected)
        b = max(1, F // 2) if F >= 2 else 1
        prev = {s for _, s in steps[-1].compute} if steps else set()
        i = 0
        while i < len(misses):
            want = misses[i : i + b]
            # free to overwrite: empty, or holding an unprotected expert that is done or not needed this call
            avail = [s for s in range(S)
                     if sim[s] < 0 or (sim[s] not in protected and (sim[s] in done or sim[s] not in needed_set))]
            first = sorted((s for s in avail if s not in prev), key=victim_key)
            rest = sorted((s for s in avail if s in prev), key=victim_key)
            victims = (first + rest)[: len(want)]
            if not victims:
                raise RuntimeError("expert store: no slot to stream into")  # a scheduling bug, not bad input
            want = want[: len(victims)]
            step = _Step(loads=list(zip(want, victims)), compute=list(zip(want, victims)))
            for e, s in step.loads:
                sim[s] = e
                self.last_use[e] = self._tick
                if e in keep_miss:
                    protected.add(e)
            self._tick += 1
            done.update(want)
            steps.append(step)
            prev = set(victims)
            i += len(want)
        self.slot_expert = sim
        return steps, hits, misses, before

    def prepare(self, idx: torch.Tensor) -> None:
        """Schedule the call for router choices `idx` [N, K] and start the copies that can start now (CUDA).
        Called by the layer right after routing, before its dense MLP; `forward` calls it if nobody did."""
        st = self._store
        flat = idx.reshape(-1)
        counts = torch.bincount(flat.to("cpu", torch.long), minlength=self.num_experts).tolist()  # syncs on CUDA
        steps, hits, misses, before = self._schedule(counts)
        c = CallStats(-1, self.layer_index, idx.shape[0], len(hits) + len(misses), len(hits), len(misses),
                      len(misses) * self.expert_nbytes, len(steps))
        if st.trace:
            c.resident_before = before
            c.chosen = tuple(e for e, n in enumerate(counts) if n)
            c.loaded = tuple(e for stp in steps for e, _ in stp.loads)
        self._prepared = (idx, steps, c, counts)
        if self._cuda():
            self._evs: list[tuple[str, Any, Any]] = []
            self._next_load = 0
            self._issue_loads(steps, upto=0)

    # ---- copies ---------------------------------------------------------------------------------------------
    def _cuda(self) -> bool:
        return self._store.copy_stream is not None

    def _copy(self, e: int, s: int, non_blocking: bool) -> None:
        for n in self._names:
            getattr(self.resident, n)[s].copy_(self._host[n][e], non_blocking=non_blocking)
        if self._store.check_finite and not self._checked[e]:
            for n in self._names:
                t = getattr(self.resident, n)[s]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"layer {self.layer_index}: expert {e} ({n}) contains NaN or Inf values")
            self._checked[e] = True

    def _issue_loads(self, steps: list[_Step], upto: int) -> None:
        """CUDA: issue the copies of steps from `_next_load` on, as long as their target slots are not used by a
        compute at or after step `upto` that comes before them (those slots are still busy)."""
        cs = self._store.copy_stream
        while self._next_load < len(steps):
            j = self._next_load
            targets = {s for _, s in steps[j].loads}
            if any(targets & {s for _, s in steps[k].compute} for k in range(upto, j)):
                return
            if steps[j].loads:
                with torch.cuda.stream(cs):
                    for s in targets:
                        if self._slot_ev[s] is not None:
                            cs.wait_event(self._slot_ev[s])
                    start = torch.cuda.Event(enable_timing=True)
                    start.record(cs)
                    for e, s in steps[j].loads:
                        self._copy(e, s, non_blocking=True)
                    ready = torch.cuda.Event(enable_timing=True)
                    ready.record(cs)
                steps[j].copy_start, steps[j].ready = start, ready
                self._evs.append(("copy", start, ready))
            self._next_load += 1

    # ---- compute ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, H], idx/w [N, K] -> [N, H], bit-identical to the resident experts module."""
        if self._prepared is None or self._prepared[0] is not idx:
            self.prepare(idx)
        assert self._prepared is not None
        _, steps, c, counts = self._prepared
        self._prepared = None
        first = self.layer_index == self._store.layers[0].layer_index
        if self._dense and not self._cuda():
            out = self._run_dense(x, idx, w, steps, counts, c)
        else:
            out = self._run_generic(x, idx, w, steps, c)
        if self._cuda():
            self._store._pending.append((c, self._evs))
        self._store._record(c, first)
        return out

    def _before_compute(self, steps: list[_Step], j: int, c: CallStats) -> None:
        """Make step j's experts available: synchronous copies on CPU, an event wait on CUDA."""
        if not self._cuda():
            if steps[j].loads:
                t0 = time.perf_counter()
                for e, s in steps[j].loads:
                    self._copy(e, s, non_blocking=False)
                dt = time.perf_counter() - t0
                c.copy_s += dt
                c.stall_s += dt
            return
        self._issue_loads(steps, upto=j)
        if steps[j].ready is not None:
            main = torch.cuda.current_stream(self._store.device)
            before = torch.cuda.Event(enable_timing=True)
            before.record(main)
            main.wait_event(steps[j].ready)
            self._evs.append(("stall", before, steps[j].ready))

    def _after_compute(self, steps: list[_Step], j: int, started: Any) -> None:
        """CUDA: remember when step j's slots are free again, and issue the copies that waited for them."""
        if not self._cuda():
            return
        main = torch.cuda.current_stream(self._store.device)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(main)
        for _, s in steps[j].compute:
            self._slot_ev[s] = ev
        self._evs.append(("compute", started, ev))
        self._issue_loads(steps, upto=j + 1)

    def _start(self) -> Any:
        if not self._cuda():
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self._store.device))
        return ev

    def _run_dense(self, x, idx, w, steps: list[_Step], counts: list[int], c: CallStats) -> torch.Tensor:
        """model.Experts' torch path, expert group by expert group: the same sort, the same rows per group in the
        same order, the same grouped GEMM per group, the same weighting and combine."""
        N, K = idx.shape
        S = self.num_slots
        sorted_e, perm = torch.sort(idx.reshape(-1))  # [P], the call Experts.forward makes
        xs = x[perm // K]
        starts = [0] * self.num_experts
        acc = 0
        for e, n in enumerate(counts):
            starts[e] = acc
            acc += n
        ys: torch.Tensor | None = None
        res = self.resident
        for j, step in enumerate(steps):
            self._before_compute(steps, j, c)
            t0 = time.perf_counter()
            chunk = sorted(step.compute, key=lambda es: es[1])  # grouped GEMM wants groups in slot order
            rows = torch.cat([torch.arange(starts[e], starts[e] + counts[e], device=x.device) for e, _ in chunk])
            slot_counts = [0] * S
            for e, s in chunk:
                slot_counts[s] = counts[e]
            offs = torch.tensor(slot_counts, device=x.device).cumsum(0).to(torch.int32)
            gate, up = grouped_linear(xs[rows], res.gate_up_proj, offs).chunk(2, dim=-1)
            y = grouped_linear(gelu_tanh(gate) * up, res.down_proj, offs)
            if ys is None:
                ys = torch.empty(xs.shape[0], y.shape[1], dtype=y.dtype, device=x.device)
            ys[rows] = y
            c.compute_s += time.perf_counter() - t0
        assert ys is not None
        ys = ys * w.reshape(-1)[perm, None].to(ys.dtype)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return ys[inv].view(N, K, -1).sum(dim=1).to(x.dtype)

    def _run_generic(self, x, idx, w, steps: list[_Step], c: CallStats) -> torch.Tensor:
        """Any experts class: with no miss, one call with slot ids; otherwise one call per step with one pair per
        row (K = 1, the pair's own weight), whose output is the pair's weighted output, then the class's combine."""
        N, K = idx.shape

        def slot_map(step: _Step) -> torch.Tensor:  # expert -> the slot it occupies during this step
            m = torch.full((self.num_experts,), -1, dtype=torch.long)
            for e, s in step.compute:
                m[e] = s
            return m.to(idx.device)

        if len(steps) == 1 and not steps[0].loads:  # every chosen expert is resident: the module's own call
            t0 = self._start()
            out = self.resident(x, slot_map(steps[0])[idx], w)
            if self._cuda():
                self._after_compute(steps, 0, t0)
            else:
                c.compute_s += time.perf_counter() - t0
            return out
        flat = idx.reshape(-1)
        wf = w.reshape(-1, 1)
        z: torch.Tensor | None = None
        for j, step in enumerate(steps):
            self._before_compute(steps, j, c)
            t0 = self._start()
            experts = torch.tensor([e for e, _ in step.compute], device=idx.device)
            rows = torch.nonzero(torch.isin(flat, experts)).squeeze(1)  # ascending pair order
            y = self.resident(x[rows // K], slot_map(step)[flat[rows]][:, None], wf[rows])
            if z is None:
                z = torch.zeros(flat.numel(), y.shape[1], dtype=y.dtype, device=x.device)
            z[rows] = y
            self._after_compute(steps, j, t0)
            if not self._cuda():
                c.compute_s += time.perf_counter() - t0
        assert z is not None
        z = z.view(N, K, -1)
        return (z.sum(dim=1, dtype=torch.float32) if self._fp32_combine else z.sum(dim=1)).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, resident={self.num_slots}/{self.num_experts} experts, "
                f"{self.expert_nbytes / 1e6:.2f} MB per expert, policy={self._store.policy}")


# ---- installation ----------------------------------------------------------------------------------------------


def _feed_forward_offloaded(self, r: torch.Tensor) -> torch.Tensor:
    """`Layer.feed_forward` with the router first, so expert copies can start before the dense MLP runs.
    The dense MLP and the MoE are independent: the result is the same as the original order's."""
    flat = r.reshape(-1, r.shape[-1])
    w, idx = self.router(flat)  # routing reads the raw residual
    self.experts.prepare(idx)
    h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
    h2 = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(r.shape)
    h2 = self.post_feedforward_layernorm_2(h2)
    return r + self.post_feedforward_layernorm(h1 + h2)


def enable_expert_offload(
    model: nn.Module,
    experts_per_layer: int | None = None,
    vram_budget: int | str | float | None = None,
    policy: str = "lfu",
    *,
    host: str = "auto",
    device: torch.device | str | None = None,
    decay: float = 0.9,
    context_length: int = 8192,
    check_finite: bool = False,
    trace: bool = False,
) -> ExpertStore:
    """Keep `experts_per_layer` experts per layer on `device` (default: the model's) and the rest in host memory.

    Without `experts_per_layer`, `vram_budget` decides through the planner (all experts if it fits; PlanError if
    even streaming cannot fit). `host`: "auto" (pinned when the device is CUDA, else left in place: a memory-mapped
    checkpoint stays mapped), "pinned", or "keep". `trace` records every call's router choices and copies.
    Returns the store (also `model.expert_store`), whose `pass_stats()` / `summary()` give the statistics."""
    if host not in HOST_MODES:
        raise DGemmaError(f"host must be one of {', '.join(HOST_MODES)}, got {host!r}")
    if getattr(model, "expert_store", None) is not None:
        raise DGemmaError("expert offload is already enabled on this model")
    dev = torch.device(device) if device is not None else model.device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DGemmaError("device 'cuda' requested but no CUDA device is available")
    cfg = model.cfg
    E = cfg.num_experts
    if experts_per_layer is None:
        if vram_budget is None:
            experts_per_layer = E
        else:
            from .planner import plan

            p = plan(model, context_length=context_length, vram_budget=vram_budget, device=dev.type)
            if p.verdict == "no_fit":
                raise PlanError(p.format_table())
            experts_per_layer = p.experts_per_layer or E
    if not isinstance(experts_per_layer, int) or not 1 <= experts_per_layer <= E:
        raise DGemmaError(f"experts_per_layer must be an integer between 1 and {E}, got {experts_per_layer!r}")
    store = ExpertStore(policy, decay, dev, check_finite, trace)
    for layer in model.layers:
        inner = layer.experts
        if isinstance(inner, OffloadedExperts):
            raise DGemmaError("expert offload is already enabled on this model")
        off = OffloadedExperts(inner, layer.index, experts_per_layer, store, dev, model.dtype, host)
        layer.experts = off
        layer.feed_forward = types.MethodType(_feed_forward_offloaded, layer)
        store.layers.append(off)
    model.expert_store = store
    log.info("expert offload: %d of %d experts per layer resident on %s (%.1f MB), policy %s", experts_per_layer,
             E, dev, store.resident_nbytes() / 1e6, policy)
    return store


__all__ = ["ExpertStore", "OffloadedExperts", "CallStats", "PassStats", "enable_expert_offload", "POLICIES"]
