"""DiffusionGemma configuration, read strictly from an HF checkpoint's `config.json` and `generation_config.json`.

Two spellings of the per-layer attention geometry exist in the wild:
- the published checkpoint: `global_head_dim`, `num_global_key_value_heads`, `layer_types`;
- transformers >= 5.x re-saves: `per_layer_config` = {"05": {"head_dim": 512, "num_key_value_heads": 2}, ...}.
Both resolve to the same `LayerGeometry` per layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class RopeParams:
    rope_type: str  # "default" or "proportional"
    theta: float
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class LayerGeometry:
    layer_type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    has_v_proj: bool  # False on full layers: V is the scale-less norm of the raw K projection (k == v)

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampler defaults, from `generation_config.json` (HF global defaults where the file is silent)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2


@dataclass(frozen=True)
class DGConfig:
    # legend: V vocab, H hidden, I dense/SC intermediate, E experts, Ie expert intermediate
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    layers: tuple[LayerGeometry, ...]
    sliding_window: int
    rope: dict[str, RopeParams]
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    hidden_activation: str
    final_logit_softcapping: float | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    canvas_length: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    source: str = "<dict>"

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @property
    def full_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.layers) if not g.is_sliding)

    @property
    def sliding_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.layers) if g.is_sliding)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> DGConfig:
        """Read `config.json` (+ `generation_config.json` if present) from a checkpoint directory."""
        path = Path(path)
        if path.is_file() and path.suffix != ".json":
            with open(path, "rb") as f:
                kind = "a GGUF file" if f.read(4) == b"GGUF" else "a file"
            raise ConfigError(f"{path}: is {kind}; expected an HF checkpoint directory (with config.json)")
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file}: no config.json found (is this an HF checkpoint directory?)")
        root = _read_json(cfg_file)
        gen = None
        gen_file = cfg_file.parent / "generation_config.json"
        if gen_file.is_file():
            gen = _read_json(gen_file)
        return cls.from_dict(root, gen, source=str(cfg_file), gen_source=str(gen_file))

    @classmethod
    def from_dict(
        cls,
        root: dict[str, Any],
        generation: dict[str, Any] | None = None,
        source: str = "config.json",
        gen_source: str = "generation_config.json",
    ) -> DGConfig:
        r = _Reader(root, source)
        arch = root.get("architectures") or []
        model_type = root.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'diffusion_gemma' "
                f"(architectures: {arch}); dgemma only runs DiffusionGemmaForBlockDiffusion checkpoints"
            )
        tc = r.get("text_config", dict)
        t = _Reader(tc, f"{source} [text_config]")

        n_layers = t.get("num_hidden_layers", int, positive=True)
        n_heads = t.get("num_attention_heads", int, positive=True)
        n_kv = t.get("num_key_value_heads", int, positive=True)
        head_dim = t.get("head_dim", int, positive=True)
        hidden = t.get("hidden_size", int, positive=True)

        layer_types = t.get("layer_types", list)
        if len(layer_types) != n_layers:
            raise ConfigError(f"{t.src}: layer_types has {len(layer_types)} entries, num_hidden_layers is {n_layers}")
        for i, lt in enumerate(layer_types):
            if lt not in (SLIDING, FULL):
                raise ConfigError(f"{t.src}: layer_types[{i}] = {lt!r}, expected {SLIDING!r} or {FULL!r}")
        if layer_types[-1] != FULL:
            # HF forces the last layer to full attention with a warning; a checkpoint must already say so.
            raise ConfigError(f"{t.src}: the last entry of layer_types must be {FULL!r}, got {layer_types[-1]!r}")

        layers = _layer_geometry(t, layer_types, head_dim, n_kv, n_heads)

        rope_raw = t.get("rope_parameters", dict)
        rope: dict[str, RopeParams] = {}
        for lt in sorted(set(layer_types)):
            if lt not in rope_raw or not isinstance(rope_raw[lt], dict):
                raise ConfigError(f"{t.src}: rope_parameters[{lt!r}] is missing or not an object")
            p = _Reader(rope_raw[lt], f"{t.src} rope_parameters[{lt!r}]")
            rtype = p.get("rope_type", str)
            if rtype not in ("default", "proportional"):
                raise ConfigError(f"{p.src}: rope_type {rtype!r} is not supported (default, proportional)")
            prf = p.get("partial_rotary_factor", (int, float), default=1.0)
            if not 0.0 < float(prf) <= 1.0:
                raise ConfigError(f"{p.src}: partial_rotary_factor must be in (0, 1], got {prf}")
            if "factor" in rope_raw[lt] and float(rope_raw[lt]["factor"]) != 1.0:
                raise ConfigError(f"{p.src}: rope 'factor' != 1 is not supported")
            rope[lt] = RopeParams(rtype, float(p.get("rope_theta", (int, float), positive=True)), float(prf))

        act = t.get("hidden_activation", str, default="gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh",):
            raise ConfigError(f"{t.src}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
        if t.raw.get("attention_bias", False):
            raise ConfigError(f"{t.src}: attention_bias=true is not supported (DiffusionGemma has no biases)")
        if t.raw.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{t.src}: use_bidirectional_attention='all' is not supported (encoder must be causal)")

        n_exp = t.get("num_experts", int, positive=True)
        top_k = t.get("top_k_experts", int, positive=True)
        if top_k > n_exp:
            raise ConfigError(f"{t.src}: top_k_experts ({top_k}) > num_experts ({n_exp})")
        softcap = t.raw.get("final_logit_softcapping", 30.0)
        if softcap is not None and (not isinstance(softcap, (int, float)) or softcap <= 0):
            raise ConfigError(f"{t.src}: final_logit_softcapping must be a positive number or null, got {softcap!r}")

        eos_root = root.get("eos_token_id", tc.get("eos_token_id", 1))
        eos = _id_list(eos_root, f"{source}: eos_token_id")
        tie = bool(root.get("tie_word_embeddings", True))
        if not tie:
            raise ConfigError(f"{source}: tie_word_embeddings=false is not supported (the encoder/decoder tie is required)")

        vocab = t.get("vocab_size", int, positive=True)
        canvas = r.get("canvas_length", int, positive=True, default=256)
        window = t.get("sliding_window", int, positive=True)
        if window < 2:
            raise ConfigError(f"{t.src}: sliding_window must be >= 2, got {window}")
        pad = root.get("pad_token_id", tc.get("pad_token_id", 0))
        bos = root.get("bos_token_id", tc.get("bos_token_id", 2))
        for name, v in (("pad_token_id", pad), ("bos_token_id", bos)):
            if v is not None and (not isinstance(v, int) or not 0 <= v < vocab):
                raise ConfigError(f"{source}: {name} = {v!r} is not a token id below vocab_size {vocab}")
        for v in eos:
            if not 0 <= v < vocab:
                raise ConfigError(f"{source}: eos_token_id {v} is not below vocab_size {vocab}")

        gen_defaults = _generation_defaults(generation, gen_source, eos, pad, bos)
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", int, positive=True),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            layers=layers,
            sliding_window=window,
            rope=rope,
            num_experts=n_exp,
            top_k_experts=top_k,
            moe_intermediate_size=t.get("moe_intermediate_size", int, positive=True),
            hidden_activation=act,
            final_logit_softcapping=float(softcap) if softcap is not None else None,
            rms_norm_eps=float(t.get("rms_norm_eps", (int, float), positive=True, default=1e-6)),
            max_position_embeddings=t.get("max_position_embeddings", int, positive=True, default=131072),
            tie_word_embeddings=tie,
            canvas_length=canvas,
            pad_token_id=pad,
            bos_token_id=bos,
            eos_token_ids=eos,
            generation=gen_defaults,
            source=source,
        )


# ---- helpers ---------------------------------------------------------------------------------------


def _read_json(f: Path) -> dict[str, Any]:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


_MISSING = object()


class _Reader:
    """Typed, strict access to one JSON object; every error names the field and the file."""

    def __init__(self, raw: dict[str, Any], src: str):
        self.raw, self.src = raw, src

    def get(self, key: str, typ: Any, positive: bool = False, default: Any = _MISSING) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if default is _MISSING:
                raise ConfigError(f"{self.src}: required field {key!r} is missing")
            return default
        v = self.raw[key]
        types = typ if isinstance(typ, tuple) else (typ,)
        # bool is an int in Python; a config that says `true` for a size is malformed
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            names = "/".join(t.__name__ for t in types)
            raise ConfigError(f"{self.src}: field {key!r} must be {names}, got {type(v).__name__} {v!r}")
        if positive and not v > 0:
            raise ConfigError(f"{self.src}: field {key!r} must be > 0, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{self.src}: field {key!r} must be finite, got {v!r}")
        return v


def _layer_geometry(
    t: _Reader, layer_types: list[str], head_dim: int, n_kv: int, n_heads: int
) -> tuple[LayerGeometry, ...]:
    per_layer: dict[int, dict[str, Any]] = {}
    if "per_layer_config" in t.raw and t.raw["per_layer_config"] is not None:
        plc = t.raw["per_layer_config"]
        if not isinstance(plc, dict):
            raise ConfigError(f"{t.src}: per_layer_config must be an object, got {type(plc).__name__}")
        for k, v in plc.items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                raise ConfigError(f"{t.src}: per_layer_config key {k!r} is not a layer index") from None
            if not 0 <= idx < len(layer_types) or not isinstance(v, dict):
                raise ConfigError(f"{t.src}: per_layer_config[{k!r}] is out of range or not an object")
            per_layer[idx] = v
    else:
        g_hd = t.get("global_head_dim", int, positive=True, default=512)
        g_kv = t.raw.get("num_global_key_value_heads")
        # HF: attention_k_eq_v gates the kv-head override; absent means ungated (override applies)
        if not t.raw.get("attention_k_eq_v", True):
            g_kv = None
        for i, lt in enumerate(layer_types):
            if lt == FULL:
                per_layer[i] = {"head_dim": g_hd}
                if g_kv is not None:
                    per_layer[i]["num_key_value_heads"] = g_kv
    out = []
    for i, lt in enumerate(layer_types):
        ov = _Reader(per_layer.get(i, {}), f"{t.src} layer {i}")
        hd = ov.get("head_dim", int, positive=True, default=head_dim)
        kv = ov.get("num_key_value_heads", int, positive=True, default=n_kv)
        if n_heads % kv:
            raise ConfigError(f"{t.src}: layer {i}: num_attention_heads {n_heads} not divisible by kv heads {kv}")
        out.append(LayerGeometry(lt, hd, kv, has_v_proj=(lt == SLIDING)))
    return tuple(out)


def _id_list(v: Any, what: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(v)
    raise ConfigError(f"{what} must be an int or a non-empty list of ints, got {v!r}")


def _generation_defaults(
    gen: dict[str, Any] | None, src: str, eos: tuple[int, ...], pad: int | None, bos: int | None
) -> GenerationDefaults:
    d = GenerationDefaults(eos_token_ids=eos, pad_token_id=pad, bos_token_id=bos)
    if gen is None:
        return d
    g = _Reader(gen, src)
    sampler = gen.get("sampler_config") or {}
    if not isinstance(sampler, dict):
        raise ConfigError(f"{src}: sampler_config must be an object, got {sampler!r}")
    cls_name = sampler.get("_cls_name", "EntropyBoundSamplerConfig")
    if cls_name != "EntropyBoundSamplerConfig":
        raise ConfigError(f"{src}: sampler_config._cls_name {cls_name!r} is not supported (EntropyBoundSamplerConfig)")
    eb = _Reader(sampler, f"{src} sampler_config").get("entropy_bound", (int, float), positive=True, default=d.entropy_bound)
    gen_eos = _id_list(gen["eos_token_id"], f"{src}: eos_token_id") if gen.get("eos_token_id") is not None else eos
    out = GenerationDefaults(
        max_new_tokens=g.get("max_new_tokens", int, positive=True, default=d.max_new_tokens),
        max_denoising_steps=g.get("max_denoising_steps", int, positive=True, default=d.max_denoising_steps),
        t_min=float(g.get("t_min", (int, float), default=d.t_min)),
        t_max=float(g.get("t_max", (int, float), default=d.t_max)),
        entropy_bound=float(eb),
        stability_threshold=g.get("stability_threshold", int, default=d.stability_threshold),
        confidence_threshold=float(g.get("confidence_threshold", (int, float), positive=True, default=d.confidence_threshold)),
        eos_token_ids=gen_eos,
        pad_token_id=gen.get("pad_token_id", pad),
        bos_token_id=gen.get("bos_token_id", bos),
    )
    if out.t_min < 0 or out.t_max <= out.t_min:
        raise ConfigError(f"{src}: need 0 <= t_min < t_max, got t_min={out.t_min} t_max={out.t_max}")
    if out.stability_threshold < 0:
        raise ConfigError(f"{src}: stability_threshold must be >= 0, got {out.stability_threshold}")
    return out
