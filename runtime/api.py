"""The library API: `dgemma.load(path)` -> `DiffusionGemma` with `.generate`, `.chat`, `.session` and `.tokenizer`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .chat import clean_output, encode_chat, split_thoughts
from .config import DGConfig
from .errors import DGemmaError, GenerationError
from .generate import GenerationResult, generate
from .kv_cache import KVCache
from .loading import load_model
from .model import DGModel
from .tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "dgemma-tiny-code"


def default_model_path() -> Path:
    """The small checkpoint bundled in the package (`models/` in the source tree)."""
    return Path(str(resources.files("dgemma.models"))) / DEFAULT_MODEL_NAME


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DGemmaError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DGemmaError("device 'cuda' requested but no CUDA device is available")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # bf16 matmul is ~10x slower than fp32 on CPUs; on GPUs bf16 is the native format
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise DGemmaError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


@dataclass
class ChatReply:
    answer: str  # the final answer (thought channel removed)
    thoughts: str  # the thought channel, if the model wrote one
    text: str  # everything the model wrote, decoded, up to the first stop marker
    result: GenerationResult
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.result.new_tokens[0].tolist()


class DiffusionGemma:
    """A loaded model with its tokenizer and sampler defaults."""

    def __init__(self, model: DGModel, tokenizer: Tokenizer | None, path: Path, load_seconds: float):
        self.model, self._tokenizer, self.path, self.load_seconds = model, tokenizer, path, load_seconds

    @property
    def config(self) -> DGConfig:
        return self.model.cfg

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise DGemmaError(f"{self.path}: this checkpoint has no tokenizer files (tokenizer.json / tokenizer.model)")
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int | None = None,
        streamer: Any = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **sampler: Any,
    ) -> GenerationResult:
        """HF-like generate: token ids in, `GenerationResult` (sequences, tokens_per_forward, steps, timings) out.
        Sampler parameters (max_denoising_steps, t_min, t_max, entropy_bound, stability_threshold,
        confidence_threshold, adaptive_stopping, eos_token_ids, pad_token_id) default to generation_config.json.
        `seed` makes a private generator; without seed/generator the global torch RNG is used (as HF does)."""
        if seed is not None and generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return generate(self.model, input_ids, attention_mask, streamer=streamer, generator=generator,
                        max_new_tokens=max_new_tokens, **sampler)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | str,
        *,
        system: str | None = None,
        enable_thinking: bool = False,
        **kw: Any,
    ) -> ChatReply:
        """One reply to a conversation (a list of {'role', 'content'} or a single user string)."""
        msgs = _messages(messages, system)
        ids = encode_chat(self.tokenizer, msgs, enable_thinking=enable_thinking)
        return self._reply(ids, self.generate(torch.tensor([ids]), **kw))

    def session(self, *, system: str | None = None, enable_thinking: bool = False,
                context_length: int = 4096) -> ChatSession:
        return ChatSession(self, system=system, enable_thinking=enable_thinking, context_length=context_length)

    def _reply(self, prompt_ids: list[int], result: GenerationResult) -> ChatReply:
        text = self.tokenizer.decode(result.new_tokens[0].tolist())
        thoughts, answer = split_thoughts(text)
        return ChatReply(answer=answer, thoughts=thoughts, text=clean_output(text), result=result, prompt_ids=prompt_ids)


class ChatSession:
    """Multi-turn chat that keeps the encoder cache of earlier turns: each turn commits only the new tokens.

    The conversation is re-rendered with the chat template every turn; the part that is already in the cache
    (the longest common prefix with what was committed) is reused. If a template rewrites history (e.g. drops
    earlier thoughts), the cache is rebuilt from that point; `stats` says how much was reused."""

    def __init__(self, dg: DiffusionGemma, *, system: str | None, enable_thinking: bool, context_length: int):
        self.dg, self.enable_thinking = dg, enable_thinking
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        # sliding layers keep one canvas of extra history, so a re-rendered turn can roll back instead of rebuild
        self.cache: KVCache = dg.model.new_cache(1, context_length, rollback=dg.config.canvas_length)
        self.committed: list[int] = []
        self.stats: dict[str, int] = {"reused_tokens": 0, "encoded_tokens": 0, "rollbacks": 0, "rebuilds": 0}

    def send(self, text: str, **kw: Any) -> ChatReply:
        msgs = self.messages + [{"role": "user", "content": text}]
        ids = encode_chat(self.dg.tokenizer, msgs, enable_thinking=self.enable_thinking)
        common = min(_common_prefix(self.committed, ids), len(ids) - 1)  # at least one new token to encode
        if common < len(self.committed):
            # the template re-rendered the tail of the history: take it back, or start over if it is too long ago
            if self.cache.can_rollback(common):
                self.cache.rollback_to(common)
                self.stats["rollbacks"] += 1
            else:
                self.cache.reset()
                common = 0
                self.stats["rebuilds"] += 1
            self.committed = ids[:common]
        new = ids[common:]
        self.stats["reused_tokens"] += common
        self.stats["encoded_tokens"] += len(new)
        result = self.dg.generate(torch.tensor([new]), cache=self.cache, **kw)
        reply = self.dg._reply(ids, result)
        # the cache now holds the prompt and every canvas but the last one
        n_c = len(result.steps_per_canvas)
        C = self.dg.config.canvas_length
        gen = result.new_tokens[0].tolist()
        self.committed = ids + gen[: (n_c - 1) * C]
        self.messages = msgs + [{"role": "assistant", "content": reply.answer}]
        return reply


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _messages(messages: Sequence[Mapping[str, Any]] | str, system: str | None) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        msgs: list[dict[str, Any]] = [{"role": "user", "content": messages}]
    else:
        msgs = [dict(m) for m in messages]
    if system:
        if msgs and msgs[0].get("role") == "system":
            raise GenerationError("a system prompt was given twice (in messages and as system=)")
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def detect_format(p: Path) -> str:
    """'gguf' (a .gguf file), 'nvfp4' (a ModelOpt or compressed-tensors NVFP4 directory) or 'hf' (bf16/fp32)."""
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise DGemmaError(f"{p}: not a GGUF file and not a checkpoint directory")
    if (p / "hf_quant_config.json").is_file():
        return "nvfp4"
    cfg = p / "config.json"
    if cfg.is_file():
        import json

        try:
            qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            qc = None  # DGConfig reports the malformed file with details
        if isinstance(qc, dict) and qc:
            return "nvfp4"
    return "hf"


def _checkpoint_tokenizer(p: Path, cfg: DGConfig) -> Tokenizer | None:
    """The tokenizer a checkpoint directory ships, checked against the model's vocabulary."""
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    tok = Tokenizer.from_pretrained(p)
    if tok.vocab_size > cfg.vocab_size:
        raise DGemmaError(f"{p}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    return tok


def load_parts(p: Path, device: torch.device, dtype: torch.dtype, *, fmt: str,
               lazy: bool = False) -> tuple[DGModel, Tokenizer | None]:
    """Model and tokenizer of a checkpoint in format `fmt` (`detect_format`). `lazy` maps an HF checkpoint and
    materializes tensors on first use (GGUF is memory-mapped anyway; NVFP4 loads packed)."""
    if fmt == "gguf":
        from .gguf_loading import load_gguf

        return load_gguf(p, device=device, dtype=dtype)
    if fmt == "nvfp4":
        from .nvfp4_loading import load_nvfp4_model

        model = load_nvfp4_model(p, device=device, dtype=dtype)
    elif lazy:
        from .lazy_loading import load_model_lazy

        model = load_model_lazy(p, device=device, dtype=dtype)
    else:
        model = load_model(p, device=device, dtype=dtype)
    return model, _checkpoint_tokenizer(p, model.cfg)


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, lazy: bool = False) -> DiffusionGemma:
    """Load a DiffusionGemma checkpoint: an HF directory (bf16/fp32), an NVFP4 directory (ModelOpt or
    compressed-tensors layout) or a GGUF file. Default: the small model bundled with dgemma. `lazy`: map an HF
    checkpoint and materialize each tensor on first use (fast start)."""
    p = Path(path) if path is not None else default_model_path()
    if not p.exists():
        raise DGemmaError(f"{p}: no such model directory or file")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    model, tok = load_parts(p, dev, dt, fmt=detect_format(p), lazy=lazy)
    return DiffusionGemma(model, tok, p, time.perf_counter() - t0)
