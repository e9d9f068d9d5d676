"""Weight streaming (identical outputs, at most two layers resident, released layers unusable, exact byte counts)
and lazy loading (identical to the eager loader, zero-copy mapping, errors at first use)."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from dgemma.runtime.errors import CheckpointError, DGemmaError
from dgemma.runtime.expert_store import enable_expert_offload
from dgemma.runtime.generate import generate
from dgemma.runtime.lazy_loading import load_model_lazy, pending_tensors
from dgemma.runtime.loading import load_model
from dgemma.runtime.weight_stream import STREAMED_MODULES, enable_weight_streaming


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(model, steps=4):
    ids = torch.randint(5, 250, (1, 27), generator=torch.Generator().manual_seed(1))
    return generate(model, ids, sampling="reference", generator=torch.Generator().manual_seed(5),
                    max_new_tokens=40, max_denoising_steps=steps).sequences


def _streamed_bytes(model) -> list[int]:
    """Independent count of each layer's streamed matrices, from a resident model."""
    out = []
    for layer in model.layers:
        n = 0
        for path in STREAMED_MODULES:
            try:
                mod = layer.get_submodule(path)
            except AttributeError:
                continue
            ts = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
            n += sum(t.numel() * t.element_size() for t in ts)
        out.append(n)
    return out


def test_streaming_identical_and_bounded(tiny_checkpoint):
    ck = tiny_checkpoint("tiny-b")
    ref_model = load_model(ck)
    ref = _gen(ref_model)
    m = load_model(ck)
    passes = []
    m.layers[0].register_forward_pre_hook(lambda mod, args: passes.append(1))
    resident_seen = []
    ws = enable_weight_streaming(m)
    for layer in m.layers:
        layer.register_forward_pre_hook(lambda mod, args: resident_seen.append(len(ws.resident_layers())))
    assert ws.resident_layers() == []
    names = dict(m.named_parameters())
    assert "layers.0.self_attn.q_proj.weight" not in names and "layers.0.mlp.up_proj.weight" not in names
    out = _gen(m)
    assert torch.equal(out, ref)
    L = len(m.layers)
    assert ws.stats.max_resident_layers == 2 and max(resident_seen) <= 2
    assert ws.stats.loads == len(passes) * L + 1  # every layer once per pass, plus the prefetch of the next pass
    per_layer = _streamed_bytes(ref_model)
    assert ws.layer_nbytes == per_layer
    assert ws.stats.bytes_moved == len(passes) * sum(per_layer) + per_layer[0]
    # a released layer cannot be used by accident
    released = next(i for i in range(L) if i not in ws.resident_layers())
    with pytest.raises(TypeError):
        m.layers[released].mlp.up_proj(torch.randn(3, m.cfg.hidden_size))
    ws.close()
    assert torch.equal(_gen(m), ref)
    enable_weight_streaming(m)
    with pytest.raises(DGemmaError, match="already"):
        enable_weight_streaming(m)


def test_lazy_streaming_and_offload_together(tiny_checkpoint):
    ck = tiny_checkpoint("tiny-b", dtype="bfloat16")
    ref = _gen(load_model(ck, dtype=torch.float32))
    m = load_model_lazy(ck, dtype=torch.float32)
    st = enable_expert_offload(m, m.cfg.top_k_experts)
    ws = enable_weight_streaming(m)
    assert torch.equal(_gen(m), ref)
    assert ws.stats.max_resident_layers == 2 and st.summary()["bytes_moved"] > 0
    # the offloaded experts stayed memory-mapped bf16 views: the store converts on copy
    assert st.layers[0]._host["gate_up_proj"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_lazy_matches_eager(tiny_checkpoint, dtype):
    ck = tiny_checkpoint("tiny-a", dtype="bfloat16")
    ref = _gen(load_model(ck, dtype=dtype))
    m = load_model_lazy(ck, dtype=dtype)
    assert pending_tensors(m) > 0  # matrices wait for their first use
    assert torch.equal(_gen(m), ref)
    assert pending_tensors(m) == 0
    assert all(p.dtype == (dtype or torch.bfloat16) for p in m.parameters())


def test_lazy_zero_copy_views(tiny_checkpoint):
    ck = tiny_checkpoint("tiny-a", dtype="bfloat16")
    m = load_model_lazy(ck, check_finite=False)
    assert pending_tensors(m) == 0  # same dtype on CPU and nothing to check: no hooks at all
    w = m.layers[0].experts.gate_up_proj
    shard_sizes = {f.stat().st_size for f in ck.glob("*.safetensors")}
    assert w.untyped_storage().nbytes() in shard_sizes  # a view into the mapped shard, not a copy
    assert torch.equal(_gen(m), _gen(load_model(ck)))


def _corrupt_first_matrix(src, dst):
    """Copy a checkpoint, writing NaN into the first element of one 2-D tensor of one shard."""
    import shutil

    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        for name, meta in header.items():
            if name != "__metadata__" and len(meta["shape"]) == 2 and "self_attn.q_proj" in name:
                start = 8 + n + meta["data_offsets"][0]
                raw[start : start + 4] = struct.pack("<f", float("nan"))
                f.write_bytes(bytes(raw))
                return name
    raise AssertionError("no q_proj matrix found")


def test_lazy_errors(tiny_checkpoint, tmp_path):
    ck = tiny_checkpoint("tiny-a")  # float32
    bad = tmp_path / "bad"
    name = _corrupt_first_matrix(ck, bad)
    m = load_model_lazy(bad)  # mapping does not read the data
    with pytest.raises(CheckpointError, match="NaN or Inf") as ei:
        _gen(m)
    assert name in str(ei.value)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_model(bad)  # the eager loader finds the same problem at load time
    missing = tmp_path / "missing"
    import shutil

    shutil.copytree(ck, missing)
    from safetensors.torch import load_file, save_file

    idx = json.loads((missing / "model.safetensors.index.json").read_text())
    drop = next(k for k in idx["weight_map"] if k.endswith("layers.1.mlp.down_proj.weight"))
    shard = missing / idx["weight_map"].pop(drop)
    tensors = load_file(shard)
    del tensors[drop]
    save_file(tensors, shard)
    (missing / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e_eager:
        load_model(missing)
    with pytest.raises(CheckpointError) as e_lazy:
        load_model_lazy(missing)
    assert str(e_eager.value) == str(e_lazy.value)
