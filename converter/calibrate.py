"""Streaming calibration through dgemma's own modules, one layer at a time (exllamav3 style).

Legend: T tokens of a chunk, P prompt tokens of a sample, C canvas tokens, H hidden, K in features, E experts.

Only the current layer's weights and the calibration activations are in memory: `StreamingCalibrator` keeps the
hidden states of every calibration token; for layer i the caller hands it that layer's tensors, it builds the
`runtime.model.Layer` on its own and
1. `collect(i, tensors)`: runs the unquantized layer (fp32 math on the stored-dtype weights) over every chunk,
   recording per linear input the amax and the per-input-channel sum of squares (experts: per expert, plus
   token counts), and keeps the reference outputs;
2. the caller quantizes the layer with these statistics (importance = mean x^2 per input channel, input_scale
   from amax) and builds the quantized layer (`NVFP4Linear` / `NVFP4Experts`);
3. `advance(i, quantized_layer)`: runs the quantized layer on the same inputs, logs its output error against the
   reference and makes its output the next layer's input, so later layers calibrate on what the quantized model
   really feeds them.

Calibration paths (what the model sees at inference, `architecture.md` §6):
- encoder: each prompt (BOS + prompt tokens, causal, sliding window as in the model) at positions 0..P-1, one
  causal attention per sample; its K/V are kept for the decoder;
- decoder: each sample's canvas = its continuation tokens (cut to canvas_length, then EOS and padding to
  canvas_length as a finished canvas ends), with a fraction t ~ U(0, 1) of the positions (exactly round(t*C),
  chosen at random) replaced by uniform random ids over the whole vocabulary (the renoising the sampler does),
  at positions P..P+C-1, attending bidirectionally to the sample's committed prompt K/V of the same layer
  (sliding layers: the last W-1 of them) plus the canvas.
- self-conditioning: every `sc_every`-th sample (default: every other one) gets SC input, the others none (the
  first denoising step). SC source (cheap, documented choice): a sparse distribution per canvas position that
  puts mass c ~ U(0.3, 1) on the clean token and splits 1 - c evenly over the current (possibly noised) canvas
  token and the clean tokens of `sc_alternatives` other random positions of the same canvas, i.e. a confident
  but imperfect previous prediction. The soft embedding is sum_j p_j E[id_j] * embed_scale from gathered
  embedding rows, never the full [V, H] matmul, and goes through the SC MLP whose input statistics are recorded.

Statistics file (`calibration_stats.safetensors`, read back with `CalibrationStats.load`), per linear input,
named by HF module (`model.decoder.layers.3.self_attn.q_proj`, `model.decoder.self_conditioning.up_proj`, ...) or
HF expert stack (`model.decoder.layers.3.experts.gate_up_proj` / `.down_proj`):
- `<name>.input_amax` float32 0-d: max |x| over every token (experts: over all experts);
- `<name>.input_sq_mean` float32 [K] (experts [E, K], zero rows for experts without tokens): mean x_k^2;
- `<name>.input_tokens` int64 0-d (experts [E]): tokens seen;
- experts also `<name>.input_amax_per_expert` float32 [E].
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from ..runtime.config import DGConfig
from ..runtime.errors import CheckpointError, FormatError
from ..runtime.hf_names import DEC, ENC, layer_tensors
from ..runtime.model import Layer, SelfConditioning, gelu_tanh, rope_cos_sin, rope_inv_freq
from ..runtime.nvfp4_linear import NVFP4Experts
from ..runtime.safetensors_io import DTYPES, CheckpointFiles, TensorInfo
from .calib_data import CalibSample

log = logging.getLogger(__name__)

STATS_FILE = "calibration_stats.safetensors"
STATS_FORMAT = "dgemma-calibration-stats"


# ---- reading tensors without memory-mapping ----------------------------------------------------------------


class RawReader:
    """Reads single tensors or embedding rows with plain file reads (no mmap), so that bytes already read are
    never counted in this process's resident memory again: the streaming memory bound holds."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self._offsets: dict[Path, int] = {}
        self._starts: dict[str, int] = {}

    def _data_start(self, info: TensorInfo) -> int:
        """Absolute file offset of a tensor's first byte (headers were validated by CheckpointFiles)."""
        if info.name not in self._starts:
            f = info.file
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n).decode("utf-8"))
            base = 8 + n
            for name, meta in header.items():
                if name != "__metadata__":
                    self._starts[name] = base + int(meta["data_offsets"][0])
        return self._starts[info.name]

    def info(self, name: str) -> TensorInfo:
        if name not in self.files.tensors:
            raise CheckpointError(f"{self.files.path}: missing tensor {name!r}")
        return self.files.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as fh:
            fh.seek(self._data_start(info))
            mv = memoryview(buf.numpy())
            got = 0
            while got < info.nbytes:  # readinto may return short counts for large reads
                n = fh.readinto(mv[got:])
                if not n:
                    raise FormatError(f"{info.file}: truncated while reading {name!r}")
                got += n
        return buf.view(info.torch_dtype).view(info.shape) if info.shape else buf.view(info.torch_dtype).reshape(())

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [n] of a 2-D tensor, [n, cols] (one pread per distinct row)."""
        info = self.info(name)
        if len(info.shape) != 2:
            raise CheckpointError(f"{name}: expected a 2-D tensor, got shape {list(info.shape)}")
        cols, esize = info.shape[1], DTYPES[info.dtype][1]
        row_bytes = cols * esize
        uniq, inv = torch.unique(ids, return_inverse=True)
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= info.shape[0]):
            raise CheckpointError(f"{name}: row id out of range [0, {info.shape[0]})")
        buf = torch.empty(uniq.numel(), row_bytes, dtype=torch.uint8)
        start = self._data_start(info)
        fd = os.open(info.file, os.O_RDONLY)
        try:
            arr = buf.numpy()
            for j, r in enumerate(uniq.tolist()):
                data = os.pread(fd, row_bytes, start + r * row_bytes)
                if len(data) != row_bytes:
                    raise FormatError(f"{info.file}: truncated while reading rows of {name!r}")
                arr[j] = memoryview(data)
        finally:
            os.close(fd)
        return buf.view(info.torch_dtype).view(uniq.numel(), cols)[inv]


# ---- statistics ---------------------------------------------------------------------------------------------


@dataclass
class InputStats:
    """Running statistics of one linear input (experts: E rows)."""

    K: int
    experts: int = 0  # 0 for a plain linear
    amax: torch.Tensor = field(init=False)  # [] or [E]
    sq_sum: torch.Tensor = field(init=False)  # [K] or [E, K], float64
    tokens: torch.Tensor = field(init=False)  # [] or [E], int64

    def __post_init__(self) -> None:
        lead = (self.experts,) if self.experts else ()
        self.amax = torch.zeros(lead, dtype=torch.float32)
        self.sq_sum = torch.zeros(*lead, self.K, dtype=torch.float64)
        self.tokens = torch.zeros(lead, dtype=torch.int64)

    def observe(self, x: torch.Tensor, expert: int | None = None) -> None:
        """x [n, K] (any float dtype)."""
        if x.numel() == 0:
            return
        xf = x.reshape(-1, self.K).float()
        a = xf.abs().amax()
        s = (xf * xf).sum(dim=0).double()  # fp32 over one chunk, fp64 across chunks
        if expert is None:
            self.amax = torch.maximum(self.amax, a)
            self.sq_sum += s
            self.tokens += xf.shape[0]
        else:
            self.amax[expert] = torch.maximum(self.amax[expert], a)
            self.sq_sum[expert] += s
            self.tokens[expert] += xf.shape[0]

    @property
    def input_amax(self) -> torch.Tensor:
        """Per-tensor amax (experts: shared by all experts, one input quantizer per projection as ModelOpt)."""
        return self.amax.amax() if self.experts else self.amax

    @property
    def sq_mean(self) -> torch.Tensor:
        """mean x_k^2: [K] or [E, K] float32; zero where no token was seen."""
        t = self.tokens.clamp(min=1).double()
        return (self.sq_sum / (t.unsqueeze(-1) if self.experts else t)).float()


class CalibrationStats:
    """Per linear input statistics for a whole model, keyed by HF module / expert-stack name."""

    def __init__(self, meta: Mapping[str, str] | None = None):
        self.inputs: dict[str, InputStats] = {}
        self.meta: dict[str, str] = dict(meta or {})

    def get(self, name: str, K: int, experts: int = 0) -> InputStats:
        st = self.inputs.get(name)
        if st is None:
            st = self.inputs[name] = InputStats(K, experts)
        return st

    def __contains__(self, name: str) -> bool:
        return name in self.inputs

    def input_amax(self, name: str) -> torch.Tensor:
        return self.inputs[name].input_amax

    def importance(self, name: str, floor: float = 1e-6) -> torch.Tensor:
        """Importance weights for a scale search: mean x^2 [K] (experts [E, K]) plus a small relative floor so
        no block is weightless; experts that saw no token get uniform weights (weight-only scale choice)."""
        st = self.inputs[name]
        m = st.sq_mean
        if not st.experts:
            return m + floor * float(m.mean().clamp(min=1e-30))
        out = m + floor * m.mean(dim=-1, keepdim=True).clamp(min=1e-30)
        starved = st.tokens == 0
        out[starved] = 1.0
        return out

    def starved_experts(self, name: str) -> list[int]:
        st = self.inputs[name]
        return [] if not st.experts else [int(e) for e in (st.tokens == 0).nonzero().flatten()]

    def save(self, path: str | Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, st in sorted(self.inputs.items()):
            tensors[f"{name}.input_amax"] = st.input_amax.float().reshape(())
            tensors[f"{name}.input_sq_mean"] = st.sq_mean.contiguous()
            tensors[f"{name}.input_tokens"] = st.tokens.clone()
            if st.experts:
                tensors[f"{name}.input_amax_per_expert"] = st.amax.clone()
        # written as bytes like the other output files (safetensors' save_file created it with mode 0600)
        Path(path).write_bytes(save(tensors, metadata={"format": STATS_FORMAT, "version": "1", **self.meta}))

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read a `calibration_stats.safetensors` (e.g. for the GGUF converter's importance weights)."""
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own types
            raise FormatError(f"{path}: cannot read calibration statistics: {e}") from None
        if meta.get("format") != STATS_FORMAT:
            raise FormatError(f"{path}: not a dgemma calibration statistics file (format {meta.get('format')!r})")
        out = cls({k: v for k, v in meta.items() if k not in ("format", "version")})
        for key, t in tensors.items():
            if not key.endswith(".input_sq_mean"):
                continue
            name = key[: -len(".input_sq_mean")]
            try:
                tok = tensors[f"{name}.input_tokens"]
                amax = tensors[f"{name}.input_amax_per_expert"] if t.dim() == 2 else tensors[f"{name}.input_amax"]
            except KeyError as e:
                raise FormatError(f"{path}: {name}: missing {e.args[0]}") from None
            st = InputStats(t.shape[-1], t.shape[0] if t.dim() == 2 else 0)
            st.tokens = tok.to(torch.int64)
            st.amax = amax.float()
            n = st.tokens.clamp(min=1).double()
            st.sq_sum = t.double() * (n.unsqueeze(-1) if st.experts else n)
            out.inputs[name] = st
        return out


# ---- calibration modules --------------------------------------------------------------------------------------


class F32Linear(nn.Module):
    """A bf16/fp32 linear run in fp32, optionally recording its input statistics. The fp32 weight is a per-call
    temporary (not cached: that would hold a second copy of the layer's dense weights)."""

    def __init__(self, weight: torch.Tensor, name: str, stats: CalibrationStats | None):
        super().__init__()
        self.weight, self.name, self.stats = weight, name, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats is not None:
            self.stats.get(self.name, self.weight.shape[1]).observe(x)
        return F.linear(x.float(), self.weight.float())


class CalibExperts(nn.Module):
    """Experts run one at a time in fp32 from per-expert weight getters, recording per-expert input statistics.

    Same math as `runtime.model.Experts.forward`; the k contributions of a token are accumulated in fp32 with
    index_add (no [T*k, H] copies, so the memory stays bounded at real widths). `gate_up(e)` -> [2I, H] and
    `down(e)` -> [H, I], fp32: slices of HF stacks, or an `NVFP4Experts`' dequantized expert."""

    def __init__(self, gate_up: Callable[[int], torch.Tensor], down: Callable[[int], torch.Tensor], num_experts: int,
                 hidden: int, inter: int, names: tuple[str, str], stats: CalibrationStats | None):
        super().__init__()
        self.gate_up, self.down, self.names, self.stats = gate_up, down, names, stats
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter

    @classmethod
    def from_stacks(cls, gate_up: torch.Tensor, down: torch.Tensor, names: tuple[str, str],
                    stats: CalibrationStats | None) -> CalibExperts:
        E, two_i, H = gate_up.shape
        return cls(lambda e: gate_up[e].float(), lambda e: down[e].float(), E, H, two_i // 2, names, stats)

    @classmethod
    def from_module(cls, m: NVFP4Experts, names: tuple[str, str]) -> CalibExperts:
        return cls(lambda e: m.expert_weight("gate_up_proj", e), lambda e: m.expert_weight("down_proj", e),
                   m.num_experts, m.hidden_size, m.intermediate_size, names, None)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        T, k = idx.shape
        E, I = self.num_experts, self.inter
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k  # token of each pair, grouped by expert
        wts = w.reshape(-1)[order].float()
        counts = torch.bincount(flat, minlength=E).tolist()
        out = torch.zeros(T, self.hidden, dtype=torch.float32)
        st_gu = self.stats.get(self.names[0], self.hidden, E) if self.stats is not None else None
        st_dn = self.stats.get(self.names[1], I, E) if self.stats is not None else None
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            t_e = tok[start:start + c]
            xe = x[t_e].float()
            if st_gu is not None:
                st_gu.observe(xe, e)
            gu = xe @ self.gate_up(e).t()
            a = gelu_tanh(gu[:, :I]) * gu[:, I:]
            if st_dn is not None:
                st_dn.observe(a, e)
            out.index_add_(0, t_e, (a @ self.down(e).t()) * wts[start:start + c, None])
            start += c
        return out


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = module.get_submodule(mod_name) if mod_name else module
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def build_layer(
    cfg: DGConfig,
    i: int,
    tensors: Mapping[str, torch.Tensor],
    stats: CalibrationStats | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> Layer:
    """Layer i from its HF tensors (`layer_tensors(cfg, i)` names plus the encoder's `layer_scalar`).

    `modules` maps HF module names (`...self_attn.q_proj`, `...experts`) to replacement modules (NVFP4Linear,
    NVFP4Experts); every other linear becomes an `F32Linear` that records input statistics when `stats` is given.
    An NVFP4Experts replacement runs through `CalibExperts` (its dequantized experts, one at a time)."""
    modules = dict(modules or {})
    with torch.device("meta"):
        layer = Layer(cfg, i)
    pre = f"{DEC}.layers.{i}."
    exp_name = pre + "experts"
    for spec in layer_tensors(cfg, i):
        rel = spec.name[len(pre):]
        if spec.component == "experts":
            continue
        if len(spec.shape) == 2 and rel.endswith(".weight"):
            mod_rel = rel[: -len(".weight")]
            parent_name, _, attr = mod_rel.rpartition(".")
            hf_mod = pre + mod_rel
            repl = modules.pop(hf_mod, None)
            if repl is None:
                repl = F32Linear(tensors[spec.name], hf_mod, stats)
            setattr(layer.get_submodule(parent_name), attr, repl)
            continue
        _assign(layer, rel, tensors[spec.name])
    repl = modules.pop(exp_name, None)
    names = (exp_name + ".gate_up_proj", exp_name + ".down_proj")
    if repl is None:
        repl = CalibExperts.from_stacks(tensors[names[0]], tensors[names[1]], names, stats)
    elif isinstance(repl, NVFP4Experts):
        repl = CalibExperts.from_module(repl, names)  # the same dequantized weights, one expert at a time
    layer.experts = repl
    layer._buffers["encoder_layer_scalar"] = tensors[f"{ENC}.layers.{i}.layer_scalar"]
    if modules:
        raise CheckpointError(f"layer {i}: replacement modules for unknown names: {sorted(modules)}")
    return layer


def layer_tensor_names(cfg: DGConfig, i: int) -> list[str]:
    """The source tensors layer i needs (decoder names + the encoder's layer_scalar)."""
    return [s.name for s in layer_tensors(cfg, i)] + [f"{ENC}.layers.{i}.layer_scalar"]


# ---- attention over packed samples ------------------------------------------------------------------------------


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[1, Hk, S, D] -> [1, heads, S, D], kv head j serving query heads j*rep .. j*rep+rep-1 (as model._attend)."""
    rep = heads // t.shape[1]
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)


@dataclass
class _Chunk:
    """Consecutive samples processed together: tokens of all samples packed along T."""

    samples: list[int]
    enc_lens: list[int]
    dec_lens: list[int]
    enc_pos: torch.Tensor  # [Tenc]
    dec_pos: torch.Tensor  # [Tdec]
    enc: torch.Tensor | None = None  # [Tenc, H] hidden states (CalibOptions.state_dtype)
    dec: torch.Tensor | None = None  # [Tdec, H]
    enc_ref: torch.Tensor | None = None
    dec_ref: torch.Tensor | None = None


@dataclass(frozen=True)
class CalibOptions:
    max_prompt_tokens: int = 256
    chunk_tokens: int = 4096  # tokens per forward (bounds the activation temporaries)
    seed: int = 0
    sc_every: int = 2  # every sc_every-th sample gets self-conditioning input (1 = all)
    sc_alternatives: int = 2
    # storage of the hidden states between layers and of the reference outputs between collect and advance
    # (the math is fp32 either way); bf16 halves the activation memory of a bf16 model's calibration
    state_dtype: torch.dtype = torch.float32
    ref_dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class LayerError:
    layer: int
    enc_rel: float  # ||q - ref|| / ||ref|| over all encoder tokens
    dec_rel: float
    enc_rel_delta: float  # the same on the layer's update (output - layer_scalar * input)
    dec_rel_delta: float


def _rel(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else 0.0


class StreamingCalibrator:
    def __init__(self, reader: RawReader, cfg: DGConfig, samples: Sequence[CalibSample], tokenizer,
                 options: CalibOptions = CalibOptions(), sc_tensors: Mapping[str, torch.Tensor] | None = None):
        """Tokenizes the samples, builds the canvases and the initial hidden states (embedding rows and the SC
        MLP). `sc_tensors`: the self-conditioning tensors (read from the checkpoint when None)."""
        self.cfg, self.options = cfg, options
        self.stats = CalibrationStats()
        self.errors: list[LayerError] = []
        g = torch.Generator().manual_seed(options.seed)
        C, V = cfg.canvas_length, cfg.vocab_size
        eos = cfg.eos_token_ids[0]
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        prompts, canvases, cleans, sc_flags = [], [], [], []
        for n, s in enumerate(samples):
            p = tokenizer.encode(s.prompt)[: options.max_prompt_tokens]
            c = tokenizer.encode(s.continuation, add_bos=False)[:C]
            if not p:
                continue
            if len(c) < C:
                c = c + [eos] + [pad] * (C - len(c) - 1)
            clean = torch.tensor(c[:C], dtype=torch.long)
            t = float(torch.rand((), generator=g))
            k = round(t * C)
            noisy = clean.clone()
            where = torch.randperm(C, generator=g)[:k]
            noisy[where] = torch.randint(0, V, (k,), generator=g)
            prompts.append(torch.tensor(p, dtype=torch.long))
            canvases.append(noisy)
            cleans.append(clean)
            sc_flags.append(options.sc_every > 0 and n % options.sc_every == options.sc_every - 1)
        if not prompts:
            raise FormatError("no calibration sample survived tokenization")
        bad = max(int(x.max()) for x in prompts + cleans)
        if bad >= V:
            raise FormatError(f"the tokenizer produced id {bad}, beyond the model's vocab_size {V}")
        self.n_samples = len(prompts)
        # kept for inspection and tests: token ids per sample, which canvases got SC input, and its sparse inputs
        self.prompts, self.canvases, self.sc_flags = prompts, canvases, sc_flags
        self.sc_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.enc_tokens = sum(len(p) for p in prompts)
        self.dec_tokens = C * len(canvases)
        self.stats.meta.update(samples=str(self.n_samples), encoder_tokens=str(self.enc_tokens),
                               decoder_tokens=str(self.dec_tokens), sc_samples=str(sum(sc_flags)),
                               seed=str(options.seed))
        # chunks of consecutive samples
        self.chunks: list[_Chunk] = []
        cur: list[int] = []
        for j in range(len(prompts)):
            cur.append(j)
            if sum(len(prompts[x]) + C for x in cur) >= options.chunk_tokens or j == len(prompts) - 1:
                enc_lens = [len(prompts[x]) for x in cur]
                self.chunks.append(_Chunk(
                    list(cur), enc_lens, [C] * len(cur),
                    torch.cat([torch.arange(n) for n in enc_lens]),
                    torch.cat([torch.arange(n, n + C) for n in enc_lens])))
                cur = []
        self._init_states(reader, prompts, canvases, cleans, sc_flags, g, sc_tensors)

    # ---- initial hidden states ------------------------------------------------------------------------------
    def _init_states(self, reader: RawReader, prompts, canvases, cleans, sc_flags, g, sc_tensors) -> None:
        cfg, opt = self.cfg, self.options
        emb_name = f"{DEC}.embed_tokens.weight"
        ids = torch.cat(prompts + canvases + cleans)
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = reader.rows(emb_name, uniq)  # [U, H] in the checkpoint dtype
        if not bool(torch.isfinite(rows).all()):
            raise CheckpointError(f"{emb_name}: NaN or Inf in the embedding rows used by calibration")
        scale = torch.tensor(cfg.embed_scale).to(rows.dtype)
        lookup = torch.full((int(uniq.max()) + 1,), -1, dtype=torch.long)
        lookup[uniq] = torch.arange(uniq.numel())

        def emb(t: torch.Tensor) -> torch.Tensor:  # the model's embed(): scale cast to the weight dtype first
            return (rows[lookup[t]] * scale).float()

        sc_names = ("pre_norm.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
        sct = dict(sc_tensors) if sc_tensors is not None else \
            {n: reader.read(f"{DEC}.self_conditioning.{n}") for n in sc_names}
        for n in sc_names:
            if not bool(torch.isfinite(sct[n]).all()):
                raise CheckpointError(f"{DEC}.self_conditioning.{n} contains NaN or Inf values")
        with torch.device("meta"):
            sc = SelfConditioning(cfg)
        sc.pre_norm.weight = nn.Parameter(sct["pre_norm.weight"], requires_grad=False)
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(sc, n, F32Linear(sct[f"{n}.weight"], f"{DEC}.self_conditioning.{n}", self.stats))
        C = cfg.canvas_length
        for ch in self.chunks:
            ch.enc = torch.cat([emb(prompts[j]) for j in ch.samples]).to(opt.state_dtype)
            decs = []
            for j in ch.samples:
                x = emb(canvases[j])  # [C, H]
                soft = None
                if sc_flags[j]:
                    soft = self._soft(emb, canvases[j], cleans[j], g).unsqueeze(0)
                decs.append(sc(x.unsqueeze(0), soft)[0])
            ch.dec = torch.cat(decs).to(opt.state_dtype)
        del rows

    def _soft(self, emb: Callable, noisy: torch.Tensor, clean: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The sparse SC soft embedding [C, H] (see the module docstring); records (ids, probs) [C, 2 + m]."""
        C, m = clean.numel(), self.options.sc_alternatives
        c = 0.3 + 0.7 * torch.rand(C, generator=g)  # mass on the clean token
        ids = torch.stack([clean, noisy] + [clean[torch.randint(0, C, (C,), generator=g)] for _ in range(m)], dim=1)
        probs = torch.cat([c[:, None], ((1.0 - c) / (m + 1))[:, None].expand(C, m + 1)], dim=1)
        self.sc_inputs.append((ids, probs))
        soft = torch.zeros(C, self.cfg.hidden_size)
        for j in range(ids.shape[1]):
            soft += probs[:, j:j + 1] * emb(ids[:, j])
        return soft

    # ---- per-layer passes ---------------------------------------------------------------------------------------
    def _run(self, layer: Layer, ch: _Chunk, enc_in: torch.Tensor, dec_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer over one chunk: encoder pass (keeping each sample's K/V), then decoder pass."""
        cfg = self.cfg
        g = layer.g
        inv = rope_inv_freq(cfg.rope[g.layer_type], g.head_dim)
        attn = layer.self_attn
        H = attn.num_heads
        window = cfg.sliding_window
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def enc_attn(h: torch.Tensor) -> torch.Tensor:
            cos, sin = rope_cos_sin(inv, ch.enc_pos, h.dtype)
            q, k, v = attn._qkv(h, cos, sin)  # [1, heads, T, D]
            outs, s = [], 0
            for n in ch.enc_lens:
                qs, ks, vs = q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n]
                mask = None
                if g.is_sliding and n > window:
                    pos = torch.arange(n)
                    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
                o = F.scaled_dot_product_attention(qs, _expand_kv(ks, H), _expand_kv(vs, H), attn_mask=mask,
                                                   is_causal=mask is None, scale=1.0)
                outs.append(o)
                keep = min(n, window - 1) if g.is_sliding else n  # what the decoder's cache still holds
                kv.append((ks[:, :, n - keep:], vs[:, :, n - keep:]))
                s += n
            o = torch.cat(outs, dim=2)  # [1, Hq, T, D]
            return attn.o_proj(o.transpose(1, 2).reshape(1, o.shape[2], -1))

        def dec_attn(h: torch.Tensor) -> torch.Tensor:
            cos, sin = rope_cos_sin(inv, ch.dec_pos, h.dtype)
            q, k, v = attn._qkv(h, cos, sin)
            outs, s = [], 0
            for (kp, vp), n in zip(kv, ch.dec_lens):
                keys = torch.cat([kp, k[:, :, s:s + n]], dim=2)
                vals = torch.cat([vp, v[:, :, s:s + n]], dim=2)
                outs.append(F.scaled_dot_product_attention(q[:, :, s:s + n], _expand_kv(keys, H), _expand_kv(vals, H),
                                                           scale=1.0))
                s += n
            o = torch.cat(outs, dim=2)
            return attn.o_proj(o.transpose(1, 2).reshape(1, o.shape[2], -1))

        with torch.inference_mode():
            enc_out = layer(enc_in.unsqueeze(0), enc_attn, layer.encoder_layer_scalar)[0].float()
            dec_out = layer(dec_in.unsqueeze(0), dec_attn, layer.layer_scalar)[0].float()
        return enc_out, dec_out

    def collect(self, i: int, tensors: Mapping[str, torch.Tensor]) -> CalibrationStats:
        """Run the unquantized layer i over every chunk, recording statistics and keeping the reference outputs."""
        layer = build_layer(self.cfg, i, tensors, self.stats)
        for ch in self.chunks:
            enc, dec = self._run(layer, ch, ch.enc.float(), ch.dec.float())
            ch.enc_ref, ch.dec_ref = enc.to(self.options.ref_dtype), dec.to(self.options.ref_dtype)
        return self.stats

    def evaluate(self, i: int, layer: Layer) -> LayerError:
        """Output error of a (quantized) layer i against the reference of the last `collect(i)`; nothing changes."""
        return self._pass(i, layer, advance=False)

    def advance(self, i: int, layer: Layer | None) -> LayerError:
        """Run the quantized layer i (None: take the reference outputs as they are), log its error against the
        reference, and make its outputs the next layer's inputs."""
        err = self._pass(i, layer, advance=True)
        self.errors.append(err)
        if layer is not None:
            log.info("layer %d: output rel. error vs bf16 %.4f (encoder) %.4f (decoder); update rel. error %.4f / %.4f",
                     i, err.enc_rel, err.dec_rel, err.enc_rel_delta, err.dec_rel_delta)
        return err

    def _pass(self, i: int, layer: Layer | None, advance: bool) -> LayerError:
        num = {"enc": 0.0, "dec": 0.0}
        den = {"enc": 0.0, "dec": 0.0, "encd": 0.0, "decd": 0.0}
        for ch in self.chunks:
            if ch.enc_ref is None or ch.dec_ref is None:
                raise RuntimeError(f"layer {i}: evaluate/advance without collect")
            if layer is None:
                enc, dec = ch.enc_ref.float(), ch.dec_ref.float()
            else:
                enc, dec = self._run(layer, ch, ch.enc.float(), ch.dec.float())
                for key, out, ref, x, s in (("enc", enc, ch.enc_ref, ch.enc, layer.encoder_layer_scalar),
                                            ("dec", dec, ch.dec_ref, ch.dec, layer.layer_scalar)):
                    ref = ref.double()
                    num[key] += float((out.double() - ref).square().sum())
                    den[key] += float(ref.square().sum())
                    den[key + "d"] += float((ref - x.double() * s.double()).square().sum())
            if advance:
                ch.enc, ch.dec = enc.to(self.options.state_dtype), dec.to(self.options.state_dtype)
                ch.enc_ref = ch.dec_ref = None
        return LayerError(i, _rel(num["enc"], den["enc"]), _rel(num["dec"], den["dec"]),
                          _rel(num["enc"], den["encd"]), _rel(num["dec"], den["decd"]))

    def hidden_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Current per-sample hidden states (encoder [P, H], decoder [C, H]) in sample order (tests, tools)."""
        enc, dec = [], []
        for ch in self.chunks:
            enc += list(torch.split(ch.enc, ch.enc_lens))
            dec += list(torch.split(ch.dec, ch.dec_lens))
        return enc, dec

    def activation_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ch in self.chunks for t in (ch.enc, ch.dec) if t is not None)


__all__ = ["RawReader", "InputStats", "CalibrationStats", "F32Linear", "CalibExperts", "build_layer",
           "layer_tensor_names", "CalibOptions", "LayerError", "StreamingCalibrator", "STATS_FILE"]
