from __future__ import annotations

import json

import pytest

from dgemma.runtime.config import FULL, SLIDING, DGConfig
from dgemma.runtime.errors import ConfigError

from conftest import REAL_CONFIG_DIR


def test_real_26b_config():
    c = DGConfig.from_pretrained(REAL_CONFIG_DIR)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.canvas_length) == (262144, 2816, 30, 256)
    assert c.full_layer_ids == (5, 11, 17, 23, 29)
    g_s, g_f = c.layers[0], c.layers[5]
    assert (g_s.layer_type, g_s.head_dim, g_s.num_kv_heads, g_s.has_v_proj) == (SLIDING, 256, 8, True)
    assert (g_f.layer_type, g_f.head_dim, g_f.num_kv_heads, g_f.has_v_proj) == (FULL, 512, 2, False)
    assert c.rope[FULL].rope_type == "proportional" and c.rope[FULL].partial_rotary_factor == 0.25
    assert c.rope[FULL].theta == 1e6 and c.rope[SLIDING].theta == 1e4
    assert (c.num_experts, c.top_k_experts, c.moe_intermediate_size) == (128, 8, 704)
    assert c.eos_token_ids == (1, 106, 50) and c.pad_token_id == 0 and c.bos_token_id == 2
    gen = c.generation
    assert (gen.max_denoising_steps, gen.t_min, gen.t_max, gen.entropy_bound) == (48, 0.4, 0.8, 0.1)
    assert (gen.stability_threshold, gen.confidence_threshold, gen.max_new_tokens) == (1, 0.005, 256)


def test_resaved_per_layer_config_spelling(tmp_path):
    """transformers re-saves the geometry as `per_layer_config`; both spellings give the same layers."""
    root = json.loads((REAL_CONFIG_DIR / "config.json").read_text())
    tc = root["text_config"]
    tc.pop("global_head_dim")
    tc.pop("num_global_key_value_heads")
    tc["per_layer_config"] = {f"{i:02d}": {"head_dim": 512, "num_key_value_heads": 2} for i in (5, 11, 17, 23, 29)}
    (tmp_path / "config.json").write_text(json.dumps(root))
    a = DGConfig.from_pretrained(REAL_CONFIG_DIR)
    b = DGConfig.from_pretrained(tmp_path)
    assert a.layers == b.layers


def test_resave_by_transformers_matches(tmp_path):
    from transformers import DiffusionGemmaConfig

    DiffusionGemmaConfig.from_pretrained(REAL_CONFIG_DIR).save_pretrained(tmp_path)
    assert "per_layer_config" in json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert DGConfig.from_pretrained(tmp_path).layers == DGConfig.from_pretrained(REAL_CONFIG_DIR).layers


def _write(tmp_path, mutate, gen_mutate=None):
    root = json.loads((REAL_CONFIG_DIR / "config.json").read_text())
    mutate(root)
    (tmp_path / "config.json").write_text(json.dumps(root))
    if gen_mutate:
        gen = json.loads((REAL_CONFIG_DIR / "generation_config.json").read_text())
        gen_mutate(gen)
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return tmp_path


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda r: r["text_config"].pop("hidden_size"), "'hidden_size' is missing"),
        (lambda r: r["text_config"].__setitem__("num_experts", "128"), "'num_experts' must be int"),
        (lambda r: r["text_config"].__setitem__("top_k_experts", 0), "'top_k_experts' must be > 0"),
        (lambda r: r.__setitem__("model_type", "gemma3"), "expected 'diffusion_gemma'"),
        (lambda r: r["text_config"].__setitem__("layer_types", ["sliding_attention"] * 30), "last entry"),
        (lambda r: r["text_config"].__setitem__("layer_types", ["x"] * 30), "layer_types[0]"),
        (lambda r: r["text_config"].pop("rope_parameters"), "'rope_parameters' is missing"),
        (lambda r: r["text_config"].__setitem__("hidden_activation", "relu"), "hidden_activation"),
        (lambda r: r.pop("text_config"), "'text_config' is missing"),
        (lambda r: r["text_config"].__setitem__("per_layer_config", {"abc": {}}), "not a layer index"),
    ],
)
def test_malformed_fields_name_field_and_file(tmp_path, mutate, needle):
    _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as e:
        DGConfig.from_pretrained(tmp_path)
    assert needle in str(e.value)
    assert "config.json" in str(e.value)


def test_bad_generation_config(tmp_path):
    _write(tmp_path, lambda r: None, lambda g: g.update(t_min=0.9, t_max=0.8))
    with pytest.raises(ConfigError, match="generation_config.json"):
        DGConfig.from_pretrained(tmp_path)


def test_not_json_and_missing(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        DGConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DGConfig.from_pretrained(tmp_path)


def test_a_file_instead_of_a_directory(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(ConfigError, match="is a GGUF file; expected an HF checkpoint directory"):
        DGConfig.from_pretrained(f)
