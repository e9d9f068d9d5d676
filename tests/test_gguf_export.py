"""GGUF export (`dgemma-convert gguf`): layout, metadata, tensor data and CLI behaviour.

Independent references: gguf-py's `GGUFReader` and `dequantize` read the files; the expected key list, types and
per-layer tensor names are written out here from shared/reference/gguf.md (not taken from the exporter); tensor
data is compared with the source safetensors read by `safetensors` itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFValueType as VT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dgemma.converter import gguf_export
from dgemma.converter.gguf_cli import gguf as gguf_cmd
from dgemma.converter.gguf_export import GGUFExportOptions, export_gguf, gguf_metadata
from dgemma.converter.gguf_mix import MIXES, tensor_types
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import CheckpointError, ConfigError, DGemmaError
from dgemma.runtime.tokenizer import GGUFTokenizerMetadata

S, F = "sliding_attention", "full_attention"
# every width a multiple of 256 where K-quants apply (the tiny presets fall back to Q5_0/Q8_0/F16 everywhere);
# down experts 128 wide, like the real 704, take the row-size fallback
TINY_K = dict(
    hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    global_head_dim=128, num_global_key_value_heads=1, layer_types=[S, F], sliding_window=8, num_experts=4,
    top_k_experts=2, moe_intermediate_size=128, vocab_size=384, canvas_length=16, full_partial_rotary=0.25,
)
PRESETS = ["tiny-a", "tiny-b", "tiny-k"]
MIX_LIST = list(MIXES)
REAL_CONFIG = Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-26B-A4B-it"

A = "diffusion-gemma"
# gguf.md section 2, in file order (the eb_* keys are written when generation_config.json exists)
REF_KEYS = [
    ("general.architecture", VT.STRING), ("general.type", VT.STRING), ("general.name", VT.STRING),
    ("general.size_label", VT.STRING), (f"{A}.block_count", VT.UINT32), (f"{A}.context_length", VT.UINT32),
    (f"{A}.embedding_length", VT.UINT32), (f"{A}.feed_forward_length", VT.UINT32),
    (f"{A}.attention.head_count", VT.UINT32), (f"{A}.attention.head_count_kv", (VT.ARRAY, VT.INT32)),
    (f"{A}.rope.freq_base", VT.FLOAT32), (f"{A}.rope.freq_base_swa", VT.FLOAT32),
    (f"{A}.attention.layer_norm_rms_epsilon", VT.FLOAT32), (f"{A}.expert_count", VT.UINT32),
    (f"{A}.expert_used_count", VT.UINT32), (f"{A}.attention.key_length", VT.UINT32),
    (f"{A}.attention.value_length", VT.UINT32), (f"{A}.final_logit_softcapping", VT.FLOAT32),
    (f"{A}.attention.sliding_window", VT.UINT32), (f"{A}.attention.shared_kv_layers", VT.UINT32),
    (f"{A}.embedding_length_per_layer_input", VT.UINT32),
    (f"{A}.attention.sliding_window_pattern", (VT.ARRAY, VT.BOOL)), (f"{A}.attention.key_length_swa", VT.UINT32),
    (f"{A}.attention.value_length_swa", VT.UINT32), (f"{A}.expert_feed_forward_length", VT.UINT32),
    (f"{A}.rope.dimension_count", VT.UINT32), (f"{A}.rope.dimension_count_swa", VT.UINT32),
    (f"{A}.attention.causal", VT.BOOL), ("diffusion.canvas_length", VT.UINT32),
    ("diffusion.eb_max_steps", VT.UINT32), ("diffusion.eb_t_min", VT.FLOAT32), ("diffusion.eb_t_max", VT.FLOAT32),
    ("diffusion.eb_entropy_bound", VT.FLOAT32), ("diffusion.eb_stability_threshold", VT.UINT32),
    ("diffusion.eb_confidence_threshold", VT.FLOAT32),
    ("tokenizer.ggml.model", VT.STRING), ("tokenizer.ggml.tokens", (VT.ARRAY, VT.STRING)),
    ("tokenizer.ggml.scores", (VT.ARRAY, VT.FLOAT32)), ("tokenizer.ggml.token_type", (VT.ARRAY, VT.INT32)),
    ("tokenizer.ggml.merges", (VT.ARRAY, VT.STRING)), ("tokenizer.ggml.bos_token_id", VT.UINT32),
    ("tokenizer.ggml.eos_token_id", VT.UINT32), ("tokenizer.ggml.unknown_token_id", VT.UINT32),
    ("tokenizer.ggml.padding_token_id", VT.UINT32), ("tokenizer.ggml.mask_token_id", VT.UINT32),
    ("tokenizer.chat_template", VT.STRING), ("tokenizer.ggml.add_space_prefix", VT.BOOL),
    ("tokenizer.ggml.add_bos_token", VT.BOOL), ("general.quantization_version", VT.UINT32),
    ("general.file_type", VT.UINT32),
]
GLOBAL_TENSORS = ["output_norm.weight", "rope_freqs.weight", "self_cond_down.weight", "self_cond_gate.weight",
                  "self_cond_pre_norm.weight", "self_cond_up.weight", "token_embd.weight"]
# gguf.md section 3: (name, HF source under model.decoder.layers.N. or None)
LAYER_TENSORS = [
    ("attn_norm.weight", "input_layernorm.weight"), ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"), ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"), ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"), ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"), ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"), ("ffn_down.weight", "mlp.down_proj.weight"),
    ("post_ffw_norm_1.weight", "post_feedforward_layernorm_1.weight"),
    ("pre_ffw_norm_2.weight", "pre_feedforward_layernorm_2.weight"), ("ffn_gate_inp.weight", "router.proj.weight"),
    ("ffn_gate_inp.scale", "router.scale"), ("ffn_gate_up_exps.weight", "experts.gate_up_proj"),
    ("ffn_down_exps.weight", "experts.down_proj"), ("ffn_down_exps.scale", "router.per_expert_scale"),
    ("post_ffw_norm_2.weight", "post_feedforward_layernorm_2.weight"),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"), ("layer_output_scale.weight", "layer_scalar"),
    ("enc_layer_output_scale.weight", None),
]
GLOBAL_SOURCES = {
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
    "self_cond_pre_norm.weight": "self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": "self_conditioning.gate_proj.weight",
    "self_cond_up.weight": "self_conditioning.up_proj.weight",
    "self_cond_down.weight": "self_conditioning.down_proj.weight",
}
# relative RMSE of the decoded file data vs the bf16 source, per GGUF type (loose: tiny rows, few blocks)
REL_RMSE = {"BF16": 0.0, "F16": 1e-3, "F32": 0.0, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q5_1": 0.06,
            "Q5_0": 0.06, "Q4_K": 0.12, "MXFP4": 0.25, "NVFP4": 0.2}


def _preset(name: str):
    return TINY_K if name == "tiny-k" else name


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    """bf16 checkpoints (so a BF16 GGUF is lossless), written once per module."""
    from conftest import tiny

    made: dict[str, Path] = {}

    def get(p: str) -> Path:
        if p not in made:
            made[p] = tiny.write_checkpoint(tmp_path_factory.mktemp(p), _preset(p), dtype="bfloat16", shards=2)
        return made[p]

    return get


@pytest.fixture(scope="module")
def exported(bf16_source, tmp_path_factory):
    """(preset, mix) -> (src dir, gguf path or the DGemmaError raised, result)."""
    out_dir = tmp_path_factory.mktemp("gguf_out")
    cache: dict = {}

    def get(preset: str, mix: str):
        if (preset, mix) not in cache:
            src = bf16_source(preset)
            out = out_dir / f"{preset}-{mix}.gguf"
            try:
                res = export_gguf(GGUFExportOptions(src, out, mix))
                cache[preset, mix] = (src, out, res)
            except DGemmaError as e:
                cache[preset, mix] = (src, e, None)
        return cache[preset, mix]

    return get


def _src_tensors(src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _decoded(t) -> np.ndarray:
    """gguf-py's own decoding of a file tensor, in torch order."""
    shape = tuple(reversed([int(x) for x in t.shape]))
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()) / max(np.sqrt((b**2).mean()), 1e-30))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mix", MIX_LIST)
def test_layout_keys_tensors_and_data(exported, preset: str, mix: str) -> None:
    src, out, res = exported(preset, mix)
    root = json.loads((src / "config.json").read_text())
    text, gen = root["text_config"], json.loads((src / "generation_config.json").read_text())
    if isinstance(out, DGemmaError):
        # NVFP4 needs 64-multiples: tiny-a (Ie 32) and tiny-b (H 48) cannot be written
        assert mix == "nvfp4" and preset in ("tiny-a", "tiny-b") and isinstance(out, ConfigError)
        assert "multiples of 64" in str(out)
        return
    r = gguf.GGUFReader(out)

    # --- keys, order and types (gguf.md §2) ---
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == [k for k, _ in REF_KEYS], keys
    for k, vt in REF_KEYS:
        want = list(vt) if isinstance(vt, tuple) else [vt]
        assert r.fields[k].types == want, (k, r.fields[k].types)
    kv = {k: r.fields[k].contents() for k in keys}
    L, lt = text["num_hidden_layers"], text["layer_types"]
    assert kv["general.architecture"] == A and kv["general.type"] == "model"
    assert kv[f"{A}.block_count"] == L and kv[f"{A}.embedding_length"] == text["hidden_size"]
    assert kv[f"{A}.attention.head_count_kv"] == [
        text["num_key_value_heads"] if t == S else text["num_global_key_value_heads"] for t in lt]
    assert kv[f"{A}.attention.sliding_window_pattern"] == [t == S for t in lt]
    assert kv[f"{A}.attention.key_length"] == kv[f"{A}.attention.value_length"] == text["global_head_dim"]
    assert kv[f"{A}.rope.dimension_count"] == text["global_head_dim"]
    assert kv[f"{A}.attention.key_length_swa"] == kv[f"{A}.rope.dimension_count_swa"] == text["head_dim"]
    assert kv[f"{A}.expert_count"] == text["num_experts"] and kv[f"{A}.expert_used_count"] == text["top_k_experts"]
    assert kv[f"{A}.expert_feed_forward_length"] == text["moe_intermediate_size"]
    assert kv[f"{A}.feed_forward_length"] == text["intermediate_size"]
    assert kv[f"{A}.attention.sliding_window"] == text["sliding_window"]
    assert kv[f"{A}.context_length"] == text["max_position_embeddings"]
    assert kv[f"{A}.attention.causal"] is False
    assert kv[f"{A}.rope.freq_base"] == 1e6 and kv[f"{A}.rope.freq_base_swa"] == 1e4
    assert kv["diffusion.canvas_length"] == root["canvas_length"]
    assert kv["diffusion.eb_max_steps"] == gen["max_denoising_steps"]
    assert kv["diffusion.eb_t_min"] == pytest.approx(gen["t_min"]) and kv["diffusion.eb_t_max"] == pytest.approx(gen["t_max"])
    assert kv["diffusion.eb_entropy_bound"] == pytest.approx(gen["sampler_config"]["entropy_bound"])
    assert kv["general.file_type"] == int(MIXES[mix][0]) and kv["general.quantization_version"] == 2
    assert kv["tokenizer.ggml.model"] == "gemma4" and kv["tokenizer.ggml.mask_token_id"] == 4
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert len(kv["tokenizer.ggml.tokens"]) == text["vocab_size"]
    assert kv["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()

    # --- tensor set (gguf.md §3): 7 global + 23 per sliding + 22 per full layer (+3 per layer for NVFP4) ---
    names = [t.name for t in r.tensors]
    n_s, n_f = lt.count(S), lt.count(F)
    extra = 3 * L if mix == "nvfp4" else 0
    assert len(names) == 7 + 23 * n_s + 22 * n_f + extra == res.n_tensors
    want = set(GLOBAL_TENSORS)
    for i, t in enumerate(lt):
        layer = {f"blk.{i}.{n}" for n, _ in LAYER_TENSORS if not (n == "attn_v.weight" and t == F)}
        if mix == "nvfp4":
            layer.remove(f"blk.{i}.ffn_gate_up_exps.weight")
            layer |= {f"blk.{i}.{n}" for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_gate_exps.scale",
                                                 "ffn_up_exps.scale")}
        want |= layer
    assert set(names) == want

    # --- types: the mix's plan, and F32 for every 1-D / norm / router / .scale tensor (gguf.md §4.1) ---
    cfg = DGConfig.from_pretrained(src)
    plan_types = {s.gguf_name: t for s, t in tensor_types(cfg, mix)}
    for t in r.tensors:
        assert t.tensor_type == plan_types[t.name], t.name
        if len(t.shape) == 1 or "_norm.weight" in t.name or "ffn_gate_inp.weight" in t.name or not t.name.endswith("weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    if mix in ("bf16", "f16"):
        assert {t.tensor_type.name for t in r.tensors} == {"F32", mix.upper()}

    # --- data: gguf-py's decoding of every tensor vs the source tensor ---
    hf = _src_tensors(src)
    dec, enc = "model.decoder.", "model.encoder.language_model."
    files = {t.name: t for t in r.tensors}
    worst: dict[str, float] = {}
    for t in r.tensors:
        n = t.name
        got = _decoded(t)
        if n == "rope_freqs.weight":
            hd, prf = text["global_head_dim"], text["rope_parameters"][F]["partial_rotary_factor"]
            n_rot = int(hd * prf / 2)
            np.testing.assert_array_equal(got, np.array([1.0] * n_rot + [1e30] * (hd // 2 - n_rot), np.float32))
            continue
        if n.startswith("blk."):
            i, short = int(n.split(".")[1]), n.split(".", 2)[2]
            p = f"{dec}layers.{i}."
            if short == "enc_layer_output_scale.weight":
                ref = hf[f"{enc}layers.{i}.layer_scalar"]
            elif short in ("ffn_gate_exps.weight", "ffn_up_exps.weight"):
                gu = hf[p + "experts.gate_up_proj"]
                Ie = gu.shape[1] // 2
                ref = gu[:, :Ie] if short.startswith("ffn_gate") else gu[:, Ie:]
                got = got * _decoded(files[n.replace(".weight", ".scale")])[:, None, None]
            elif short in ("ffn_gate_exps.scale", "ffn_up_exps.scale"):
                continue  # checked through the weights above
            elif short == "ffn_down_exps.scale" and mix == "nvfp4":
                # per_expert_scale times the per-expert NVFP4 scale of down_proj (amax / (6 * 448))
                down = hf[p + "experts.down_proj"].float()
                g = down.abs().amax(dim=(1, 2)) / (6 * 448)
                np.testing.assert_allclose(got, (hf[p + "router.per_expert_scale"].float() * g).numpy(), rtol=1e-6)
                continue
            elif short == "ffn_down_exps.weight" and mix == "nvfp4":
                ref = hf[p + "experts.down_proj"]
                down = ref.float()
                got = got * (down.abs().amax(dim=(1, 2)) / (6 * 448)).numpy()[:, None, None]
            else:
                ref = hf[p + dict(LAYER_TENSORS)[short]]
        else:
            ref = hf[dec + GLOBAL_SOURCES[n]]
        ref = ref.float().numpy().reshape(got.shape)
        e = _rel(got, ref)
        worst[t.tensor_type.name] = max(worst.get(t.tensor_type.name, 0.0), e)
        assert e <= REL_RMSE[t.tensor_type.name] + 1e-12, (n, t.tensor_type.name, e)
    print(f"{preset} {mix}: worst relative RMSE per type {({k: round(v, 4) for k, v in worst.items()})}")


def test_real_26b_metadata_and_plan(tmp_path, monkeypatch) -> None:
    """Metadata values for the real config equal the Unsloth file's (gguf.md §2); 692 tensors in the Q4_K_M
    counts of the published file."""
    monkeypatch.chdir(tmp_path)
    cfg = DGConfig.from_pretrained(REAL_CONFIG)
    tok = GGUFTokenizerMetadata(tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], scores=[0.0] * 5,
                                token_types=[3] * 5, merges=["a b"], bos_id=2, eos_id=1, unk_id=3, pad_id=0,
                                mask_id=4, chat_template="{{ x }}")
    meta = {k: v for k, v, _, _ in gguf_metadata(cfg, tok, "q4_k_m", name="x", size_label="y",
                                                 with_sampler_defaults=True)}
    assert meta[f"{A}.block_count"] == 30 and meta[f"{A}.context_length"] == 262144
    assert meta[f"{A}.embedding_length"] == 2816 and meta[f"{A}.feed_forward_length"] == 2112
    assert meta[f"{A}.attention.head_count"] == 16
    assert meta[f"{A}.attention.head_count_kv"] == ([8] * 5 + [2]) * 5
    assert meta[f"{A}.attention.sliding_window_pattern"] == ([True] * 5 + [False]) * 5
    assert (meta[f"{A}.rope.freq_base"], meta[f"{A}.rope.freq_base_swa"]) == (1e6, 1e4)
    assert meta[f"{A}.attention.layer_norm_rms_epsilon"] == 1e-6
    assert (meta[f"{A}.expert_count"], meta[f"{A}.expert_used_count"]) == (128, 8)
    assert meta[f"{A}.attention.key_length"] == meta[f"{A}.attention.value_length"] == 512
    assert meta[f"{A}.attention.key_length_swa"] == meta[f"{A}.attention.value_length_swa"] == 256
    assert (meta[f"{A}.rope.dimension_count"], meta[f"{A}.rope.dimension_count_swa"]) == (512, 256)
    assert meta[f"{A}.expert_feed_forward_length"] == 704 and meta[f"{A}.attention.sliding_window"] == 1024
    assert meta[f"{A}.final_logit_softcapping"] == 30.0 and meta["diffusion.canvas_length"] == 256
    assert meta["general.file_type"] == 15 and meta["general.quantization_version"] == 2
    assert (meta["diffusion.eb_max_steps"], meta["diffusion.eb_stability_threshold"]) == (48, 1)
    assert len(meta) == 44 + 6
    res = CliRunner().invoke(gguf_cmd, [str(REAL_CONFIG), "unused.gguf", "--type", "q4_k_m", "--dry-run"])
    assert res.exit_code == 0, res.output
    table = {ln.split()[0]: int(ln.split()[1]) for ln in res.output.splitlines()[2:]}
    assert table == {"f32": 423, "q4_K": 194, "q5_0": 33, "q8_0": 28, "q6_K": 14}
    assert "692 tensors" in res.output
    assert not Path("unused.gguf").exists()


# ---- CLI behaviour -------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name)


def test_cli_refuses_existing_output_unless_force(bf16_source, tmp_path) -> None:
    src = bf16_source("tiny-a")
    out = tmp_path / "m.gguf"
    run = CliRunner()
    r1 = run.invoke(gguf_cmd, [str(src), str(out), "--type", "q8_0", "-q"])
    assert r1.exit_code == 0, r1.output
    assert "wrote" in r1.output and out.is_file()
    before = out.read_bytes()
    r2 = run.invoke(gguf_cmd, [str(src), str(out), "--type", "q4_k_m", "-q"])
    assert r2.exit_code != 0 and "already exists" in r2.output and "--force" in r2.output
    assert out.read_bytes() == before
    r3 = run.invoke(gguf_cmd, [str(src), str(out), "--type", "q4_k_m", "-q", "--force"])
    assert r3.exit_code == 0, r3.output
    assert out.read_bytes() != before and _leftovers(tmp_path) == []


def test_cli_rejects_non_diffusiongemma_and_quantized_sources(bf16_source, tmp_path) -> None:
    src = _copy(bf16_source("tiny-a"), tmp_path / "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(gguf_cmd, [str(src), str(tmp_path / "x.gguf"), "--type", "bf16", "-q"])
    assert r.exit_code != 0 and "'llama'" in r.output and "diffusion_gemma" in r.output
    cfg["model_type"] = "diffusion_gemma"
    cfg["quantization_config"] = {"quant_method": "modelopt"}
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(gguf_cmd, [str(src), str(tmp_path / "x.gguf"), "--type", "bf16", "-q"])
    assert r.exit_code != 0 and "already quantized" in r.output
    assert not (tmp_path / "x.gguf").exists()


def test_nan_weight_is_refused_and_nothing_is_left(bf16_source, tmp_path) -> None:
    src = _copy(bf16_source("tiny-a"), tmp_path / "nan")
    name = "model.decoder.layers.1.mlp.up_proj.weight"
    for f in src.glob("*.safetensors"):
        t = load_file(str(f))
        if name in t:
            t[name][3, 5] = float("nan")
            save_file(t, str(f), metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for mix in ("bf16", "q4_k_m"):
        with pytest.raises(CheckpointError, match="NaN") as ei:
            export_gguf(GGUFExportOptions(src, out_dir / "m.gguf", mix))
        assert name in str(ei.value)
    assert list(out_dir.iterdir()) == []


def test_interrupt_leaves_nothing(bf16_source, tmp_path, monkeypatch) -> None:
    src = bf16_source("tiny-a")
    calls = {"n": 0}
    real = gguf_export.quantize_planned

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gguf_export, "quantize_planned", flaky)
    out = tmp_path / "m.gguf"
    with pytest.raises(KeyboardInterrupt):
        export_gguf(GGUFExportOptions(src, out, "q8_0"))
    assert list(tmp_path.iterdir()) == []
    calls["n"] = 0
    r = CliRunner().invoke(gguf_cmd, [str(src), str(out), "--type", "q8_0", "-q"])
    assert r.exit_code == 130 and "nothing was written" in r.output
    assert list(tmp_path.iterdir()) == []


def test_calibration_text_and_statistics(bf16_source, tmp_path) -> None:
    """Text calibration: a note, same bytes as without. A statistics file: importance changes the K-quant
    encodings and lowers the importance-weighted error of every tensor it was used for."""
    from dgemma.converter.calibrate import CalibrationStats

    src = bf16_source("tiny-k")
    base = export_gguf(GGUFExportOptions(src, tmp_path / "base.gguf", "q4_k_m"))
    txt = tmp_path / "calib.txt"
    txt.write_text("Some calibration prose that is long enough to be split in two.\n\nAnother paragraph here.\n")
    r = CliRunner().invoke(gguf_cmd, [str(src), str(tmp_path / "txt.gguf"), "--type", "q4_k_m", "-q", "--calib", str(txt)])
    assert r.exit_code == 0, r.output
    assert "importance comes from the weights" in r.output
    assert (tmp_path / "txt.gguf").read_bytes() == (tmp_path / "base.gguf").read_bytes()
    assert base.importance_tensors == 0

    # synthetic statistics: heavily skewed per-column mean squares for every linear input
    cfg = DGConfig.from_pretrained(src)
    rng = np.random.default_rng(5)
    stats = CalibrationStats({"source": "test"})
    hf = _src_tensors(src)
    for n, t in hf.items():
        if not n.startswith("model.decoder.") or t.ndim < 2:
            continue
        if n.endswith(".experts.gate_up_proj") or n.endswith(".experts.down_proj"):
            E, K = t.shape[0], t.shape[-1]
            st = stats.get(n, K, E)
            for e in range(E - 1):  # the last expert gets no token: uniform importance
                x = torch.from_numpy(rng.standard_normal((5, K)) * np.exp(rng.normal(0, 1.5, K))).float()
                st.observe(x, e)
        elif n.endswith(".weight") and "embed_tokens" not in n:
            K = t.shape[-1]
            x = torch.from_numpy(rng.standard_normal((9, K)) * np.exp(rng.normal(0, 1.5, K))).float()
            stats.get(n[: -len(".weight")], K).observe(x)
    sfile = tmp_path / "calibration_stats.safetensors"
    stats.save(sfile)
    withcal = export_gguf(GGUFExportOptions(src, tmp_path / "cal.gguf", "q4_k_m", calib=sfile))
    assert withcal.importance_tensors > 0
    assert any("saw no calibration token" in n for n in withcal.notes)
    rb, rc = gguf.GGUFReader(tmp_path / "base.gguf"), gguf.GGUFReader(tmp_path / "cal.gguf")
    tb, tc = {t.name: t for t in rb.tensors}, {t.name: t for t in rc.tensors}
    improved = 0
    for s, qt in tensor_types(cfg, "q4_k_m"):
        if qt.name not in ("Q4_K", "Q5_K", "Q6_K", "Q5_0") or not s.hf_sources:
            continue
        mod = s.hf_sources[0].removesuffix(".weight")
        if mod not in stats:
            continue
        imp = stats.importance(mod).numpy()
        ref = hf[s.hf_sources[0]].float().numpy()
        w = imp[None, :] if imp.ndim == 1 else imp[:, None, :]
        errs = [float((((_decoded(t[s.gguf_name]) - ref) ** 2) * w).sum()) for t in (tb, tc)]
        assert errs[1] < errs[0], (s.gguf_name, errs)
        improved += 1
    assert improved >= 8
    print(f"importance lowered the weighted error on {improved} tensors")
