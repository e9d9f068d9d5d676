"""Preallocated KV cache for block diffusion.

Legend: B batch, Hk kv heads, D head dim, S slots, C canvas length, W sliding window.

- Full-attention layers keep every committed position: slots [0, max_len) in order, plus C scratch slots.
- Sliding layers keep only what a window can see: the newest min(length, W-1) committed positions in
  chronological order, plus C scratch slots. Memory stops growing once the prompt passes the window; a commit
  shifts the window once per encoder pass (never per denoising step).
- The decoder writes the canvas K/V into the scratch slots right after the committed ones and attends over
  committed + scratch in place: nothing of the cache is copied per denoising step and nothing committed changes.
  Only `commit` (the encoder pass) advances `length`.

Keys are stored after RoPE in the same order HF's DynamicCache keeps them (so reductions match the reference
bit for bit where the kernels allow); masks come from each slot's absolute position, which is shared by the
batch (HF gives every row the same positions; padding is a key mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DGConfig
from .errors import GenerationError


@dataclass(frozen=True)
class EncodeMask:
    causal: bool = False  # no mask needed: plain causal attention over exactly the new tokens
    mask: torch.Tensor | None = None  # [B, T, S] bool, True = visible
    dead: torch.Tensor | None = None  # [B, T] padding queries that see no key (their output is zero)


@dataclass
class LayerKV:
    k: torch.Tensor  # [B, Hk, S, D]
    v: torch.Tensor  # [B, Hk, S, D]
    ring: int | None  # committed capacity (W-1) for sliding layers, None for full layers


class KVCache:
    def __init__(
        self,
        cfg: DGConfig,
        batch_size: int,
        max_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rollback: int = 0,
    ):
        """`rollback`: extra positions sliding layers keep beyond the window, so a session can take back up to
        that many committed tokens (`rollback_to`) without re-encoding everything."""
        if max_length < 1:
            raise GenerationError(f"KV cache max_length must be >= 1, got {max_length}")
        self.cfg, self.batch_size, self.max_length = cfg, batch_size, max_length
        self.canvas = cfg.canvas_length
        self.window = cfg.sliding_window
        self.length = 0  # committed positions
        self._slide_len = 0
        C = self.canvas
        self.visible = self.window - 1  # committed positions a sliding layer attends to
        # Slots per layer type: full = max_length + C; sliding = min(W-1 + rollback, max_length) + C.
        self.full_slots = max_length + C
        self.ring = min(self.visible + max(rollback, 0), max_length)
        self.sliding_slots = self.ring + C
        self.layers: list[LayerKV] = []
        for g in cfg.layers:
            S = self.sliding_slots if g.is_sliding else self.full_slots
            shape = (batch_size, g.num_kv_heads, S, g.head_dim)
            self.layers.append(
                LayerKV(
                    torch.zeros(shape, device=device, dtype=dtype),
                    torch.zeros(shape, device=device, dtype=dtype),
                    self.ring if g.is_sliding else None,
                )
            )
        # Absolute position held by each slot (-1 = empty) and which slots are real (not padding) per row.
        self.full_pos = torch.full((self.full_slots,), -1, dtype=torch.long, device=device)
        self.full_valid = torch.zeros(batch_size, self.full_slots, dtype=torch.bool, device=device)
        self.slide_pos = torch.full((self.sliding_slots,), -1, dtype=torch.long, device=device)
        self.slide_valid = torch.zeros(batch_size, self.sliding_slots, dtype=torch.bool, device=device)

    # ---- bookkeeping --------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(lk.k.numel() * lk.k.element_size() * 2 for lk in self.layers)

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise GenerationError(
                f"context is full: {self.length} committed + {n} new tokens > max_length {self.max_length}"
            )

    @property
    def slide_len(self) -> int:
        """Committed positions a sliding layer still holds (the newest ones, in order)."""
        return self._slide_len

    @property
    def slide_start(self) -> int:
        """First held slot a sliding layer attends to (the older ones are only kept for rollback)."""
        return self.slide_len - min(self.length, self.visible)

    def can_rollback(self, length: int) -> bool:
        d = self.length - length
        return 0 <= d and self.slide_len - d >= min(length, self.visible)

    def rollback_to(self, length: int) -> None:
        """Forget the committed positions >= `length` (a session whose history was re-rendered differently)."""
        if not self.can_rollback(length):
            raise GenerationError(f"cannot roll the cache back from {self.length} to {length} positions")
        d, n = self.length - length, self.slide_len
        self.full_pos[length : self.length] = -1
        self.full_valid[:, length : self.length] = False
        self.slide_pos[n - d : n] = -1
        self.slide_valid[:, n - d : n] = False
        self._slide_len = n - d
        self.length = length

    def commit_meta(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Record positions [T] and row validity [B, T] of tokens being committed (call once per encode,
        after every layer has stored its K/V)."""
        n = self.slide_len
        self.full_pos[positions] = positions
        self.full_valid[:, positions] = valid
        pos = torch.cat([self.slide_pos[:n], positions])[-self.ring :]
        val = torch.cat([self.slide_valid[:, :n], valid], dim=1)[:, -self.ring :]
        self.slide_pos[: pos.numel()] = pos
        self.slide_valid[:, : pos.numel()] = val
        self._slide_len = pos.numel()
        self.length = int(positions[-1].item()) + 1

    def scratch_slots(self, sliding: bool, n: int) -> slice:
        """Where the decoder writes the canvas K/V: right after the committed slots."""
        start = self.slide_len if sliding else self.length
        return slice(start, start + n)

    # ---- masks: one per layer type per pass (every layer of a type sees the same slots) ---------------------
    def encode_mask(self, sliding: bool, positions: torch.Tensor, valid: torch.Tensor) -> EncodeMask:
        """Visibility for committing tokens at `positions` [T] (row validity `valid` [B, T]) over the keys
        [held committed slots ; new tokens] that `Attention.encode` builds. Call before `commit_meta`."""
        T = positions.numel()
        if sliding:
            n0, n = self.slide_start, self.slide_len
            kpos = torch.cat([self.slide_pos[n0:n], positions])
            kval = torch.cat([self.slide_valid[:, n0:n], valid], dim=1)
        else:
            kpos = torch.cat([self.full_pos[: self.length], positions])
            kval = torch.cat([self.full_valid[:, : self.length], valid], dim=1)
        S = kpos.numel()
        qp = positions[:, None]
        allowed = kpos[None, :] <= qp
        if sliding:
            allowed &= kpos[None, :] > qp - self.window
        if S == T and bool(valid.all()) and torch.equal(allowed, torch.ones_like(allowed).tril()):
            return EncodeMask(causal=True)  # plain causal: the fast fused path
        mask = allowed[None] & kval[:, None, :]  # [B, T, S]
        # A padding query may see no key at all. Its output is defined as zero (what torch's SDPA returns on CPU
        # and what the reference therefore computes); letting it see itself avoids NaN on other backends.
        dead = ~mask.any(dim=-1)  # [B, T]
        if not bool(dead.any()):
            return EncodeMask(mask=mask)
        mask[:, torch.arange(T, device=mask.device), torch.arange(S - T, S, device=mask.device)] |= dead
        return EncodeMask(mask=mask, dead=dead)

    def decode_mask(self, sliding: bool, canvas: int) -> tuple[int, torch.Tensor | None]:
        """(first slot the canvas attends to, mask [B, C, S] or None when every held position is real)."""
        if sliding:
            start = self.slide_start
            past_ok = self.slide_valid[:, start : self.slide_len]
        else:
            start = 0
            past_ok = self.full_valid[:, : self.length]
        if bool(past_ok.all()):
            return start, None
        canvas_ok = torch.ones(past_ok.shape[0], canvas, dtype=torch.bool, device=past_ok.device)
        return start, torch.cat([past_ok, canvas_ok], dim=1)[:, None, :].expand(-1, canvas, -1)

    def reset(self) -> None:
        self.length = 0
        self._slide_len = 0
        self.full_pos.fill_(-1)
        self.full_valid.zero_()
        self.slide_pos.fill_(-1)
        self.slide_valid.zero_()
