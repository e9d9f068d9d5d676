"""Block-diffusion generation: encode the prompt, denoise a canvas, commit its argmax, repeat.

Two sampling modes share everything but how the per-position sample is drawn:
- `sampling="reference"` follows HF's `DiffusionGemmaGenerationMixin.generate` step by step, including the order
  and shapes of every random draw (`torch.multinomial` over the vocabulary), so that with the same seed (global
  `torch.manual_seed` or an explicit `torch.Generator`) it returns the same tokens as HF on CPU in float32.
- `sampling="fast"` (the default) computes softmax, entropy and argmax in one pass over the logits and draws each
  position by inverse CDF from one uniform number: the same distribution, far less work and memory traffic, but
  a different random stream.
See architecture.md section 6.

Legend: B batch, P prompt length, C canvas length, V vocab.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .config import GenerationDefaults
from .errors import GenerationError
from .kv_cache import KVCache
from .model import DGModel


class Streamer(Protocol):
    """HF-compatible streamer: `put(ids)` for committed tokens (the prompt first), `put_draft(ids)` for the
    current argmax canvas at every denoising step, `end()` once."""

    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


@dataclass(frozen=True)
class SamplerSettings:
    max_new_tokens: int
    max_denoising_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float
    adaptive_stopping: bool
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def resolve(cls, defaults: GenerationDefaults, **overrides: Any) -> SamplerSettings:
        """Per-call values override the checkpoint's generation_config.json; everything is validated here."""
        vals = dict(
            max_new_tokens=defaults.max_new_tokens, max_denoising_steps=defaults.max_denoising_steps,
            t_min=defaults.t_min, t_max=defaults.t_max, entropy_bound=defaults.entropy_bound,
            stability_threshold=defaults.stability_threshold, confidence_threshold=defaults.confidence_threshold,
            adaptive_stopping=True, eos_token_ids=defaults.eos_token_ids, pad_token_id=defaults.pad_token_id,
        )
        unknown = set(overrides) - set(vals)
        if unknown:
            raise GenerationError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
        for k, v in overrides.items():
            if v is not None:
                vals[k] = v
        if isinstance(vals["eos_token_ids"], int):
            vals["eos_token_ids"] = (vals["eos_token_ids"],)
        vals["eos_token_ids"] = tuple(vals["eos_token_ids"])
        s = cls(**vals)
        s.validate()
        return s

    def validate(self) -> None:
        def bad(msg: str) -> GenerationError:
            return GenerationError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps < 1:
            raise bad(f"steps (max_denoising_steps) must be an integer >= 1, got {self.max_denoising_steps!r}")
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(f"{name} must be a finite number, got {v!r}")
        if self.t_min < 0:
            raise bad(f"t_min must be >= 0, got {self.t_min}")
        if self.t_max <= self.t_min:
            raise bad(f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})")
        if self.entropy_bound <= 0:
            raise bad(f"entropy_bound must be > 0, got {self.entropy_bound}")
        if self.confidence_threshold <= 0:
            raise bad(f"confidence_threshold must be > 0, got {self.confidence_threshold}")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            raise bad(f"stability (stability_threshold) must be an integer >= 0, got {self.stability_threshold!r}")


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, P + n*C] prompt followed by the generated canvases (pad after EOS)
    tokens_per_forward: torch.Tensor  # [B] non-pad new tokens / decoder forward passes
    steps_per_canvas: list[int]  # denoising steps run per canvas (the batch's max)
    prompt_length: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


class _StableAndConfident:
    """Adaptive stopping: argmax unchanged for `stability` steps and mean entropy below the threshold."""

    def __init__(self, stability: int, threshold: float):
        self.stability, self.threshold = stability, threshold
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        if self.stability == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.stability, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy.mean(dim=-1) < self.threshold)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    # the reference uses torch.distributions.Categorical; the same call keeps the values bit-identical
    return torch.distributions.Categorical(logits=logits).entropy()


def _randint(V: int, shape: tuple[int, ...], device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, V, shape, device=device, generator=generator)


def sample_reference(processed: torch.Tensor, generator: torch.Generator | None):
    """HF's draws: softmax, multinomial over the vocabulary, Categorical entropy. Returns (sample, entropy)."""
    B, C, V = processed.shape
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sample = torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, C)  # RNG draw 2
    return sample, _entropy(processed)


def sample_fast(processed: torch.Tensor, generator: torch.Generator | None):
    """One pass over the logits for softmax, entropy, argmax and an inverse-CDF sample from one uniform per
    position: the fused Triton sampler on CUDA, its chunked torch twin elsewhere (kernels/sampler.py)."""
    from ..kernels import dispatch

    B, C, V = processed.shape
    u = torch.rand(B * C, device=processed.device, generator=generator)
    out = dispatch.sample_logits(processed.reshape(B * C, V).contiguous(), 1.0, u)
    return out.sample.view(B, C), out.entropy.view(B, C)


SAMPLERS = {"reference": sample_reference, "fast": sample_fast}



def denoise_canvas(
    model: DGModel,
    cache: KVCache,
    s: SamplerSettings,
    batch_size: int,
    generator: torch.Generator | None = None,
    streamer: Any = None,
    active: torch.Tensor | None = None,
    sampling: str = "fast",
    sc_top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Denoise one canvas against the committed cache. Returns (argmax canvas [B, C], decoder forward passes
    counted per row [B], steps run). `active` [B] marks rows whose sequence is not finished yet."""
    cfg = model.cfg
    B, C, V, N = batch_size, cfg.canvas_length, cfg.vocab_size, s.max_denoising_steps
    dev = model.device
    draw = SAMPLERS[sampling]
    canvas = _randint(V, (B, C), dev, generator)  # RNG draw 1
    argmax = canvas
    sc_logits = None
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev) if active is None else active
    stopper = _StableAndConfident(s.stability_threshold, s.confidence_threshold) if s.adaptive_stopping else None
    passes = torch.zeros(B, dtype=torch.int, device=dev)
    steps = 0
    for cur_step in range(N, 0, -1):
        passes += ~(finished | ~active)
        steps += 1
        raw = model.decode(canvas, cache, sc_logits, sc_top_k=sc_top_k)  # [B, C, V] fp32, softcapped
        # the reference computes the temperature as fp32 tensor arithmetic on an int32 step counter
        step_t = torch.tensor(cur_step, dtype=torch.int32, device=dev)
        processed = raw.div_(s.t_min + (s.t_max - s.t_min) * (step_t / N))  # in place: raw is not needed again
        del raw
        sample, ent = draw(processed, generator)
        new_argmax = torch.argmax(processed, dim=-1)
        # entropy-bound acceptance: the lowest-entropy tokens whose preceding entropies sum to <= bound
        sorted_ent, order = torch.sort(ent, dim=-1)
        accept_sorted = torch.cumsum(sorted_ent, dim=-1) - sorted_ent <= s.entropy_bound
        accept = torch.scatter(torch.zeros_like(accept_sorted), -1, order, accept_sorted)
        accepted = torch.where(accept, sample, canvas)
        noise = _randint(V, (B, C), dev, generator)  # RNG draw 3: the full canvas every step
        new_canvas = torch.where(~accept, noise, accepted)
        if stopper is not None:
            if finished.any():
                new_argmax = torch.where(finished[:, None], argmax, new_argmax)
                new_canvas = torch.where(finished[:, None], canvas, new_canvas)
                # frozen rows keep their previous SC logits; their entropy is not recomputed: the stop test
                # only ORs into `finished`, which is already true for them
                processed = torch.where(finished[:, None, None], sc_logits, processed)
            finished = finished | stopper(new_argmax, ent)
        canvas, argmax = new_canvas, new_argmax
        sc_logits = processed.to(model.dtype)  # self-conditioning input of the next step
        del processed  # (on GPUs a separate bf16 copy: the fp32 logits need not live through the next decode)
        if streamer is not None and hasattr(streamer, "put_draft"):
            streamer.put_draft(argmax.cpu())
        if bool(finished.all()):
            break
    return argmax, passes, steps


def prepare_batch(
    prompts: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None, pad_id: int | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, P] + mask [B, P]. Lists of different lengths are left-padded (the mask marks real tokens)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise GenerationError(f"input_ids must be [batch, length] with length >= 1, got shape {list(prompts.shape)}")
        ids = prompts.to(device=device, dtype=torch.long)
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
        return ids, mask
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    fill = pad_id if pad_id is not None else 0
    ids = torch.full((len(prompts), P), fill, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = True
    return ids, mask


@torch.no_grad()  # not inference_mode: torch's CPU grouped GEMM is several times slower under it
def generate(
    model: DGModel,
    input_ids: torch.Tensor | list[list[int]],
    attention_mask: torch.Tensor | None = None,
    *,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
    sampling: str = "fast",
    sc_top_k: int | None = None,
    prefill_chunk: int | None = 1024,
    **sampler_overrides: Any,
) -> GenerationResult:
    """Generate canvases after `input_ids`. Sampler parameters default to the checkpoint's generation_config.
    With `cache` (a session), `input_ids` are only the new tokens to commit after what the cache holds.
    `sampling`: "fast" (default) or "reference" (HF-identical random draws; see the module docstring).
    `sc_top_k`: approximate the self-conditioning soft embedding with each position's k likeliest tokens
    (None, the default, is exact).
    `prefill_chunk`: long prompts are committed this many tokens at a time (bounded activation memory; the
    reference encodes in one pass, so reference sampling does too)."""
    cfg = model.cfg
    if sampling not in SAMPLERS:
        raise GenerationError(f"sampling must be one of {sorted(SAMPLERS)}, got {sampling!r}")
    if sc_top_k is not None and (not isinstance(sc_top_k, int) or sc_top_k < 1):
        raise GenerationError(f"sc_top_k must be a positive integer or None, got {sc_top_k!r}")
    s = SamplerSettings.resolve(cfg.generation, **sampler_overrides)
    for t in s.eos_token_ids + ((s.pad_token_id,) if s.pad_token_id is not None else ()):
        if not 0 <= t < cfg.vocab_size:
            raise GenerationError(f"special token id {t} is outside the vocabulary (size {cfg.vocab_size})")
    ids, mask = prepare_batch(input_ids, attention_mask, s.pad_token_id, model.device)
    for t in ids[mask].unique().tolist():
        if not 0 <= t < cfg.vocab_size:
            raise GenerationError(f"token id {t} is outside the vocabulary (size {cfg.vocab_size})")
    B, P = ids.shape
    C = cfg.canvas_length
    n_canvases = math.ceil(s.max_new_tokens / C)
    past = cache.length if cache is not None else 0
    need = past + P + n_canvases * C
    if need > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt too long: {past + P} tokens + {n_canvases} canvas(es) of {C} = {need} positions, "
            f"but the model's context is {cfg.max_position_embeddings}"
        )
    if cache is None:
        # the last canvas is never committed: it only needs the scratch slots every cache has
        cache = model.new_cache(B, P + (n_canvases - 1) * C)
    else:
        if cache.batch_size != B:
            raise GenerationError(f"session cache holds batch {cache.batch_size}, got {B} prompts")
        if cache.length + P + (n_canvases - 1) * C > cache.max_length:
            raise GenerationError(
                f"prompt too long for this session: {cache.length} cached + {P} new + {(n_canvases - 1) * C} "
                f"> context {cache.max_length}"
            )
    timings: dict[str, float] = {"encode_s": 0.0, "denoise_s": 0.0}
    eos = torch.tensor(s.eos_token_ids, device=ids.device)
    finished_seq = torch.zeros(B, dtype=torch.bool, device=ids.device)
    passes = torch.zeros(B, dtype=torch.int, device=ids.device)
    steps_per_canvas: list[int] = []
    if streamer is not None:
        streamer.put(ids.cpu())
    sequences = ids
    t_start = time.perf_counter()
    to_commit, commit_valid = ids, mask
    for ci in range(n_canvases):
        t0 = time.perf_counter()
        step = to_commit.shape[1] if sampling == "reference" or not prefill_chunk else prefill_chunk
        for c0 in range(0, to_commit.shape[1], step):
            model.encode(to_commit[:, c0 : c0 + step], cache, commit_valid[:, c0 : c0 + step])
        t1 = time.perf_counter()
        timings["encode_s"] += t1 - t0
        argmax, p, steps = denoise_canvas(model, cache, s, B, generator, streamer, ~finished_seq, sampling, sc_top_k)
        timings["denoise_s"] += time.perf_counter() - t1
        if ci == 0:
            timings["first_canvas_s"] = time.perf_counter() - t_start
        passes += p
        steps_per_canvas.append(steps)
        new = argmax.clone()
        # finalize: rows finished earlier get a canvas of pad; after the first EOS, pad (the EOS stays)
        is_eos = torch.isin(new, eos)
        finished_now = is_eos.any(dim=-1)
        prev = finished_seq
        finished_seq = prev | finished_now
        if s.pad_token_id is not None and bool(finished_seq.any()):
            new[prev] = s.pad_token_id
            if bool(finished_now.any()):
                is_eos = torch.isin(new, eos)
                csum = is_eos.cumsum(dim=-1)
                new[(csum > 0) & ~((csum == 1) & is_eos)] = s.pad_token_id
        sequences = torch.cat([sequences, new], dim=-1)
        if streamer is not None:
            streamer.put(new.cpu())
        if bool(finished_seq.all()):
            break
        to_commit, commit_valid = new, torch.ones_like(new, dtype=torch.bool)
    if streamer is not None:
        streamer.end()
    gen_tokens = sequences[:, P:]
    n_valid = (gen_tokens != s.pad_token_id).sum(-1) if s.pad_token_id is not None else torch.full(
        (B,), gen_tokens.shape[1], device=ids.device)
    timings["total_s"] = time.perf_counter() - t_start
    total_steps = sum(steps_per_canvas)
    timings["ms_per_step"] = 1000.0 * timings["denoise_s"] / max(total_steps, 1)
    return GenerationResult(
        sequences=sequences.cpu(), tokens_per_forward=(n_valid / passes).cpu(), steps_per_canvas=steps_per_canvas,
        prompt_length=P, timings=timings,
    )


__all__ = ["SamplerSettings", "GenerationResult", "generate", "denoise_canvas", "prepare_batch"]
