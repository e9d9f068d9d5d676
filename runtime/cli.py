"""`dgemma-run`: one-shot prompts to a DiffusionGemma checkpoint, watching the answer resolve out of noise."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import DGemmaError


@dataclass(frozen=True)
class RunOptions:
    prompt: str
    model: Path | None
    system: str | None
    think: bool
    show_thoughts: bool
    chat: bool
    max_new_tokens: int | None
    steps: int | None
    t_min: float | None
    t_max: float | None
    entropy_bound: float | None
    confidence_threshold: float | None
    stability: int | None
    adaptive: bool
    seed: int | None
    stream: bool
    as_json: bool
    device: str
    dtype: str


def _fail(msg: str) -> None:
    click.echo(f"dgemma-run: error: {msg}", err=True)
    sys.exit(2)


def run(o: RunOptions, out=None) -> dict:
    """Load, generate, print; returns the --json record. Raises DGemmaError on bad input."""
    import torch

    from .api import load
    from .chat import clean_output, encode_chat, split_thoughts
    from .generate import SamplerSettings
    from .streaming import CanvasRenderer

    out = out or sys.stdout
    t0 = time.perf_counter()
    dg = load(o.model, device=o.device, dtype=o.dtype)
    load_s = time.perf_counter() - t0
    sampler = dict(
        max_new_tokens=o.max_new_tokens, max_denoising_steps=o.steps, t_min=o.t_min, t_max=o.t_max,
        entropy_bound=o.entropy_bound, confidence_threshold=o.confidence_threshold,
        stability_threshold=o.stability, adaptive_stopping=o.adaptive,
    )
    SamplerSettings.resolve(dg.config.generation, **sampler)  # validate before any work
    tok = dg.tokenizer
    if o.chat:
        msgs = ([{"role": "system", "content": o.system}] if o.system else []) + [{"role": "user", "content": o.prompt}]
        ids = encode_chat(tok, msgs, enable_thinking=o.think)
    else:
        if o.system:
            raise DGemmaError("--system needs chat formatting (drop --raw)")
        ids = tok.encode(o.prompt)
    streamer = None
    if o.stream and not o.as_json:
        streamer = CanvasRenderer(tok, out, show_thoughts=o.show_thoughts)
    generator = torch.Generator(device=dg.device).manual_seed(o.seed) if o.seed is not None else None
    result = dg.generate(torch.tensor([ids]), streamer=streamer, generator=generator, **sampler)
    new_ids = result.new_tokens[0].tolist()
    text = tok.decode(new_ids)
    thoughts, answer = split_thoughts(text)
    record = {
        "model": str(dg.path),
        "prompt": o.prompt,
        "text": answer,
        "thoughts": thoughts,
        "raw_text": clean_output(text),
        "prompt_token_ids": ids,
        "token_ids": new_ids,
        "tokens_per_forward": float(result.tokens_per_forward[0]),
        "steps_per_canvas": result.steps_per_canvas,
        "timings": {"load_s": load_s, **result.timings},
        "device": str(dg.device),
        "dtype": str(dg.model.dtype).replace("torch.", ""),
        "seed": o.seed,
    }
    if o.as_json:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif streamer is None:
        if o.show_thoughts and thoughts:
            out.write(thoughts + "\n\n")
        out.write(answer + "\n")
    out.flush()
    return record


HELP = """Generate a reply to PROMPT with a DiffusionGemma checkpoint (use - to read the prompt from stdin).

Without --model, the small code model bundled with dgemma is used (see models/dgemma-tiny-code/README.md);
point --model at an HF checkpoint directory for the real one. On a terminal the canvas is repainted at every
denoising step; when stdout is not a terminal only the final text is printed.
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt")
@click.option("--model", "-m", type=click.Path(path_type=Path), default=None,
              help="Checkpoint directory (default: the bundled small model).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--think/--no-think", default=False, show_default=True, help="Ask the model to think first.")
@click.option("--show-thoughts", is_flag=True, help="Also print the thought channel.")
@click.option("--chat/--raw", default=True, show_default=True,
              help="Format the prompt with the chat template, or feed it as raw text.")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate, rounded up to whole canvases.")
@click.option("--steps", type=int, default=None, help="Max denoising steps per canvas.")
@click.option("--t-min", type=float, default=None, help="Temperature at the last step.")
@click.option("--t-max", type=float, default=None, help="Temperature at the first step.")
@click.option("--entropy-bound", type=float, default=None, help="Entropy budget (nats) for accepting tokens per step.")
@click.option("--confidence-threshold", type=float, default=None, help="Mean entropy below which a canvas may stop.")
@click.option("--stability", type=int, default=None, help="Steps the argmax must stay unchanged to stop early.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True, help="Adaptive stopping.")
@click.option("--seed", type=int, default=None, help="Random seed (reproducible output).")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Repaint the canvas while denoising.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record (text, ids, tokens_per_forward, timings).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
def main(prompt: str, model, system, think, show_thoughts, chat, max_new_tokens, steps, t_min, t_max, entropy_bound,
         confidence_threshold, stability, adaptive, seed, stream, as_json, device, dtype) -> None:
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        _fail("the prompt is empty")
    opts = RunOptions(prompt, model, system, think, show_thoughts, chat, max_new_tokens, steps, t_min, t_max,
                      entropy_bound, confidence_threshold, stability, adaptive, seed, stream, as_json, device, dtype)
    try:
        run(opts)
    except DGemmaError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
