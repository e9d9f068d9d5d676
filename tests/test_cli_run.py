"""dgemma-run through click's runner: every option, every bad input, the --json schema."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dgemma.runtime.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import tiny

    return tiny.write_checkpoint(tmp_path_factory.mktemp("cli"), "tiny-a")


def _run(args, input=None):
    return CliRunner().invoke(main, args, input=input, catch_exceptions=False)


SCHEMA = {
    "model": str, "prompt": str, "text": str, "thoughts": str, "raw_text": str, "prompt_token_ids": list,
    "token_ids": list, "tokens_per_forward": float, "steps_per_canvas": list, "timings": dict, "device": str,
    "dtype": str, "seed": int,
}


def test_json_schema_and_all_sampler_options(ckpt):
    r = _run(["Hello", "--model", str(ckpt), "--json", "--seed", "3", "--max-new-tokens", "20", "--steps", "4",
              "--t-min", "0.3", "--t-max", "0.9", "--entropy-bound", "0.5", "--confidence-threshold", "0.01",
              "--stability", "2", "--system", "Be brief.", "--think", "--device", "cpu", "--dtype", "float32",
              "--sampling", "reference", "--sc-top-k", "8"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output)
    for k, t in SCHEMA.items():
        assert isinstance(rec[k], t), (k, rec[k])
    assert len(rec["token_ids"]) == 32  # 20 tokens round up to two canvases of 16
    assert all(s <= 4 for s in rec["steps_per_canvas"])
    for k in ("load_s", "encode_s", "denoise_s", "first_canvas_s", "total_s", "ms_per_step"):
        assert rec["timings"][k] >= 0
    assert rec["prompt_token_ids"][0] == 2  # <bos> written by the chat template
    # same seed, same output; --no-adaptive runs every step
    again = json.loads(_run(["Hello", "--model", str(ckpt), "--json", "--seed", "3", "--max-new-tokens", "20",
                             "--steps", "4", "--t-min", "0.3", "--t-max", "0.9", "--entropy-bound", "0.5",
                             "--confidence-threshold", "0.01", "--stability", "2", "--system", "Be brief.",
                             "--think", "--sampling", "reference", "--sc-top-k", "8"]).output)
    assert again["token_ids"] == rec["token_ids"]
    fixed = json.loads(_run(["Hi", "--model", str(ckpt), "--json", "--no-adaptive", "--steps", "3"]).output)
    assert fixed["steps_per_canvas"] == [3]


def test_plain_output_raw_and_stdin(ckpt):
    r = _run(["-", "--model", str(ckpt), "--raw", "--no-stream", "--seed", "1"], input="def f(x):")
    assert r.exit_code == 0 and r.output.strip() != "" and "{" not in r.output[:1]
    r = _run(["hi", "--model", str(ckpt), "--stream", "--show-thoughts", "--no-think", "--seed", "1"])
    assert r.exit_code == 0  # not a terminal: only the final text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--t-min", "0.9", "--t-max", "0.8"], "t_max must be greater than t_min"),
        (["--steps", "0"], "steps"),
        (["--entropy-bound", "0"], "entropy_bound must be > 0"),
        (["--entropy-bound", "-1"], "entropy_bound must be > 0"),
        (["--confidence-threshold", "0"], "confidence_threshold"),
        (["--stability", "-2"], "stability"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--device", "tpu9"], "device"),
        (["--dtype", "int8"], "dtype"),
        (["--raw", "--system", "x"], "--system needs chat formatting"),
        (["--sc-top-k", "0"], "sc_top_k must be a positive integer"),
        (["--sampling", "greedy"], "sampling"),
    ],
)
def test_bad_values_exit_2_with_one_line(ckpt, args, needle):
    r = CliRunner().invoke(main, ["hello", "--model", str(ckpt), *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1


def test_missing_and_invalid_model_dir(tmp_path):
    r = CliRunner().invoke(main, ["hello", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such model directory" in r.output
    (tmp_path / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["hello", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_prompt_longer_than_context(ckpt):
    r = CliRunner().invoke(main, ["word " * 5000, "--model", str(ckpt), "--raw"])
    assert r.exit_code == 2 and "prompt too long" in r.output


def test_empty_prompt(ckpt):
    r = CliRunner().invoke(main, ["  ", "--model", str(ckpt)])
    assert r.exit_code == 2 and "empty" in r.output


def test_help_explains():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--system", "--think", "--show-thoughts", "--max-new-tokens", "--steps", "--t-min",
                "--t-max", "--entropy-bound", "--confidence-threshold", "--stability", "--seed", "--stream",
                "--json", "--device", "--dtype", "--sampling", "--sc-top-k"):
        assert opt in r.output


def test_default_model_runs_with_no_arguments():
    """`dgemma-run "def fib(n):"` on a fresh install uses the bundled model: no --model, no download."""
    r = _run(["def fib(n):", "--json", "--seed", "0", "--steps", "8"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output)
    assert rec["model"].endswith("dgemma-tiny-code")
    assert rec["prompt_token_ids"][0] == 2 and len(rec["token_ids"]) >= 32
    assert rec["text"].strip() != ""


def test_lazy_and_budgeted_loads_give_the_same_answer(ckpt):
    base = ["hello", "--model", str(ckpt), "--json", "--seed", "4", "--steps", "3"]
    ids = [json.loads(_run(base + extra).output)["token_ids"] for extra in ([], ["--lazy"], ["--vram", "1"])]
    assert ids[0] == ids[1] == ids[2]
