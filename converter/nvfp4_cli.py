"""`dgemma-convert nvfp4 SRC DST`: the click command; all work happens in `nvfp4_export.convert_nvfp4`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ..runtime.config import DGConfig
from ..runtime.errors import DGemmaError
from .nvfp4_export import LAYOUTS, SCALE_SEARCHES, ConvertOptions, ConvertReport, convert_nvfp4
from .policy import PRESETS, describe_plan


def _summary(r: ConvertReport) -> str:
    lines = [f"{'layer':>5} {'enc err':>8} {'dec err':>8} {'enc upd':>8} {'dec upd':>8} {'sec':>7}"]
    for e, s in zip(r.layer_errors, r.layer_seconds):
        lines.append(f"{e['layer']:>5} {e['enc_rel']:>8.4f} {e['dec_rel']:>8.4f} {e['enc_rel_delta']:>8.4f} "
                     f"{e['dec_rel_delta']:>8.4f} {s:>7.1f}")
    lines.append("(relative Frobenius error of each quantized layer's output vs bf16 on the same input; "
                 "'upd' = error relative to the layer's own update)")
    if r.starved_experts:
        lines.append("experts without calibration tokens (weight-only scale choice): "
                     + "; ".join(f"layer {i}: {v}" for i, v in sorted(r.starved_experts.items())))
    else:
        lines.append("every expert received calibration tokens")
    lines.append(f"wrote {r.bytes_written / 1e9:.3f} GB of tensors to {r.dst} in {r.seconds:.1f} s")
    return "\n".join(lines)


@click.command("nvfp4", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="experts", show_default=True,
              help="experts: routed experts NVFP4 (NVIDIA's recipe); default: also attention and dense MLP.")
@click.option("--calib", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Calibration text (.txt paragraphs or .jsonl prompt/continuation); default: the packaged set.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None, help="Use only the first N samples.")
@click.option("--scale-search", type=click.Choice(SCALE_SEARCHES), default="mse", show_default=True,
              help="rtn: ModelOpt's max scales; mse: block scales minimizing the importance-weighted error.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="modelopt", show_default=True,
              help="Checkpoint layout: ModelOpt (vLLM/TensorRT-LLM) or compressed-tensors (llm-compressor).")
@click.option("--force", is_flag=True, help="Replace DST if it exists (only after the new one is complete).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the canvas noise in calibration.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def nvfp4(src: Path, dst: Path, preset: str, calib: Path | None, calib_samples: int | None, scale_search: str,
          layout: str, force: bool, seed: int, quiet: bool) -> None:
    """Convert the bf16 DiffusionGemma checkpoint SRC to an NVFP4 checkpoint DST (written atomically)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = ConvertOptions(preset=preset, layout=layout, scale_search=scale_search, calib=calib,
                                 calib_samples=calib_samples, force=force, seed=seed, progress=not quiet)
        cfg = DGConfig.from_pretrained(src)
        click.echo(describe_plan(cfg, preset))
        report = convert_nvfp4(src, dst, options)
    except DGemmaError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    click.echo(_summary(report))
