"""`dgemma-convert gguf SRC OUT.gguf --type ...`: the CLI over `gguf_export.export_gguf`."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import DGemmaError

from .gguf_export import GGUFExportOptions, export_gguf
from .gguf_mix import MIXES, format_type_table

_TYPE_HELP = (
    "bf16/f16: unquantized. q8_0, q4_k_m, q5_k_m, q6_k, mxfp4_moe: llama-quantize's presets (same type per "
    "tensor as llama.cpp picks). nvfp4: NVFP4 experts (split gate/up with per-expert .scale), Q8_0 elsewhere."
)
_CALIB_HELP = (
    "Calibration statistics (calibration_stats.safetensors: per-linear-input mean squares) used as importance "
    "by the Q4_K/Q5_K/Q6_K/Q5_0/NVFP4 searches. A calibration TEXT or JSONL file is accepted but the GGUF "
    "converter does not run calibration itself: importance then comes from the weights unless a statistics "
    "file is given. Without --calib importance comes from the weights."
)


@click.command("gguf", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("out", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--type", "mix", type=click.Choice(list(MIXES), case_sensitive=False), required=True, help=_TYPE_HELP)
@click.option("--calib", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help=_CALIB_HELP)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--dry-run", is_flag=True, help="Print the tensor type table from config.json alone; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def gguf(src: Path, out: Path, mix: str, calib: Path | None, force: bool, dry_run: bool, quiet: bool) -> None:
    """Write SRC (an HF DiffusionGemma checkpoint directory) as OUT.gguf in llama.cpp's `diffusion-gemma` layout
    (PR #24423 / Unsloth): all metadata keys, the gemma4 tokenizer and chat template, exactly the 692-tensor
    set of the 26B model (7 + 23 per sliding + 22 per full layer).

    The file loads in `dgemma.load` / `dgemma-run --model OUT.gguf`; llama.cpp needs a build with PR #24423
    (mainline llama.cpp does not know the `diffusion-gemma` architecture yet). Tensors are streamed one at a
    time; the output is written to a temporary file and renamed at the end, so an error or Ctrl-C leaves nothing.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mix = mix.lower()
    try:
        cfg = DGConfig.from_pretrained(src)
        click.echo(format_type_table(cfg, mix))
        if dry_run:
            return
        opts = GGUFExportOptions(src=src, out=out, mix=mix, calib=calib, force=force)
        bar = _Bar(disable=quiet)
        # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so the partial output is removed too
        try:
            old = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            old = None
        try:
            res = export_gguf(opts, progress=bar)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            bar.close()
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    except DGemmaError as e:
        raise click.ClickException(str(e)) from None
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    types = ", ".join(f"{k} {v}" for k, v in res.type_counts.items())
    mb = res.source_bytes / 1e6
    click.echo(
        f"wrote {res.path}: {res.n_tensors} tensors ({types}), {res.n_keys} metadata keys, "
        f"{res.file_bytes / 1e9:.3f} GB in {res.seconds:.1f} s ({mb / max(res.seconds, 1e-9):.1f} MB/s of source)"
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Bar:
    """tqdm over source bytes, created on the first update."""

    def __init__(self, disable: bool):
        self.disable, self.bar = disable, None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.disable:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="gguf", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)
        if name:
            self.bar.set_postfix_str(name, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
