"""DiffusionGemma text model in plain PyTorch: one weight set, run as a causal encoder or a bidirectional decoder.

Legend: B batch, T tokens in this pass, C canvas length, S key slots, H hidden, V vocab, E experts,
K top-k experts, Hq/Hk query/kv heads, D head dim.

Module and parameter names follow the HF checkpoint with the `model.decoder.` prefix removed, so loading is a
name lookup (see loading.py). The encoder's own `layer_scalar`s live next to the decoder ones as
`layers.{i}.encoder_layer_scalar`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch
from ..kernels.fused_moe import DenseExperts
from .config import SLIDING, DGConfig, LayerGeometry, RopeParams
from .kv_cache import EncodeMask, KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x * (mean(x^2) + eps)^-0.5 [* w], in fp32, cast back (no `1 + w`: Gemma 4 multiplies directly).
    On CUDA this is the Triton kernel; elsewhere the reference's own formula (bit-equal to it)."""
    if dispatch.use_triton(x.device):
        return dispatch.rmsnorm(x.contiguous(), weight, eps)
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """y = x @ W.T (no bias anywhere in DiffusionGemma). Quantized backends replace this module (quant/)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def rope_inv_freq(p: RopeParams, head_dim: int) -> torch.Tensor:
    """Inverse frequencies as HF builds them: `default` over int(D*factor) dims, `proportional` pads with zeros."""
    if p.rope_type == "default":
        dim = int(head_dim * p.partial_rotary_factor)
        return 1.0 / (p.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    angles = int(p.partial_rotary_factor * head_dim // 2)
    rot = 1.0 / (p.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([rot, torch.zeros(head_dim // 2 - angles)])


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotate-half; x [B, T, heads, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: DGConfig, g: LayerGeometry):
        super().__init__()
        H, Hq = cfg.hidden_size, cfg.num_attention_heads
        self.g, self.num_heads, self.eps = g, Hq, cfg.rms_norm_eps
        self.window = cfg.sliding_window
        self.q_proj = Linear(H, Hq * g.head_dim)
        self.k_proj = Linear(H, g.num_kv_heads * g.head_dim)
        self.v_proj = Linear(H, g.num_kv_heads * g.head_dim) if g.has_v_proj else None
        self.o_proj = Linear(Hq * g.head_dim, H)
        self.q_norm = RMSNorm(g.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(g.head_dim, cfg.rms_norm_eps)

    def _qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = h.shape
        D = self.g.head_dim
        q = apply_rope(self.q_norm(self.q_proj(h).view(B, T, -1, D)), cos, sin)
        k_raw = self.k_proj(h).view(B, T, -1, D)
        # Full layers have no v_proj: V is the scale-less norm of the raw (pre-norm, pre-RoPE) K projection.
        v_raw = self.v_proj(h).view(B, T, -1, D) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        v = rms_norm(v_raw, None, self.eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]

    def _attend(self, q, k, v, mask: torch.Tensor | None, causal: bool = False, dead: torch.Tensor | None = None) -> torch.Tensor:
        # scaling 1.0 (q/k are RMS-normed), no softcap; mask [B, T, S] bool, True = visible
        # GQA: the reference lets SDPA broadcast kv heads only without a mask and for head_dim <= 256, and
        # repeats them otherwise; doing the same keeps the kernels (and so the rounding) identical
        gqa = mask is None and k.shape[-1] <= 256
        if not gqa and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(k.shape[0], -1, k.shape[2], k.shape[3])
            v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(v.shape[0], -1, v.shape[2], v.shape[3])
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None], is_causal=causal, scale=1.0, enable_gqa=gqa
        )
        B, _, T, _ = o.shape
        if dead is not None:
            o = o.masked_fill(dead[:, None, :, None], 0.0)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def encode(self, h, cos, sin, positions, cache: KVCache, lk, em: EncodeMask) -> torch.Tensor:
        """Causal pass over new tokens at `positions` [T]; writes their K/V into the cache."""
        q, k, v = self._qkv(h, cos, sin)
        T = positions.numel()
        if self.g.is_sliding:
            # keys = what the window still sees + the new chunk; then keep the newest `ring` (one shift per commit)
            n, n0 = cache.slide_len, cache.slide_start
            all_k = torch.cat([lk.k[:, :, :n], k], dim=2)
            all_v = torch.cat([lk.v[:, :, :n], v], dim=2)
            keys, vals = all_k[:, :, n0:], all_v[:, :, n0:]
            keep = min(n + T, cache.ring)
            lk.k[:, :, :keep] = all_k[:, :, -keep:]
            lk.v[:, :, :keep] = all_v[:, :, -keep:]
        else:
            # write first, then attend over the committed prefix + the new tokens in place (no copy)
            lk.k[:, :, positions] = k
            lk.v[:, :, positions] = v
            n = int(positions[-1]) + 1
            keys, vals = lk.k[:, :, :n], lk.v[:, :, :n]
            if torch.is_grad_enabled() and k.requires_grad:
                # training: autograd keeps these for backward, and a later decode writes into the cache in place
                keys, vals = keys.clone(), vals.clone()
        return self._attend(q, keys, vals, em.mask, causal=em.causal, dead=em.dead)

    def decode(self, h, cos, sin, cache: KVCache, lk, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Bidirectional pass over the canvas; reads the cache, writes only the scratch slots. `start`/`mask`
        come from `cache.decode_mask` (the same for every layer of this type)."""
        q, k, v = self._qkv(h, cos, sin)
        sl = cache.scratch_slots(self.g.is_sliding, k.shape[2])
        lk.k[:, :, sl] = k
        lk.v[:, :, sl] = v
        return self._attend(q, lk.k[:, :, start : sl.stop], lk.v[:, :, start : sl.stop], mask)


class MLP(nn.Module):
    def __init__(self, H: int, I: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = Linear(H, I), Linear(H, I), Linear(I, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: DGConfig):
        super().__init__()
        H = cfg.hidden_size
        self.top_k, self.eps = cfg.top_k_experts, cfg.rms_norm_eps
        self.root = H**-0.5
        self.proj = Linear(H, cfg.num_experts)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r [N, H] raw residual -> (weights [N, K] incl. per-expert scale, expert ids [N, K])."""
        z = rms_norm(r, None, self.eps) * self.scale * self.root
        p = F.softmax(self.proj(z), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(p, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Routed experts stored as HF does: gate_up_proj [E, 2*Ie, H], down_proj [E, H, Ie]."""

    def __init__(self, cfg: DGConfig):
        super().__init__()
        E, H, Ie = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Ie, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, Ie))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [N, H], idx/w [N, K] -> [N, H]. Token-expert pairs are sorted by expert and run as one grouped GEMM
        per projection (no Python loop over tokens), then summed over k per token. This is the reference's own
        order of operations, so the result matches it bit for bit."""
        if dispatch.use_triton(x.device):
            # fused Triton MoE (sort/align, grouped GEMMs with the activation fused, weighted combine)
            return dispatch.fused_moe(x.contiguous(), w, idx, DenseExperts(self.gate_up_proj, self.down_proj))
        N, K = idx.shape
        E = self.num_experts
        sorted_e, perm = torch.sort(idx.reshape(-1))  # [N*K]
        xs = x[perm // K]
        counts = torch.bincount(sorted_e, minlength=E)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate, up = grouped_linear(xs, self.gate_up_proj, offs).chunk(2, dim=-1)
        ys = grouped_linear(gelu_tanh(gate) * up, self.down_proj, offs)
        ys = ys * w.reshape(-1)[perm, None].to(ys.dtype)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return ys[inv].view(N, K, -1).sum(dim=1).to(x.dtype)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (group e ends at offs[e]) times w[e].T: [S, in] x [E, out, in] -> [S, out]."""
    wt = w.transpose(-2, -1)
    el = w.element_size()
    # torch's grouped_mm needs 16-byte aligned strides; otherwise run the groups one by one
    if hasattr(F, "grouped_mm") and x.device.type in ("cpu", "cuda") and (w.shape[-1] * el) % 16 == 0 \
            and (w.shape[-2] * el) % 16 == 0 and (x.shape[-1] * x.element_size()) % 16 == 0:
        return F.grouped_mm(x.to(w.dtype).contiguous(), wt, offs=offs)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], wt[e], out=out[start:end])
        start = end
    return out


class Layer(nn.Module):
    def __init__(self, cfg: DGConfig, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.index, self.g = i, cfg.layers[i]
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(cfg, self.g)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        # not tied between encoder and decoder: each role has its own
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def feed_forward(self, r: torch.Tensor) -> torch.Tensor:
        """Dense MLP and MoE side by side on the post-attention residual r."""
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        w, idx = self.router(flat)  # routing reads the raw residual, not a normed input
        h2 = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(r.shape)
        h2 = self.post_feedforward_layernorm_2(h2)
        return r + self.post_feedforward_layernorm(h1 + h2)

    def forward(self, x: torch.Tensor, attn_out_fn, scalar: torch.Tensor) -> torch.Tensor:
        r = x + self.post_attention_layernorm(attn_out_fn(self.input_layernorm(x)))
        return self.feed_forward(r) * scalar


class SelfConditioning(nn.Module):
    def __init__(self, cfg: DGConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.pre_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.gate_proj, self.up_proj, self.down_proj = Linear(H, I), Linear(H, I), Linear(I, H)

    def forward(self, x: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        # soft == 0 (first step) gives sc == 0 exactly, so it is skipped; post_norm has no weight
        if soft is not None:
            n = self.pre_norm(soft)
            x = x + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))
        return rms_norm(x, None, self.eps)


class DGModel(nn.Module):
    """The shared weight set. `encode` fills the cache (causal); `decode` runs a canvas (bidirectional)."""

    def __init__(self, cfg: DGConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        for lt, p in cfg.rope.items():
            hd = next(g.head_dim for g in cfg.layers if g.layer_type == lt)
            self.register_buffer(f"inv_freq_{lt}", rope_inv_freq(p, hd), persistent=False)

    # ---- pieces ---------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        # the scale is cast to the weight dtype first (sqrt(2816) becomes 53.0 in bf16), as HF does
        return F.embedding(ids, w) * torch.tensor(self.cfg.embed_scale).to(w.dtype)

    def soft_embedding(self, sc_logits: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """softmax(previous processed logits) @ E * embed_scale, in the embedding dtype.

        `top_k` (an approximation, off by default): keep only each position's k most likely tokens,
        renormalized, and gather their embedding rows instead of a [V, H] matmul (as MAX and llama.cpp do)."""
        w = self.embed_tokens.weight
        if top_k is not None and top_k < sc_logits.shape[-1]:
            vals, idx = sc_logits.float().topk(top_k, dim=-1)  # [B, C, k]
            p = torch.softmax(vals, dim=-1).to(w.dtype)
            soft = torch.einsum("bck,bckh->bch", p, F.embedding(idx, w))
            return soft * torch.tensor(self.cfg.embed_scale).to(w.dtype)
        if dispatch.use_triton(sc_logits.device):
            # no second [C, V] fp32 tensor on the GPU: softmax is rebuilt in registers from a row logsumexp
            B, C, V = sc_logits.shape
            out = dispatch.sc_soft_embedding(sc_logits.reshape(B * C, V), w, self.cfg.embed_scale)
            return out.view(B, C, -1)
        p = sc_logits.softmax(dim=-1, dtype=torch.float32).to(w.dtype)
        return (p @ w) * torch.tensor(self.cfg.embed_scale).to(w.dtype)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {lt: rope_cos_sin(getattr(self, f"inv_freq_{lt}"), positions, dtype) for lt in self.cfg.rope}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied head + softcap, fp32 [B, T, V]."""
        x = F.linear(h, self.embed_tokens.weight).float()
        cap = self.cfg.final_logit_softcapping
        if not cap:
            return x
        if torch.is_grad_enabled():
            return torch.tanh(x / cap) * cap
        return x.div_(cap).tanh_().mul_(cap)  # in place: no second [B, T, V] fp32 temporary

    # ---- encoder ----------------------------------------------------------------------------------------
    # (no inference_mode here: the trainer differentiates through encode/decode; generation wraps them)
    def encode(self, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Commit `ids` [B, T] at positions cache.length..+T-1 (causal); `valid` [B, T] marks non-padding.
        Returns the final-normed hidden states (unused by generation)."""
        B, T = ids.shape
        cache.check_room(T)
        positions = torch.arange(cache.length, cache.length + T, device=ids.device)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=ids.device)
        x = self.embed(ids)
        rope = self._rope(positions, x.dtype)
        masks = {lt: cache.encode_mask(lt == SLIDING, positions, valid) for lt in self.cfg.rope}
        for layer, lk in zip(self.layers, cache.layers):
            cos, sin = rope[layer.g.layer_type]
            em = masks[layer.g.layer_type]

            def attn(h, layer=layer, lk=lk, cos=cos, sin=sin, em=em):
                return layer.self_attn.encode(h, cos, sin, positions, cache, lk, em)

            x = layer(x, attn, layer.encoder_layer_scalar)
        cache.commit_meta(positions, valid)
        return self.norm(x)

    # ---- decoder ----------------------------------------------------------------------------------------
    def decode_hidden(
        self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None = None,
        sc_mask: torch.Tensor | None = None, sc_top_k: int | None = None,
    ) -> torch.Tensor:
        B, C = canvas.shape
        if C > cache.canvas:
            raise ValueError(f"canvas of {C} tokens exceeds the cache's canvas capacity {cache.canvas}")
        positions = torch.arange(cache.length, cache.length + C, device=canvas.device)
        x = self.embed(canvas)
        soft = None
        if sc_logits is not None:
            soft = self.soft_embedding(sc_logits, sc_top_k).to(x.dtype)
            if sc_mask is not None:
                soft = soft * sc_mask.to(soft.dtype)[:, None, None]
        x = self.self_conditioning(x, soft)
        rope = self._rope(positions, x.dtype)
        masks = {lt: cache.decode_mask(lt == SLIDING, C) for lt in self.cfg.rope}
        for layer, lk in zip(self.layers, cache.layers):
            cos, sin = rope[layer.g.layer_type]
            start, mask = masks[layer.g.layer_type]

            def attn(h, layer=layer, lk=lk, cos=cos, sin=sin, start=start, mask=mask):
                return layer.self_attn.decode(h, cos, sin, cache, lk, start, mask)

            x = layer(x, attn, layer.layer_scalar)
        return self.norm(x)

    def decode(
        self, canvas: torch.Tensor, cache: KVCache, sc_logits: torch.Tensor | None = None,
        sc_mask: torch.Tensor | None = None, sc_top_k: int | None = None,
    ) -> torch.Tensor:
        """Denoiser logits (fp32, softcapped) [B, C, V] for a canvas [B, C]; the cache is only read."""
        return self.logits(self.decode_hidden(canvas, cache, sc_logits, sc_mask, sc_top_k))

    def new_cache(self, batch_size: int, max_length: int, rollback: int = 0) -> KVCache:
        return KVCache(self.cfg, batch_size, max_length, device=self.device, dtype=self.dtype, rollback=rollback)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(cfg: DGConfig) -> DGModel:
    """The full-size model without memory: for counting and planning."""
    with torch.device("meta"):
        return DGModel(cfg)


__all__ = ["DGModel", "build_meta", "count_parameters", "rms_norm"]
