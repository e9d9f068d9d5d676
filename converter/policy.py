"""The one place that decides each checkpoint tensor's storage format for an NVFP4 conversion.

Presets (nvfp4.md §4, §7):
- `experts`: NVIDIA's published recipe: routed experts NVFP4, everything else bf16 (scenario B, ~17.7 GB).
- `default`: experts, attention q/k/v/o and dense MLP NVFP4; embedding (= tied lm_head), router, norms,
  scalars and self-conditioning bf16 (scenario C, ~15.3 GB).

Sizes are counted as written in the ModelOpt layout: per NVFP4 linear N*K/2 packed bytes + N*K/16 E4M3 scale
bytes + 4 bytes `weight_scale_2` + 4 bytes `input_scale`; a stacked expert tensor [E, N, K] is E linears on
disk (HF's fused gate_up_proj [E, 2I, H] is 2E: gate and up are separate per-expert linears).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.config import DGConfig
from ..runtime.errors import ConfigError
from ..runtime.hf_names import TensorSpec, checkpoint_tensors
from .nvfp4 import BLOCK

NVFP4 = "nvfp4"
BF16 = "bf16"

PRESETS: dict[str, frozenset[str]] = {
    # components whose 2-D / stacked weights become NVFP4; everything else stays bf16
    "experts": frozenset({"experts"}),
    "default": frozenset({"experts", "attention", "dense_mlp"}),
}
KNOWN_COMPONENTS = frozenset(
    {"embedding", "attention", "dense_mlp", "experts", "router", "norms", "scalars", "self_conditioning"}
)
_BYTES = {BF16: 2, "f32": 4}
_GLOBAL_FLOATS_PER_LINEAR = 2  # weight_scale_2 + input_scale, fp32 each


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ConfigError(f"unknown NVFP4 preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")


def precision_for(spec: TensorSpec, preset: str) -> str:
    """"nvfp4" or "bf16" for one checkpoint tensor under a preset.

    Only weight matrices ([N, K] or [E, N, K]) with K a multiple of 16 can be NVFP4; `router.proj`, norms,
    scalars and 1-D tensors are never quantized."""
    check_preset(preset)
    if spec.component not in KNOWN_COMPONENTS:
        raise ConfigError(f"{spec.name}: unknown tensor component {spec.component!r}")
    if spec.component not in PRESETS[preset]:
        return BF16
    if len(spec.shape) not in (2, 3) or spec.shape[-1] % BLOCK != 0:
        return BF16  # e.g. a tiny test model with an odd width: stays bf16 rather than failing
    return NVFP4


def linears_on_disk(spec: TensorSpec) -> int:
    """How many separate quantized linears a tensor becomes in the ModelOpt layout."""
    if len(spec.shape) == 3:
        E = spec.shape[0]
        return 2 * E if spec.name.endswith("gate_up_proj") else E
    return 1


def nvfp4_bytes(spec: TensorSpec) -> int:
    """Bytes of one tensor stored as NVFP4: packed data + E4M3 block scales + fp32 globals."""
    n = spec.numel
    return n // 2 + n // BLOCK + 4 * _GLOBAL_FLOATS_PER_LINEAR * linears_on_disk(spec)


def tensor_bytes(spec: TensorSpec, fmt: str) -> int:
    if fmt == NVFP4:
        return nvfp4_bytes(spec)
    if fmt not in _BYTES:
        raise ConfigError(f"{spec.name}: unknown storage format {fmt!r}")
    return spec.numel * _BYTES[fmt]


@dataclass(frozen=True)
class PlanRow:
    component: str
    fmt: str  # "nvfp4" | "bf16"
    tensors: int
    params: int
    bytes: int
    bf16_bytes: int  # the same tensors in bf16, for the saving column


def tensor_plan(cfg: DGConfig, preset: str) -> list[tuple[TensorSpec, str]]:
    """(spec, format) for every text tensor of the checkpoint (vision is not converted)."""
    check_preset(preset)
    return [(s, precision_for(s, preset)) for s in checkpoint_tensors(cfg)]


def plan_table(cfg: DGConfig, preset: str) -> list[PlanRow]:
    """Per-(component, format) totals, in the component order of the checkpoint tensor list."""
    acc: dict[tuple[str, str], list[int]] = {}
    for spec, fmt in tensor_plan(cfg, preset):
        row = acc.setdefault((spec.component, fmt), [0, 0, 0, 0])
        row[0] += 1
        row[1] += spec.numel
        row[2] += tensor_bytes(spec, fmt)
        row[3] += spec.numel * 2
    return [PlanRow(c, f, *v) for (c, f), v in acc.items()]


def plan_total_bytes(rows: list[PlanRow]) -> int:
    return sum(r.bytes for r in rows)


def format_plan(rows: list[PlanRow], title: str = "") -> str:
    """A fixed-width text table of the plan (decimal GB, GiB in the total line)."""
    lines = [title] if title else []
    lines.append(f"{'component':<18} {'format':<6} {'tensors':>7} {'params':>15} {'size GB':>9} {'bf16 GB':>9}")
    for r in rows:
        lines.append(f"{r.component:<18} {r.fmt:<6} {r.tensors:>7} {r.params:>15,} {r.bytes / 1e9:>9.3f} "
                     f"{r.bf16_bytes / 1e9:>9.3f}")
    total = plan_total_bytes(rows)
    bf16 = sum(r.bf16_bytes for r in rows)
    params = sum(r.params for r in rows)
    lines.append(f"{'total':<18} {'':<6} {sum(r.tensors for r in rows):>7} {params:>15,} {total / 1e9:>9.3f} "
                 f"{bf16 / 1e9:>9.3f}   ({total / 2**30:.2f} GiB, {8 * total / params:.2f} bit/weight)")
    return "\n".join(lines)


def describe_plan(cfg: DGConfig, preset: str) -> str:
    """The printout shown before converting."""
    return format_plan(plan_table(cfg, preset), title=f"NVFP4 plan, preset {preset!r} (text weights only):")
