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
    chat: bool | None
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
    sampling: str = "fast"
    sc_top_k: int | None = None
    vram: str | None = None  # run under this device-memory budget (planner + offload/streaming)
    context: int = 8192  # context length the budget plans for
    lazy: bool = False  # map the checkpoint, materialize tensors on first use


def _fail(msg: str) -> None:
    click.echo(f"dgemma-run: error: {msg}", err=True)
    sys.exit(2)


def run(o: RunOptions, out=None) -> dict:
    """Load, generate, print; returns the --json record. Raises DGemmaError on bad input."""
    import torch

    from .chat import clean_output, encode_chat, split_thoughts
    from .generate import SamplerSettings
    from .streaming import CanvasRenderer

    out = out or sys.stdout
    t0 = time.perf_counter()
    dg = _load(o)
    load_s = time.perf_counter() - t0
    sampler = dict(
        max_new_tokens=o.max_new_tokens, max_denoising_steps=o.steps, t_min=o.t_min, t_max=o.t_max,
        entropy_bound=o.entropy_bound, confidence_threshold=o.confidence_threshold,
        stability_threshold=o.stability, adaptive_stopping=o.adaptive,
    )
    SamplerSettings.resolve(dg.config.generation, **sampler)  # validate before any work
    tok = dg.tokenizer
    chat = o.chat if o.chat is not None else tok.chat_template is not None
    if chat:
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
    result = dg.generate(torch.tensor([ids]), streamer=streamer, generator=generator, sampling=o.sampling,
                         sc_top_k=o.sc_top_k, **sampler)
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
    store = getattr(dg.model, "expert_store", None)
    if store is not None:
        record["offload"] = {"experts_per_layer": store.experts_per_layer, **store.summary()}
    if getattr(dg, "plan", None) is not None:
        record["plan"] = {"verdict": dg.plan.verdict, "total_bytes": dg.plan.total_bytes,
                          "vram_budget": dg.plan.vram_budget}
    if o.as_json:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif streamer is None:
        if o.show_thoughts and thoughts:
            out.write(thoughts + "\n\n")
        out.write(answer + "\n")
    out.flush()
    return record


def _load(o: RunOptions):
    """The model for a run: plain `dgemma.load`, a lazily mapped checkpoint, or a budgeted load."""
    from .api import default_model_path, load

    if o.vram is not None:
        from .budget import load_with_budget

        return load_with_budget(o.model or default_model_path(), o.vram, device=o.device, dtype=o.dtype,
                                context_length=o.context)
    return load(o.model, device=o.device, dtype=o.dtype, lazy=o.lazy)


def show_plan(model: Path | None, fmt: str | None, vram: str | None, context: int, dtype: str, device: str,
              as_json: bool, out=None) -> dict:
    """`dgemma-run --plan`: print the memory plan (table or JSON); nothing is loaded."""
    from .api import default_model_path
    from .planner import plan

    out = out or sys.stdout
    dev = "cpu" if device == "cpu" else "cuda"  # plan for the accelerator unless told otherwise
    p = plan(model or default_model_path(), fmt, context_length=context, vram_budget=vram,
             dtype=None if dtype == "auto" else dtype, device=dev)
    d = p.as_dict()
    out.write(json.dumps(d) + "\n" if as_json else p.format_table() + "\n")
    out.flush()
    return d


HELP = """Generate a reply to PROMPT with a DiffusionGemma checkpoint (use - to read the prompt from stdin).

Without --model, the small code model bundled with dgemma is used (see models/dgemma-tiny-code/README.md);
point --model at an HF checkpoint directory for the real one. On a terminal the canvas is repainted at every
denoising step; when stdout is not a terminal only the final text is printed.

With --plan, print the memory plan instead (PROMPT not needed): itemized weights, KV cache, scratch and a
verdict for --vram. --model may then also be a GGUF file, or a directory with only config.json plus --format
(e.g. the 26B config in models/ with --format nvfp4-default).
"""


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt", required=False)
@click.option("--model", "-m", type=click.Path(path_type=Path), default=None,
              help="Checkpoint directory (default: the bundled small model).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--think/--no-think", default=False, show_default=True, help="Ask the model to think first.")
@click.option("--show-thoughts", is_flag=True, help="Also print the thought channel.")
@click.option("--chat/--raw", default=None,
              help="Format the prompt with the chat template, or feed it as raw text. Default: chat when the "
                   "checkpoint ships a chat template (--chat without one uses the built-in Gemma 4 format).")
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
@click.option("--sampling", default="fast", show_default=True,
              help="fast: fused one-pass sampler; reference: the same random draws as HF transformers.")
@click.option("--sc-top-k", type=int, default=None,
              help="Approximate self-conditioning with each position's k likeliest tokens (default: exact).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
@click.option("--plan", "show", is_flag=True, help="Print the memory plan and exit (no weights are loaded).")
@click.option("--vram", default=None, metavar="GB",
              help="Device-memory budget (16 = 16 GiB; also 16GiB, 16GB). With --plan: the verdict; otherwise "
                   "the run keeps experts/layers off the device as the plan says.")
@click.option("--context", type=int, default=8192, show_default=True, help="Context length to plan for.")
@click.option("--format", "fmt", default=None,
              help="With --plan: plan the model converted to this format (bf16, nvfp4-default, nvfp4-experts, "
                   "q4_k_m, q8_0, ...).")
@click.option("--lazy", is_flag=True, help="Map the checkpoint and materialize tensors on first use (fast start).")
def main(prompt: str | None, model, system, think, show_thoughts, chat, max_new_tokens, steps, t_min, t_max,
         entropy_bound, confidence_threshold, stability, adaptive, seed, stream, as_json, sampling, sc_top_k, device,
         dtype, show, vram, context, fmt, lazy) -> None:
    if show:
        try:
            show_plan(model, fmt, vram, context, dtype, device, as_json)
        except DGemmaError as e:
            _fail(str(e))
        return
    if fmt is not None:
        _fail("--format only applies with --plan (convert with dgemma-convert to run another format)")
    if prompt is None:
        _fail("missing argument PROMPT (or use --plan)")
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        _fail("the prompt is empty")
    opts = RunOptions(prompt, model, system, think, show_thoughts, chat, max_new_tokens, steps, t_min, t_max,
                      entropy_bound, confidence_threshold, stability, adaptive, seed, stream, as_json, device, dtype,
                      sampling=sampling, sc_top_k=sc_top_k, vram=vram, context=context, lazy=lazy)
    try:
        run(opts)
    except DGemmaError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
