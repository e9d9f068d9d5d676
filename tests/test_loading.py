"""Checkpoint loading: layouts that must load, and every kind of bad file giving a dgemma error."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma.runtime.errors import CheckpointError, DGemmaError, FormatError
from dgemma.runtime.loading import load_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite(path, name, fn):
    """Apply fn(dict_of_tensors) to the shard holding `name`; keep the index consistent."""
    f = _shard_of(path, name)
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if k in t or v != f.name}
    for k in t:
        idx["weight_map"][k] = f.name
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))


NAME = "model.decoder.layers.1.self_attn.q_proj.weight"


def test_single_file_and_both_copies_load_the_same(tiny_checkpoint, tmp_path):
    base = load_model(tiny_checkpoint("tiny-a"))
    single = tmp_path / "single"
    single.mkdir()
    src = tiny_checkpoint("tiny-a")
    merged = {}
    for f in sorted(src.glob("*.safetensors")):
        merged.update(load_file(str(f)))
    save_file(merged, str(single / "model.safetensors"))
    shutil.copy(src / "config.json", single / "config.json")
    both = load_model(tiny_checkpoint("tiny-a", both_copies=True))
    one = load_model(single)
    sd = base.state_dict()
    for m in (both, one):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # the encoder's own layer scalars are loaded, not the decoder's
    enc = load_file(str(_shard_of(src, "model.encoder.language_model.layers.0.layer_scalar")))
    assert torch.equal(base.layers[0].encoder_layer_scalar, enc["model.encoder.language_model.layers.0.layer_scalar"])
    assert not torch.equal(base.layers[0].encoder_layer_scalar, base.layers[0].layer_scalar)


def test_vision_tensors_skipped_with_one_log_line(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="dgemma")
    load_model(tiny_checkpoint("tiny-a"))
    lines = [r.getMessage() for r in caplog.records if "vision" in r.getMessage()]
    assert len(lines) == 1 and "skipping 16 vision-tower tensors" in lines[0]


def test_dtype_conversion(tiny_checkpoint):
    m = load_model(tiny_checkpoint("tiny-a", dtype="bfloat16"))
    assert m.dtype == torch.bfloat16
    m32 = load_model(tiny_checkpoint("tiny-a", dtype="bfloat16"), dtype=torch.float32)
    assert m32.dtype == torch.float32


def test_missing_tensor(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    _rewrite(p, NAME, lambda t: t.pop(NAME))
    with pytest.raises(CheckpointError, match=r"missing tensors: .*layers\.1\.self_attn\.q_proj\.weight"):
        load_model(p)


def test_unexpected_tensor(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    _rewrite(p, NAME, lambda t: t.__setitem__("model.decoder.layers.1.bogus.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match="unexpected tensors for this config: model.decoder.layers.1.bogus.weight"):
        load_model(p)


def test_wrong_shape(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    _rewrite(p, NAME, lambda t: t.__setitem__(NAME, t[NAME][:-1].contiguous()))
    with pytest.raises(CheckpointError, match=r"q_proj.weight' has shape \[127, 64\], expected \[128, 64\]"):
        load_model(p)


def test_wrong_dtype(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    _rewrite(p, NAME, lambda t: t.__setitem__(NAME, t[NAME].to(torch.int32)))
    with pytest.raises(CheckpointError, match="has dtype I32"):
        load_model(p)


def test_nan_weights(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")

    def poison(t):
        t[NAME][3, 5] = float("nan")

    _rewrite(p, NAME, poison)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_model(p)


def test_truncated_file(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    f = _shard_of(p, NAME)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="truncated") as e:
        load_model(p)
    assert f.name in str(e.value)


@pytest.mark.parametrize("garbage", [b"", b"\x01\x02", b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}"])
def test_corrupt_header(tiny_checkpoint, tmp_path, garbage):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    _shard_of(p, NAME).write_bytes(garbage)
    with pytest.raises(FormatError) as e:
        load_model(p)
    assert _shard_of(p, NAME).name in str(e.value)


def test_missing_shard_and_bad_index(tiny_checkpoint, tmp_path):
    p = _copy(tiny_checkpoint("tiny-a"), tmp_path / "c")
    _shard_of(p, NAME).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(p)
    (p / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(FormatError, match="corrupt index"):
        load_model(p)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(DGemmaError):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DGemmaError, match="diffusion_gemma"):
        load_model(tmp_path)


def test_errors_are_never_bare(tiny_checkpoint, tmp_path):
    """Random byte damage anywhere in a shard is reported as a dgemma error (or loads, if harmless)."""
    import random

    rnd = random.Random(0)
    src = tiny_checkpoint("tiny-a")
    for trial in range(12):
        p = _copy(src, tmp_path / f"c{trial}")
        f = _shard_of(p, NAME)
        data = bytearray(f.read_bytes())
        for _ in range(4):
            data[rnd.randrange(0, min(len(data), 600))] = rnd.randrange(256)
        f.write_bytes(bytes(data))
        try:
            load_model(p)
        except DGemmaError:
            pass
