"""`dgemma-convert`: HF DiffusionGemma safetensors -> NVFP4 safetensors (ModelOpt / compressed-tensors) or GGUF."""
from __future__ import annotations

import click

from .gguf_cli import gguf
from .nvfp4_cli import nvfp4


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Convert an HF DiffusionGemma checkpoint for dgemma, vLLM / TensorRT-LLM (NVFP4) or llama.cpp (GGUF).

    Conversion streams the checkpoint tensor by tensor (calibration layer by layer), so a 50 GB model converts
    on a machine with far less RAM. Outputs are written atomically: an interrupted run leaves nothing behind.
    """


main.add_command(nvfp4)
main.add_command(gguf)

if __name__ == "__main__":
    main()
