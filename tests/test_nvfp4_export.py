"""NVFP4 export: tensor names / dtypes / shapes of both layouts read back with `safetensors`, configs, side files,
the streaming writer's plan vs the precision policy, the CLI, and every refusal (existing DST, NaN source, not a
DiffusionGemma checkpoint, Ctrl-C mid-conversion)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from dgemma.converter import nvfp4_export
from dgemma.converter.calibrate import STATS_FILE, CalibrationStats, StreamingCalibrator
from dgemma.converter.nvfp4_cli import nvfp4 as nvfp4_cmd
from dgemma.converter.nvfp4_export import REPORT_FILE, ConvertOptions, convert_nvfp4, plan_bytes
from dgemma.converter.policy import NVFP4, plan_table, plan_total_bytes, tensor_plan
from dgemma.runtime import model as rt_model
from dgemma.runtime.config import DGConfig
from dgemma.runtime.errors import CheckpointError, ConfigError, DGemmaError
from dgemma.runtime.hf_names import checkpoint_tensors
from dgemma.runtime.safetensors_io import CheckpointFiles

FAST = dict(calib_samples=3, max_prompt_tokens=24, progress=False, scale_search="rtn")
REAL_CONFIG = Path(__file__).resolve().parents[1] / "models" / "diffusiongemma-26B-A4B-it"
MO = ("weight", "U8", "weight_scale", "F8_E4M3", "weight_scale_2", "F32", "input_scale", "F32")


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    made = {}

    def make(model="tiny-a", preset="experts", layout="modelopt"):
        key = (model, preset, layout)
        if key not in made:
            dst = tmp_path_factory.mktemp("exp") / "out"
            convert_nvfp4(tiny_checkpoint(model), dst, ConvertOptions(preset=preset, layout=layout, **FAST))
            made[key] = dst
        return made[key]

    return make


def _read_all(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """tensors, safetensors dtype strings (from the headers), weight_map."""
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    tensors, dtypes = {}, {}
    for shard in sorted(set(idx.values())):
        raw = (d / shard).read_bytes()
        header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
        with safe_open(str(d / shard), framework="pt") as f:
            names = set(f.keys())
            assert names == {k for k, v in idx.items() if v == shard}
            for k in names:
                tensors[k] = f.get_tensor(k)
                dtypes[k] = header[k]["dtype"]
    return tensors, dtypes, idx


def _quant_names(layout: str, m: str) -> dict[str, tuple[str, tuple | None]]:
    """Expected tensor -> (dtype, shape or None) of one quantized linear `m` (shapes checked separately)."""
    if layout == "modelopt":
        return {f"{m}.weight": ("U8", None), f"{m}.weight_scale": ("F8_E4M3", None), f"{m}.weight_scale_2": ("F32", ()),
                f"{m}.input_scale": ("F32", ())}
    return {f"{m}.weight_packed": ("U8", None), f"{m}.weight_scale": ("F8_E4M3", None),
            f"{m}.weight_global_scale": ("F32", (1,)), f"{m}.input_global_scale": ("F32", (1,))}


def _global(t: dict, m: str, layout: str) -> float:
    return float(t[f"{m}.weight_scale_2"]) if layout == "modelopt" else 1.0 / float(t[f"{m}.weight_global_scale"])


def _input(t: dict, m: str, layout: str) -> float:
    return float(t[f"{m}.input_scale"]) if layout == "modelopt" else float(t[f"{m}.input_global_scale"])


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("preset", ["experts", "default"])
@pytest.mark.parametrize("model_name", ["tiny-a", "tiny-b"])
def test_layout_spec(converted, tiny_checkpoint, model_name, preset, layout):
    src = tiny_checkpoint(model_name)
    out = converted(model_name, preset, layout)
    cfg = DGConfig.from_pretrained(src)
    fmts = {s.name: f for s, f in tensor_plan(cfg, preset)}
    t, dt, idx = _read_all(out)
    sf = CheckpointFiles(src)
    E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    expected: dict[str, tuple[str, tuple | None]] = {}
    copied: set[str] = set()
    for spec in checkpoint_tensors(cfg):
        name = spec.name
        if spec.component == "experts":
            if name.endswith("down_proj"):
                continue
            p = name[: -len(".gate_up_proj")]
            quant_any = fmts[p + ".gate_up_proj"] == NVFP4 or fmts[p + ".down_proj"] == NVFP4
            assert quant_any  # every tiny preset quantizes at least gate_up
            for e in range(E):
                for proj, fused, (N, K) in (("gate_proj", "gate_up_proj", (I, H)), ("up_proj", "gate_up_proj", (I, H)),
                                            ("down_proj", "down_proj", (H, I))):
                    m = f"{p}.{e}.{proj}"
                    if fmts[f"{p}.{fused}"] == NVFP4:
                        for k, (d, shp) in _quant_names(layout, m).items():
                            expected[k] = (d, shp if shp is not None else
                                           ((N, K // 2) if d == "U8" else (N, K // 16)))
                    else:
                        expected[f"{m}.weight"] = (sf.tensors[f"{p}.{fused}"].dtype, (N, K))
            continue
        if fmts[name] == NVFP4:
            N, K = spec.shape
            for k, (d, shp) in _quant_names(layout, name[: -len(".weight")]).items():
                expected[k] = (d, shp if shp is not None else ((N, K // 2) if d == "U8" else (N, K // 16)))
        else:
            expected[name] = (sf.tensors[name].dtype, spec.shape)
            copied.add(name)
    for n in sf.tensors:
        if n.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")):
            expected[n] = (sf.tensors[n].dtype, sf.tensors[n].shape)
            copied.add(n)
    assert set(t) == set(expected), (sorted(set(t) - set(expected))[:5], sorted(set(expected) - set(t))[:5])
    for k, (d, shp) in expected.items():
        assert dt[k] == d and tuple(t[k].shape) == tuple(shp), (k, dt[k], tuple(t[k].shape), d, shp)
    # unquantized tensors are copied bit for bit; tied weights once, under decoder names
    for k in copied:
        assert torch.equal(t[k], sf.get(k)), k
    assert not any(k.startswith("model.encoder.language_model.") and not k.endswith("layer_scalar") for k in t)
    # shared scales: gate/up per expert, one input scale per expert projection, q/k/v and dense gate/up groups
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}"
        if fmts[f"{p}.experts.gate_up_proj"] == NVFP4:
            for e in range(E):
                assert _global(t, f"{p}.experts.{e}.gate_proj", layout) == _global(t, f"{p}.experts.{e}.up_proj", layout)
            ins = {_input(t, f"{p}.experts.{e}.{q}", layout) for e in range(E) for q in ("gate_proj", "up_proj")}
            assert len(ins) == 1
        if preset == "default":
            qkv = [f"{p}.self_attn.{x}_proj" for x in "qkv" if f"{p}.self_attn.{x}_proj.weight" in fmts]
            assert len({_global(t, m, layout) for m in qkv}) == 1
            assert _global(t, f"{p}.mlp.gate_proj", layout) == _global(t, f"{p}.mlp.up_proj", layout)
    # configs and side files
    c = json.loads((out / "config.json").read_text())
    qc = c["quantization_config"]
    src_cfg = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in c.items() if k != "quantization_config"} == src_cfg
    if layout == "modelopt":
        hq = json.loads((out / "hf_quant_config.json").read_text())
        q = hq["quantization"]
        assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16 and "lm_head" in q["exclude_modules"]
        assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and qc["ignore"] == q["exclude_modules"]
        g = qc["config_groups"]["group_0"]
        assert g["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        assert g["input_activations"] == g["weights"] and g["targets"] == ["Linear"]
    else:
        assert not (out / "hf_quant_config.json").exists()
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
        assert qc["quantization_status"] == "compressed"
        w = qc["config_groups"]["group_0"]["weights"]
        assert (w["num_bits"], w["type"], w["group_size"], w["strategy"], w["symmetric"]) == (4, "float", 16,
                                                                                              "tensor_group", True)
        assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    excl = [x.replace("\\", "") for x in qc["ignore"]]  # compressed-tensors: "re:" regexes
    if preset == "experts":
        assert any("self_attn.q_proj" in x for x in excl) and any("mlp.down_proj" in x for x in excl)
    else:
        assert not any("self_attn" in x for x in excl)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert STATS_FILE not in idx.values() and (out / STATS_FILE).is_file() and (out / REPORT_FILE).is_file()
    stats = CalibrationStats.load(out / STATS_FILE)
    assert "model.decoder.layers.0.experts.gate_up_proj" in stats and "model.decoder.self_conditioning.up_proj" in stats


def test_writer_plan_matches_the_policy():
    """The exporter's tensor list for the real 26B config has exactly the bytes the policy prints."""
    cfg = DGConfig.from_pretrained(REAL_CONFIG)
    for preset, gb in (("experts", 17.7), ("default", 15.3)):
        for layout in ("modelopt", "compressed-tensors"):
            b = plan_bytes(cfg, preset, layout)
            assert b == plan_total_bytes(plan_table(cfg, preset))
        print(f"{preset}: {b / 1e9:.3f} GB written for the text weights")
        assert abs(b / 1e9 - gb) < 0.06


def test_refusals(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("tiny-a")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(DGemmaError, match="already exists; pass --force"):
        convert_nvfp4(src, dst, ConvertOptions(**FAST))
    convert_nvfp4(src, dst, ConvertOptions(force=True, **FAST))
    assert not (dst / "keep.txt").exists() and (dst / "hf_quant_config.json").is_file()
    with pytest.raises(ConfigError, match="already quantized"):
        convert_nvfp4(dst, tmp_path / "again", ConvertOptions(**FAST))
    with pytest.raises(DGemmaError, match="must not be the source"):
        convert_nvfp4(src, src / "inner", ConvertOptions(**FAST))
    # not a DiffusionGemma checkpoint
    llama = tmp_path / "llama"
    shutil.copytree(src, llama)
    c = json.loads((llama / "config.json").read_text())
    c["model_type"] = "llama"
    (llama / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'diffusion_gemma'"):
        convert_nvfp4(llama, tmp_path / "o2", ConvertOptions(**FAST))
    with pytest.raises(ConfigError, match="no config.json"):
        convert_nvfp4(tmp_path, tmp_path.parent / "o3", ConvertOptions(**FAST))
    # odd widths: nothing can be NVFP4
    with pytest.raises(ConfigError, match="no tensor can be stored as NVFP4"):
        convert_nvfp4(tiny_checkpoint("tiny-odd"), tmp_path / "o4", ConvertOptions(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]


@pytest.mark.parametrize("where", ["model.decoder.layers.2.experts.down_proj", "model.decoder.embed_tokens.weight"])
def test_nan_source_is_refused(tiny_checkpoint, tmp_path, where):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("tiny-a"), src)
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][where]
    t = load_file(str(shard))
    t[where] = t[where].clone()
    t[where].view(-1)[5] = float("nan")
    save_file(t, str(shard))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        convert_nvfp4(src, tmp_path / "out", ConvertOptions(**FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_ctrl_c_leaves_nothing_half_written(tiny_checkpoint, tmp_path, monkeypatch):
    src = tiny_checkpoint("tiny-a")
    calls = {"n": 0}
    orig = StreamingCalibrator.advance

    def interrupted(self, i, layer):
        calls["n"] += 1
        if i == 2:
            raise KeyboardInterrupt
        return orig(self, i, layer)

    monkeypatch.setattr(StreamingCalibrator, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_nvfp4(src, tmp_path / "out", ConvertOptions(**FAST))
    assert calls["n"] == 3 and list(tmp_path.iterdir()) == []
    # with --force over an existing output, the old output survives an interrupted run untouched
    old = tmp_path / "old"
    old.mkdir()
    (old / "marker").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        convert_nvfp4(src, old, ConvertOptions(force=True, **FAST))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "marker").read_text() == "old"
    # the CLI says so and exits 130
    res = CliRunner().invoke(nvfp4_cmd, [str(src), str(tmp_path / "cli"), "--calib-samples", "2", "--quiet",
                                         "--scale-search", "rtn"])
    assert res.exit_code == 130 and "interrupted" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_cli_and_starved_experts(tiny_checkpoint, tmp_path, monkeypatch):
    """The command prints the plan, converts with a --calib text file, and lists experts that got no token (here
    expert 3, which a patched router never selects) instead of failing."""
    orig = rt_model.Router.forward

    def never_three(self, r):
        z = rt_model.rms_norm(r, None, self.eps) * self.scale * self.root
        logits = self.proj(z).float()
        logits[..., 3] = float("-inf")
        p = torch.softmax(logits, dim=-1)
        w, idx = torch.topk(p, k=self.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True)) * self.per_expert_scale[idx], idx

    monkeypatch.setattr(rt_model.Router, "forward", never_three)
    calib = tmp_path / "calib.txt"
    calib.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog again.\n\n"
                     "<|turn>user\nHello there, how are you?<turn|>\n<|turn>model\nFine, thanks.<turn|>\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(nvfp4_cmd, [str(tiny_checkpoint("tiny-a")), str(out), "--calib", str(calib), "--quiet",
                                         "--layout", "compressed-tensors", "--preset", "default"])
    assert res.exit_code == 0, res.output
    assert "NVFP4 plan, preset 'default'" in res.output and "experts without calibration tokens" in res.output
    assert "layer 0: [3]" in res.output
    rep = json.loads((out / REPORT_FILE).read_text())
    assert rep["starved_experts"] == {str(i): [3] for i in range(4)} and rep["calibration"]["samples"] == "3"
    st = CalibrationStats.load(out / STATS_FILE)
    assert int(st.inputs["model.decoder.layers.1.experts.gate_up_proj"].tokens[3]) == 0
    monkeypatch.setattr(rt_model.Router, "forward", orig)
    res = CliRunner().invoke(nvfp4_cmd, [str(tiny_checkpoint("tiny-a")), str(out), "--quiet"])
    assert res.exit_code == 1 and "already exists" in res.output


def test_report_layer_errors(converted):
    rep = json.loads((converted("tiny-a", "experts", "modelopt") / REPORT_FILE).read_text())
    assert len(rep["layer_errors"]) == 4 and all(0 < e["dec_rel"] < 1 for e in rep["layer_errors"])
    assert rep["options"]["scale_search"] == "rtn" and rep["bytes_written"] > 0
    assert nvfp4_export.LAYOUTS == ("modelopt", "compressed-tensors")
