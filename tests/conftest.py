"""Shared fixtures: tiny random DiffusionGemma checkpoints in the real HF layout, and the HF reference."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CONFIG_DIR = ROOT / "models" / "diffusiongemma-26B-A4B-it"


def _load_script(name: str):
    """Import a file from scripts/ (they are tools, not package modules)."""
    spec = importlib.util.spec_from_file_location(f"_dg_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


tiny = _load_script("make_tiny_checkpoint")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(preset, **kw) -> Path, cached per argument set for the session."""
    made: dict[tuple, Path] = {}

    def make(preset: str = "tiny-a", **kw) -> Path:
        key = (preset, repr(sorted(kw.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(preset)
            made[key] = tiny.write_checkpoint(out, preset, **kw)
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one torch thread is faster, and does not stall when other jobs load the machine's cores.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_hf(path: Path, preset: str | None = None):
    """The transformers reference (test-only dependency), fp32, eval mode."""
    import torch
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    transformers.logging.set_verbosity_error()
    kw = {}
    if preset == "tiny-odd":
        # torch's grouped_mm rejects these strides; the reference's eager expert loop handles them
        kw["experts_implementation"] = "eager"
    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="dgemma")
