"""NVFP4 runtime: packed modules vs dequantized references, loading both layouts (incl. files written "by another
tool"), round-trip exactness against the written bytes, logits vs the bf16 model, generation through dgemma.load."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import dgemma
from dgemma.converter.nvfp4 import (
    NVFP4Tensor, dequantize, e2m1_decode, quantize, unpack_nibbles,
)
from dgemma.converter.nvfp4_export import ConvertOptions, convert_nvfp4
from dgemma.kernels.fused_moe import fused_moe_torch
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import CheckpointError, ConfigError
from dgemma.runtime.loading import load_model
from dgemma.runtime.model import Experts
from dgemma.kernels.nvfp4_gemm import dequantize_nvfp4
from dgemma.runtime.nvfp4_linear import NVFP4Experts, NVFP4Linear, dequantize_packed, packed_nbytes
from dgemma.runtime.nvfp4_loading import load_nvfp4_model, quantized_modules, read_quant_format

FAST = dict(calib_samples=4, max_prompt_tokens=32, progress=False)


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """converted(preset_model, preset, layout, scale_search) -> output dir (cached)."""
    made = {}

    def make(model="tiny-a", preset="experts", layout="modelopt", search="rtn"):
        key = (model, preset, layout, search)
        if key not in made:
            dst = tmp_path_factory.mktemp("nv") / "out"
            convert_nvfp4(tiny_checkpoint(model), dst, ConvertOptions(preset=preset, layout=layout, scale_search=search,
                                                                      **FAST))
            made[key] = dst
        return made[key]

    return make


def _probe_logits(model, seed=0, batch=2):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, 19), generator=g)
    canvas = torch.randint(5, cfg.vocab_size, (batch, cfg.canvas_length), generator=g)
    with torch.inference_mode():
        cache = model.new_cache(batch, 64)
        model.encode(ids, cache)
        return model.decode(canvas, cache)


def _kl(a, b):
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    return float((pa.exp() * (pa - pb)).sum(-1).mean())


def _fake_quant(src, q_model):
    """The bf16/fp32 source model with every quantized weight replaced by its dequantized value."""
    fake = load_model(src)
    for name, m in quantized_modules(q_model).items():
        tgt = fake.get_submodule(name)
        if isinstance(m, NVFP4Experts):
            for p in ("gate_up_proj", "down_proj"):
                getattr(tgt, p).data.copy_(m.dequantize(p))
        else:
            tgt.weight.data.copy_(m.dequantize())
    return fake


# ---- modules vs dequantized references ---------------------------------------------------------------------------


def _rand_q(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(*shape, generator=g) * 0.05)


def test_nvfp4_linear_matches_dequantized_linear():
    q = _rand_q(40, 48)
    lin = NVFP4Linear.from_nvfp4(q, input_scale=0.01)
    x = torch.randn(3, 7, 48)
    ref = F.linear(x, dequantize(q))
    out = lin(x)
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"NVFP4Linear vs dequantized F.linear: max rel err {err:.2e}")
    assert out.shape == (3, 7, 40) and err < 1e-5
    # buffers keep their dtypes under module casts (an fp32 global in bf16 would change every weight)
    lin.to(torch.bfloat16)
    assert lin.weight.dtype == torch.uint8 and lin.weight_scale.dtype == torch.float8_e4m3fn
    assert lin.weight_scale_2.dtype == torch.float32 and torch.equal(lin.weight_scale_2, q.weight_scale_2)
    assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_nvfp4_linear_rejects_bad_tensors():
    q = _rand_q(16, 32)
    with pytest.raises(CheckpointError, match="uint8"):
        NVFP4Linear(q.weight.float(), q.weight_scale, q.weight_scale_2)
    with pytest.raises(CheckpointError, match="weight_scale has shape"):
        NVFP4Linear(q.weight, q.weight_scale[:, :1], q.weight_scale_2)
    with pytest.raises(CheckpointError, match="finite and positive"):
        NVFP4Linear(q.weight, q.weight_scale, torch.tensor(float("nan")))


def _experts_pair(E=5, H=48, I=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gu = torch.randn(E, 2 * I, H, generator=g) * 0.1
    dn = torch.randn(E, H, I, generator=g) * 0.1
    return gu, dn


def _routing(T, E, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    return idx, w


@pytest.mark.parametrize("mode", ["twin", "module", "mixed", "split_global"])
def test_nvfp4_experts_match_dense_experts(mode):
    """twin: the kernels' torch twin on the module's packed view; module: the module's own CPU path; mixed: packed
    gate_up with a float down stack; split_global: gate and up with different globals (another tool's file)."""
    E, H, I, T, k = 5, 48, 32, 17, 2
    gu, dn = _experts_pair(E, H, I)
    qgu, qdn = quantize(gu), quantize(dn)
    m = NVFP4Experts(E, H, I)
    m.set_packed("gate_up_proj", qgu.weight, qgu.weight_scale, qgu.weight_scale_2, torch.full((E,), 0.01))
    if mode == "mixed":
        m.set_dense("down_proj", dn)
    else:
        m.set_packed("down_proj", qdn.weight, qdn.weight_scale, qdn.weight_scale_2)
    gu_ref = dequantize(qgu)
    if mode == "split_global":
        g2 = torch.stack([qgu.weight_scale_2, qgu.weight_scale_2 * 2], dim=1)
        m.set_packed("gate_up_proj", qgu.weight, qgu.weight_scale, g2)
        gu_ref = gu_ref.clone()
        gu_ref[:, I:] *= 2
    dense = Experts.__new__(Experts)
    torch.nn.Module.__init__(dense)
    dense.num_experts = E
    dense.gate_up_proj = torch.nn.Parameter(gu_ref, requires_grad=False)
    dense.down_proj = torch.nn.Parameter(dn if mode == "mixed" else dequantize(qdn), requires_grad=False)
    x = torch.randn(T, H)
    idx, w = _routing(T, E, k)
    ref = dense(x, idx, w)
    assert (m._kernel_experts() is not None) == (mode in ("twin", "module"))
    out = fused_moe_torch(x, w, idx, m._kernel_experts()) if mode == "twin" else m(x, idx, w)
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"NVFP4Experts[{mode}] vs Experts on dequantized weights: max rel err {err:.2e}")
    assert err < 1e-5


def test_fast_dequant_is_bit_identical_to_the_kernels_reference():
    q = _rand_q(3, 40, 64, seed=4)
    for g in (q.weight_scale_2, None):
        assert torch.equal(dequantize_packed(q.weight, q.weight_scale, g),
                           dequantize_nvfp4(q.weight, q.weight_scale, g))


def test_nvfp4_experts_stay_packed():
    E, H, I = 6, 64, 32
    gu, dn = _experts_pair(E, H, I)
    m = NVFP4Experts(E, H, I)
    for p, w in (("gate_up_proj", gu), ("down_proj", dn)):
        q = quantize(w)
        m.set_packed(p, q.weight, q.weight_scale, q.weight_scale_2)
    n = gu.numel() + dn.numel()
    assert packed_nbytes(m) == n // 2 + n // 16 + 2 * 4 * E  # 4.5 bits per weight + fp32 globals
    m.float()
    assert m.gate_up_proj.dtype == torch.uint8 and m.down_proj_scale_2.dtype == torch.float32


# ---- converted checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_round_trip_is_bit_exact(converted, layout):
    """The runtime holds exactly the written bytes, and its dequantized weights are exactly the correctly rounded
    e2m1 * scale * global of those bytes (converter.nvfp4's decoding, evaluated exactly in float64)."""
    out = converted("tiny-a", "default", layout)
    model = load_nvfp4_model(out, dtype=torch.float32)
    tensors = {}
    with open(out / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    for s in shards:
        with safe_open(str(out / s), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    ct = layout == "compressed-tensors"
    mods = quantized_modules(model)
    assert mods, "nothing quantized"
    checked = 0
    for name, m in mods.items():
        hf = "model.decoder." + name
        if isinstance(m, NVFP4Linear):
            w = tensors[hf + (".weight_packed" if ct else ".weight")]
            # compressed-tensors: the reciprocal, rounded to fp32 (the export makes it round-trip exactly)
            g = (1.0 / tensors[hf + ".weight_global_scale"].double()).float().double() if ct else \
                tensors[hf + ".weight_scale_2"].double()
            assert torch.equal(m.weight, w) and torch.equal(m.weight_scale.view(torch.uint8),
                                                            tensors[hf + ".weight_scale"].view(torch.uint8))
            assert float(m.weight_scale_2) == float(g.reshape(()).float())
            q = NVFP4Tensor(w, tensors[hf + ".weight_scale"], g.reshape(()).float())
            exact = (e2m1_decode(unpack_nibbles(q.weight), torch.float64)
                     * q.weight_scale.double().repeat_interleave(16, -1) * float(g.reshape(()))).float()
            assert torch.equal(m.dequantize(), exact)
            conv = dequantize(q)  # converter's own decoding: at most one rounding step away
            assert torch.allclose(conv, exact, rtol=2 ** -22, atol=0)
            checked += 1
        else:
            E = m.num_experts
            for e in range(0, E, 3):
                for proj, rows in (("gate_proj", slice(0, m.intermediate_size)),
                                   ("up_proj", slice(m.intermediate_size, 2 * m.intermediate_size))):
                    base = f"{hf}.{e}.{proj}"
                    w = tensors[base + (".weight_packed" if ct else ".weight")]
                    assert torch.equal(m.gate_up_proj[e, rows], w)
                    assert torch.equal(m.gate_up_proj_scale[e, rows].view(torch.uint8),
                                       tensors[base + ".weight_scale"].view(torch.uint8))
                    g = (1.0 / tensors[base + ".weight_global_scale"].double()).float().double() if ct else \
                        tensors[base + ".weight_scale_2"].double()
                    exact = (e2m1_decode(unpack_nibbles(w), torch.float64)
                             * tensors[base + ".weight_scale"].double().repeat_interleave(16, -1) * float(g.reshape(()))).float()
                    assert torch.equal(m.expert_weight("gate_up_proj", e)[rows], exact)
                    checked += 1
    print(f"{layout}: {checked} quantized matrices bit-exact against the file bytes")


@pytest.mark.parametrize("model_name,preset", [("tiny-a", "experts"), ("tiny-a", "default"), ("tiny-b", "experts"),
                                               ("tiny-b", "default")])
def test_logits_vs_bf16(converted, tiny_checkpoint, model_name, preset):
    out = converted(model_name, preset, "modelopt")
    src = tiny_checkpoint(model_name)
    ref = load_model(src)
    q = load_nvfp4_model(out, dtype=torch.float32)
    a, b = _probe_logits(ref), _probe_logits(q)
    c = _probe_logits(_fake_quant(src, q))
    kl, rel = _kl(a, b), float((a - b).norm() / a.norm())
    other = load_model(tiny_checkpoint(model_name, seed=1, tokenizer=False))  # an unrelated model, same shape
    kl_unrelated = _kl(a, _probe_logits(other))
    exact = float((b - c).abs().max() / c.abs().max())
    print(f"{model_name}/{preset}: NVFP4 vs bf16 KL {kl:.4f} max err {float((a - b).abs().max()):.3f} rel {rel:.3f} "
          f"top1 {float((a.argmax(-1) == b.argmax(-1)).float().mean()):.3f}; unrelated-model KL {kl_unrelated:.3f}; "
          f"packed runtime vs fake-quant float model max rel {exact:.2e}")
    assert torch.isfinite(b).all()
    assert exact < 1e-4  # the packed path computes what the dequantized weights define
    # quantization noise, clearly closer than an unrelated model; random tiny models are chaotic (1 % Gaussian
    # weight noise on the experts alone already gives KL ~0.07 on tiny-a), so the bound is loose
    assert kl < 0.5 * kl_unrelated


def test_generation_through_dgemma_load(converted):
    out = converted("tiny-a", "experts", "compressed-tensors")
    m = dgemma.load(out, device="cpu")
    assert isinstance(m.model.layers[0].experts, NVFP4Experts)
    res = m.generate([m.tokenizer.encode("def add(a, b):")], max_new_tokens=16, max_denoising_steps=4, seed=0)
    assert res.sequences.shape[1] >= 16
    print("generated:", repr(m.tokenizer.decode(res.new_tokens[0])))


def test_compressed_tensors_matches_modelopt_export(converted):
    """The same RTN weights exported in both layouts give the same logits (globals differ by at most one ulp)."""
    a = _probe_logits(load_nvfp4_model(converted("tiny-a", "default", "modelopt"), dtype=torch.float32))
    b = _probe_logits(load_nvfp4_model(converted("tiny-a", "default", "compressed-tensors"), dtype=torch.float32))
    err = float((a - b).abs().max())
    print(f"modelopt vs compressed-tensors export: max logit diff {err:.2e}")
    assert err < 1e-3


# ---- a checkpoint written "by another tool" ------------------------------------------------------------------------


def test_foreign_modelopt_checkpoint_loads(tiny_checkpoint, tmp_path):
    """Hand-built per-expert ModelOpt layout: tensors stored under the encoder's names, weight_scale_2 as [1],
    per-expert input scales, an expert whose gate and up globals differ, and FP8 KV scales; one shard, no index."""
    src = tiny_checkpoint("tiny-a")
    cfg = DGConfig.from_pretrained(src)
    ref = load_model(src)
    sd = {}
    from dgemma.runtime.safetensors_io import CheckpointFiles

    files = CheckpointFiles(src)
    for n in files.tensors:
        sd[n] = files.get(n)
    E, I = cfg.num_experts, cfg.moe_intermediate_size
    out = {}
    enc = "model.encoder.language_model."
    for n, t in sd.items():
        if ".experts." in n:
            continue
        if n.startswith("model.decoder.layers.") and n.endswith("mlp.down_proj.weight"):
            q = quantize(t)
            m = n[: -len(".weight")].replace("model.decoder.", enc)  # tied weights under encoder names
            out[m + ".weight"], out[m + ".weight_scale"] = q.weight, q.weight_scale
            out[m + ".weight_scale_2"], out[m + ".input_scale"] = q.weight_scale_2.reshape(1), torch.tensor([0.02])
            continue
        out[n] = t.to(torch.bfloat16) if t.is_floating_point() else t
    dense = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}.experts"
        gu, dn = sd[p + ".gate_up_proj"], sd[p + ".down_proj"]
        gus, dns = [], []
        for e in range(E):
            parts = {"gate_proj": gu[e, :I], "up_proj": gu[e, I:], "down_proj": dn[e]}
            deq = {}
            for proj, w in parts.items():
                q = quantize(w)  # each part its own global (unlike dgemma's export, which shares gate/up)
                m = f"{p}.{e}.{proj}"
                out[m + ".weight"], out[m + ".weight_scale"] = q.weight, q.weight_scale
                out[m + ".weight_scale_2"] = q.weight_scale_2
                out[m + ".input_scale"] = torch.tensor(0.01 + 0.001 * e)
                deq[proj] = dequantize(q)
            gus.append(torch.cat([deq["gate_proj"], deq["up_proj"]]))
            dns.append(deq["down_proj"])
        dense[i] = (torch.stack(gus), torch.stack(dns))
        out[f"model.decoder.layers.{i}.self_attn.k_scale"] = torch.tensor(1.0)
    dst = tmp_path / "foreign"
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(c))
    (dst / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.47.0"},
                                                          "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                                           "kv_cache_quant_algo": "FP8",
                                                                           "exclude_modules": ["lm_head"]}}))
    model = load_nvfp4_model(dst, dtype=torch.float32)
    ex = model.layers[0].experts
    assert isinstance(ex, NVFP4Experts) and tuple(ex.gate_up_proj_scale_2.shape) == (E, 2)
    assert isinstance(model.layers[1].mlp.down_proj, NVFP4Linear)
    # reference: the bf16-rounded source with the same dequantized weights
    fake = load_model(src)
    for i, (gu, dn) in dense.items():
        fake.layers[i].experts.gate_up_proj.data.copy_(gu)
        fake.layers[i].experts.down_proj.data.copy_(dn)
        fake.layers[i].mlp.down_proj.weight.data.copy_(model.layers[i].mlp.down_proj.dequantize())
    for n, p in fake.named_parameters():
        if ".experts." not in n and "mlp.down_proj" not in n:
            p.data.copy_(p.data.bfloat16().float())
    for n, b in fake.named_buffers():
        if "scalar" in n:
            b.copy_(b.bfloat16().float())
    a, b = _probe_logits(fake), _probe_logits(model)
    err = float((a - b).abs().max() / a.abs().max())
    print(f"foreign ModelOpt checkpoint vs float model with the same weights: max rel err {err:.2e}; "
          f"vs the unquantized source KL {_kl(_probe_logits(ref), b):.4f}")
    assert err < 1e-4


def test_loader_errors(converted, tmp_path):
    out = converted("tiny-a", "experts", "modelopt")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = bad / "model.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}

    def rewrite(fn):
        d = dict(t)
        fn(d)
        save_file(d, str(shard))
        idx = {"metadata": {}, "weight_map": {k: shard.name for k in d}}
        (bad / "model.safetensors.index.json").write_text(json.dumps(idx))

    key = "model.decoder.layers.1.experts.3.up_proj.weight_scale"
    rewrite(lambda d: d.pop(key))
    with pytest.raises(CheckpointError, match="missing tensor.*experts.3.up_proj.weight_scale"):
        load_nvfp4_model(bad)
    rewrite(lambda d: d.__setitem__(key, t[key].view(torch.uint8)))
    with pytest.raises(CheckpointError, match="dtype U8, expected one of \\('F8_E4M3',\\)"):
        load_nvfp4_model(bad)
    rewrite(lambda d: d.__setitem__(key, t[key][:, :1].contiguous()))
    with pytest.raises(CheckpointError, match="has shape"):
        load_nvfp4_model(bad)
    rewrite(lambda d: d.__setitem__("model.decoder.layers.0.extra.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra.weight"):
        load_nvfp4_model(bad)
    rewrite(lambda d: d.__setitem__("model.decoder.layers.0.experts.0.gate_proj.weight_scale_2", torch.tensor(float("inf"))))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_nvfp4_model(bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "hf_quant_config.json").unlink()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gptq"):
        read_quant_format(bad)


# ---- fidelity on the bundled trained model ----------------------------------------------------------------------------


def test_trained_model_fidelity_rtn_vs_calibrated(tmp_path):
    """The bundled trained code model (not chaotic like random tiny models): logits KL / relative error vs bf16
    on held-out calibration text, for both presets; the calibrated scale search beats RTN."""
    from dgemma.converter.calib_data import load_calibration
    from dgemma.runtime.api import default_model_path
    from dgemma.runtime.tokenizer import Tokenizer

    src = default_model_path()
    if not (src / "model.safetensors").is_file():
        pytest.skip("bundled model not present")
    ref = load_model(src, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(src)
    C, V = ref.cfg.canvas_length, ref.cfg.vocab_size
    g = torch.Generator().manual_seed(123)
    probes = []
    for s in load_calibration(None)[200:216]:  # not among the calibration samples used below
        c = (tok.encode(s.continuation, add_bos=False) + [1] * C)[:C]
        c = torch.tensor(c)
        noise = torch.rand(C, generator=g) < 0.5
        c[noise] = torch.randint(0, V, (int(noise.sum()),), generator=g)
        probes.append((torch.tensor([tok.encode(s.prompt)[:96]]), c[None]))

    def logits(model):
        out = []
        with torch.inference_mode():
            for p, c in probes:
                cache = model.new_cache(1, 160)
                model.encode(p, cache)
                out.append(model.decode(c, cache)[0])
        return torch.cat(out)

    a = logits(ref)
    res = {}
    for preset in ("experts", "default"):
        for search in ("rtn", "mse"):
            out = tmp_path / f"{preset}-{search}"
            convert_nvfp4(src, out, ConvertOptions(preset=preset, scale_search=search, calib_samples=32,
                                                   progress=False))
            b = logits(load_nvfp4_model(out, dtype=torch.float32))
            res[preset, search] = (_kl(a, b), float((a - b).norm() / a.norm()),
                                   float((a.argmax(-1) == b.argmax(-1)).float().mean()))
            print(f"{preset:8s} {search}: KL {res[preset, search][0]:.5f} rel err {res[preset, search][1]:.4f} "
                  f"top1 agreement {res[preset, search][2]:.4f}")
    for preset, bound in (("experts", 0.005), ("default", 0.02)):
        assert res[preset, "mse"][0] < res[preset, "rtn"][0] < bound
        assert res[preset, "mse"][1] < res[preset, "rtn"][1]
