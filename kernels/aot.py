"""Ahead-of-time compilation of every dgemma Triton kernel for NVIDIA targets, without a GPU.

Each :class:`KernelSpec` names a kernel and example arguments at the real DiffusionGemma-26B shapes, with the tile
sizes the public wrappers pick there. :func:`compile_spec` specializes them the way a JIT launch would (unit ints
become constants, ints divisible by 16 and all pointers get the 16-divisibility hint) and calls
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; :func:`analyze` adds ptxas ``-v`` resource
usage (Triton's bundled ptxas) and PTX instruction checks. Used by ``tests/test_kernels_aot.py`` and
``scripts/kernel_report.py``.
"""
from __future__ import annotations

import importlib
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._common import HAVE_TRITON, KernelUnavailableError

log = logging.getLogger(__name__)

TARGETS = (89, 90, 120)  # RTX 4090, H100, RTX 5090


@dataclass(frozen=True)
class Ptr:
    """A pointer argument of the given Triton element type ("bf16", "u8", "fp32", "i32", ...)."""

    ty: str


@dataclass(frozen=True)
class KernelSpec:
    name: str  # report label
    module: str  # dgemma.kernels submodule holding the kernel
    kernel: str  # attribute name of the @triton.jit function
    args: dict[str, Any]  # every parameter: Ptr, int, float, or a constexpr value (for constexpr parameters)
    num_warps: int = 4
    num_stages: int = 3
    expect_mma: bool = False  # the kernel has a tl.dot: PTX must hold tensor-core mma / wgmma
    expect_wide_loads: bool = True  # some global loads should be 16 bytes wide (ld.global.v4 or 16-byte cp.async)
    notes: str = ""


@dataclass
class KernelReport:
    name: str
    cc: int
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0  # bytes, Triton's static + dynamic shared memory
    mma: int = 0  # count of mma.sync / wgmma instructions in the PTX
    ld_v4: int = 0  # count of 16-byte vector global loads (ld.global[.nc].v4.*)
    cp_async_16: int = 0  # count of 16-byte cp.async global->shared copies
    ok: bool = True
    problems: list[str] = field(default_factory=list)


def _jit_fn(spec: KernelSpec) -> Any:
    mod = importlib.import_module(f"dgemma.kernels.{spec.module}")
    return getattr(mod, spec.kernel)


def _signature(fn: Any, args: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    attrs: dict[tuple[int], list] = {}
    names = [p.name for p in fn.params]
    missing = set(names) - set(args)
    extra = set(args) - set(names)
    if missing or extra:
        raise ValueError(f"{fn.__name__}: spec args missing {sorted(missing)}, unknown {sorted(extra)}")
    for i, p in enumerate(fn.params):
        v = args[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = v
        elif isinstance(v, Ptr):
            sig[p.name] = "*" + v.ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            raise ValueError(f"{fn.__name__}.{p.name}: bool for a non-constexpr parameter")
        elif isinstance(v, int):
            if v == 1:  # a JIT launch specializes unit ints (strides) into constants
                sig[p.name] = "constexpr"
                consts[p.name] = 1
            else:
                sig[p.name] = "i64" if not -(2**31) <= v < 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise ValueError(f"{fn.__name__}.{p.name}: unsupported example value {v!r}")
    return sig, consts, attrs


def compile_spec(spec: KernelSpec, cc: int) -> Any:
    """Compile one spec for sm_<cc>; returns Triton's CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin)."""
    if not HAVE_TRITON:
        raise KernelUnavailableError("triton is not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_fn(spec)
    sig, consts, attrs = _signature(fn, spec.args)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)


def _ptxas(cc: int) -> tuple[str, str]:
    """(path of the ptxas Triton itself uses for sm_<cc>, its -arch name)."""
    from triton.backends.nvidia import compiler as nv

    return nv.get_ptxas(cc).path, nv.sm_arch_from_capability(cc)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_usage(ptx: str, cc: int) -> dict[str, int]:
    """Run ``ptxas -v`` on the PTX; returns registers, spill_stores, spill_loads, stack (bytes)."""
    exe, arch = _ptxas(cc)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        # the flags Triton's own make_cubin passes (triton/backends/nvidia/compiler.py, 3.9), so the numbers
        # describe the cubin a JIT launch would load
        cmd = [exe, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{cc}: {out[-2000:]}")
    regs = _RE_REGS.search(out)
    spill = _RE_SPILL.search(out)
    stack = _RE_STACK.search(out)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_stores": int(spill.group(1)) if spill else 0,
        "spill_loads": int(spill.group(2)) if spill else 0,
        "stack": int(stack.group(1)) if stack else 0,
    }


def ptx_features(ptx: str) -> dict[str, int]:
    return {
        "mma": len(re.findall(r"\b(?:mma\.sync|wgmma\.mma_async)\b", ptx)),
        "ld_v4": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.(?:b32|u32|f32|s32)\b", ptx)),
        "cp_async_16": len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*,\s*(?:0x10|16)\s*(?:,|;)", ptx)),
    }


def analyze(spec: KernelSpec, cc: int) -> KernelReport:
    """Compile + ptxas -v + PTX checks for one (kernel, target)."""
    rep = KernelReport(spec.name, cc)
    try:
        ck = compile_spec(spec, cc)
    except Exception as exc:  # report, do not crash the whole table
        rep.ok = False
        rep.problems.append(f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return rep
    ptx = ck.asm["ptx"]
    rep.shared = int(getattr(ck.metadata, "shared", 0) or 0)
    for k, v in ptx_features(ptx).items():
        setattr(rep, k, v)
    try:
        for k, v in ptxas_usage(ptx, cc).items():
            setattr(rep, k, v)
    except Exception as exc:
        rep.ok = False
        rep.problems.append(f"ptxas -v failed: {exc}")
    if rep.spill_stores or rep.spill_loads:
        rep.ok = False
        rep.problems.append(f"spills: {rep.spill_stores} B stores / {rep.spill_loads} B loads")
    if spec.expect_mma and rep.mma == 0:
        rep.ok = False
        rep.problems.append("no tensor-core mma in PTX")
    if spec.expect_wide_loads and rep.ld_v4 == 0 and rep.cp_async_16 == 0:
        rep.ok = False
        rep.problems.append("no 16-byte global loads in PTX")
    return rep


# ---------------------------------------------------------------------------------------------------------------
# specs at the real DiffusionGemma-26B-A4B shapes
# ---------------------------------------------------------------------------------------------------------------

CANVAS = 256
HIDDEN = 2816
MOE_I = 704
EXPERTS = 128
TOPK = 8
VOCAB = 262144


def _tl_dtype_name(name: str) -> Any:
    import triton.language as tl

    return {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[name]


def kernel_specs() -> list[KernelSpec]:
    """One spec per shipped kernel instantiation (tiles as the wrappers pick them at these shapes)."""
    from .fused_moe import _moe_config
    from .nvfp4_gemm import _gemm_config

    bf16 = _tl_dtype_name("bf16")
    specs: list[KernelSpec] = []

    # --- W4A16 GEMM: q_proj (2816 -> 4096) at the canvas, the same at M = 16, dense down_proj (2112 -> 2816) ----
    for label, m, n, k in (("m256_n4096_k2816", CANVAS, 4096, HIDDEN), ("m16_n4096_k2816", 16, 4096, HIDDEN),
                           ("m256_n2816_k2112", CANVAS, HIDDEN, 2112)):  # fmt: skip
        bm, bn, bk, warps, stages = _gemm_config(m, n, k)
        specs.append(KernelSpec(
            f"nvfp4_gemm[{label}]", "_nvfp4_gemm_triton", "nvfp4_gemm_kernel",
            dict(x_ptr=Ptr("bf16"), w_ptr=Ptr("u8"), s_ptr=Ptr("u8"), s2_ptr=Ptr("fp32"), y_ptr=Ptr("bf16"),
                 M=m, N=n, K=k, stride_xm=k, stride_xk=1, stride_wn=k // 2, stride_sn=k // 16,
                 stride_ym=n, stride_yn=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0,
                 DOT_DTYPE=bf16),
            warps, stages, expect_mma=True, notes=_packed_note(bk),
        ))  # fmt: skip

    # --- fused MoE, NVFP4 and dense bf16 experts ------------------------------------------------------------------
    p = CANVAS * TOPK
    bm, bn, bk1, bk2, warps, stages = _moe_config(p, EXPERTS, HIDDEN, MOE_I)
    for fmt in ("nvfp4", "bf16"):
        nv = fmt == "nvfp4"
        wty = "u8" if nv else "bf16"
        kdiv = 2 if nv else 1
        specs.append(KernelSpec(
            f"moe_gate_up[{fmt}]", "_fused_moe_triton", "moe_gate_up_kernel",
            dict(x_ptr=Ptr("bf16"), w_ptr=Ptr(wty), s_ptr=Ptr(wty if not nv else "u8"), gs_ptr=Ptr("fp32"),
                 h_ptr=Ptr("bf16"), sorted_ids_ptr=Ptr("i32"), expert_ids_ptr=Ptr("i32"), num_post_ptr=Ptr("i32"),
                 P=p, I=MOE_I, H=HIDDEN, TOPK=TOPK, stride_xt=HIDDEN, stride_we=2 * MOE_I * HIDDEN // kdiv,
                 stride_wn=HIDDEN // kdiv, stride_se=2 * MOE_I * HIDDEN // 16, stride_sn=HIDDEN // 16,
                 stride_hp=MOE_I, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk1, W_NVFP4=nv, DOT_DTYPE=bf16),
            warps, stages, expect_mma=True, notes=_packed_note(bk1) if nv else "",
        ))  # fmt: skip
        specs.append(KernelSpec(
            f"moe_down[{fmt}]", "_fused_moe_triton", "moe_down_kernel",
            dict(h_ptr=Ptr("bf16"), w_ptr=Ptr(wty), s_ptr=Ptr(wty if not nv else "u8"), gs_ptr=Ptr("fp32"),
                 rw_ptr=Ptr("fp32"), out_ptr=Ptr("bf16"), sorted_ids_ptr=Ptr("i32"), expert_ids_ptr=Ptr("i32"),
                 num_post_ptr=Ptr("i32"), P=p, H=HIDDEN, I=MOE_I, stride_hp=MOE_I,
                 stride_we=HIDDEN * MOE_I // kdiv, stride_wn=MOE_I // kdiv, stride_se=HIDDEN * MOE_I // 16,
                 stride_sn=MOE_I // 16, stride_op=HIDDEN, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk2, W_NVFP4=nv,
                 DOT_DTYPE=bf16),
            warps, stages, expect_mma=True, notes=_packed_note(bk2) if nv else "",
        ))  # fmt: skip

    # --- sampler: raw bf16 lm_head logits with softcap + bf16 processed output; fp32 softcapped logits --------------
    splits, split_len = 4, VOCAB // 4  # an H100 (132 SMs) at M = 256 gets 3 ranges of 22 tiles; any value compiles
    for label, lty, cap, write in (("bf16_softcap_write", "bf16", True, True), ("fp32", "fp32", False, False)):
        specs.append(KernelSpec(
            f"sampler_partial[{label}]", "_sampler_triton", "sampler_partial_kernel",
            dict(logits_ptr=Ptr(lty), proc_ptr=Ptr("bf16"), part_m_ptr=Ptr("fp32"), part_s_ptr=Ptr("fp32"),
                 part_b_ptr=Ptr("fp32"), part_i_ptr=Ptr("i32"), V=VOCAB, stride_lm=VOCAB, stride_pm=VOCAB,
                 t=0.8, cap=30.0, SPLIT_LEN=split_len, NUM_SPLITS=splits, BLOCK_V=4096, HAS_SOFTCAP=cap,
                 WRITE_PROCESSED=write),
            8, 1,
        ))  # fmt: skip
    specs.append(KernelSpec(
        "sampler_finish[bf16_softcap]", "_sampler_triton", "sampler_finish_kernel",
        dict(logits_ptr=Ptr("bf16"), part_m_ptr=Ptr("fp32"), part_s_ptr=Ptr("fp32"), part_b_ptr=Ptr("fp32"),
             part_i_ptr=Ptr("i32"), u_ptr=Ptr("fp32"), ent_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"),
             amax_ptr=Ptr("i64"), sample_ptr=Ptr("i64"), V=VOCAB, stride_lm=VOCAB, t=0.8, cap=30.0,
             SPLIT_LEN=split_len, NUM_SPLITS=splits, BLOCK_S=16, BLOCK_V=4096, HAS_SOFTCAP=True),
        8, 1,
    ))  # fmt: skip

    # --- self-conditioning soft embedding ----------------------------------------------------------------------
    specs.append(KernelSpec(
        "row_lse[bf16]", "_sampler_triton", "row_lse_kernel",
        dict(logits_ptr=Ptr("bf16"), lse_ptr=Ptr("fp32"), V=VOCAB, stride_lm=VOCAB, BLOCK_V=4096), 8, 1,
    ))  # fmt: skip
    specs.append(KernelSpec(
        "soft_embed[bf16]", "_sampler_triton", "soft_embed_kernel",
        dict(logits_ptr=Ptr("bf16"), lse_ptr=Ptr("fp32"), emb_ptr=Ptr("bf16"), part_ptr=Ptr("fp32"), M=CANVAS,
             V=VOCAB, H=HIDDEN, stride_lm=VOCAB, stride_ev=HIDDEN, stride_ps=CANVAS * HIDDEN, stride_pm=HIDDEN,
             SPLIT_LEN=VOCAB // 8, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, DOT_DTYPE=bf16),
        8, 3, expect_mma=True,
    ))  # fmt: skip

    # --- RMSNorm: hidden rows with weight + residual, head-dim rows without weight ------------------------------
    for label, d, w, r in (("d2816_w_res", HIDDEN, True, True), ("d256_noscale", 256, False, False)):
        block = 1 << (d - 1).bit_length()
        specs.append(KernelSpec(
            f"rmsnorm[{label}]", "_rmsnorm_triton", "rmsnorm_kernel",
            dict(x_ptr=Ptr("bf16"), w_ptr=Ptr("bf16"), res_ptr=Ptr("bf16"), y_ptr=Ptr("bf16"), D=d,
                 stride_xr=d, stride_rr=d, stride_yr=d, eps=1e-6, BLOCK_D=block, HAS_WEIGHT=w, HAS_RESIDUAL=r),
            min(16, max(1, block // 512)), 1, expect_wide_loads=d >= 1024,
        ))  # fmt: skip

    specs.extend(_gguf_specs())
    return specs


def _packed_note(block_k: int) -> str:
    if block_k >= 128:
        return f"BLOCK_K={block_k}: packed weights read as int32 words (16-byte cp.async)"
    return f"BLOCK_K={block_k}: packed weights read as bytes (8-byte cp.async; words would give 4-byte copies)"


def _gguf_specs() -> list[KernelSpec]:
    from .gguf_dequant import aot_specs

    return aot_specs()
