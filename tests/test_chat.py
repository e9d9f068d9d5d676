"""Chat templates: rendering equal to HF apply_chat_template, the sandbox, thought splitting."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from dgemma.runtime.chat import (
    GEMMA4_CHAT_TEMPLATE, ChatTemplateError, clean_output, encode_chat, find_chat_template, load_chat_template,
    render_chat, split_thoughts,
)
from dgemma.runtime.errors import DGemmaError
from dgemma.runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = {"role": "system", "content": "  You are terse.\n"}
USER = {"role": "user", "content": "Why is the sky blue? "}
CONVERSATIONS = {
    "user": [USER],
    "system": [SYSTEM, USER],
    "multi_turn": [
        SYSTEM, USER,
        {"role": "assistant", "content": "<|channel>thought\nRayleigh.<channel|>Rayleigh scattering."},
        {"role": "user", "content": [{"type": "text", "text": "And sunsets?"}, {"type": "image"}]},
        {"role": "model", "content": "Longer path, more scattering."},
        {"role": "user", "content": "日本語で 😀\n\tthanks"},
    ],
    "developer": [{"role": "developer", "content": "Be kind."}, USER],
}

# A third-party style template exercising what HF's environment offers (loop controls, namespace, tojson,
# raise_exception, the generation tag, trim_blocks / lstrip_blocks).
CHATML = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ m['role'] }}
{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] | trim }}{% endif %}<|im_end|>
    {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}<|im_start|>assistant ({{ ns.n }}){{ '\\n' }}{% endif %}"""


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("_dg_tiny_tok", ROOT / "scripts" / "make_tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("chat_tok")
    load_script().write_tiny_tokenizer(d, 384, "bpe")
    return d


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _hf_ids(hf_tok: Any, messages: list, **kw: Any) -> list[int]:
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_hf(name: str, thinking: bool, gen: bool, tok_dir: Path, hf_tok: Any) -> None:
    messages = CONVERSATIONS[name]
    template = load_chat_template(tok_dir)
    assert template == GEMMA4_CHAT_TEMPLATE
    mine = render_chat(messages, template, add_generation_prompt=gen, enable_thinking=thinking)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, enable_thinking=thinking)
    assert mine == ref
    tok = Tokenizer.from_pretrained(tok_dir)
    ids = _hf_ids(hf_tok, messages, add_generation_prompt=gen, enable_thinking=thinking)
    assert tok.encode(mine, add_bos=False) == ids
    assert encode_chat(tok, messages, add_generation_prompt=gen, enable_thinking=thinking) == ids
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_builtin_format_by_hand() -> None:
    """The built-in template against hand-written strings (architecture.md section 8)."""
    assert render_chat([USER]) == (
        "<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert render_chat([SYSTEM, USER], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nYou are terse.<turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n"
        "<|turn>model\n")
    assert render_chat([USER], enable_thinking=True, add_generation_prompt=False) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n")
    multi = render_chat(CONVERSATIONS["multi_turn"], bos_token="")
    assert "<|turn>model\nRayleigh scattering.<turn|>\n" in multi and "Rayleigh.<" not in multi
    assert "<|turn>user\nAnd sunsets?<turn|>\n" in multi
    with pytest.raises(ChatTemplateError, match="tool"):
        render_chat([{"role": "tool", "content": "x"}])


def test_other_template_equals_hf(tok_dir: Path, hf_tok: Any, tmp_path: Path) -> None:
    d = tmp_path / "chatml"
    d.mkdir()
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (d / f).write_bytes((tok_dir / f).read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert find_chat_template(d) == CHATML  # no chat_template.jinja: the config's template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "é"}}}]
    msgs = CONVERSATIONS["multi_turn"][:3] + [{"role": "user", "content": "again"}] * 4
    for kw in ({"add_generation_prompt": True, "tools": tools}, {"add_generation_prompt": False}):
        assert render_chat(msgs, load_chat_template(d), **kw) == hf.apply_chat_template(msgs, tokenize=False, **kw)
    with pytest.raises(ChatTemplateError, match="bad role"):
        render_chat([{"role": "tool", "content": "x"}], CHATML)
    assert Tokenizer.from_pretrained(d).chat_template == CHATML


def test_template_lookup(tmp_path: Path) -> None:
    assert find_chat_template(tmp_path) is None
    assert load_chat_template(tmp_path) == GEMMA4_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert find_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(DGemmaError, match="tokenizer_config.json"):
        find_chat_template(tmp_path)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ lipsum.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.__class__ }}",
    "{{ ''['__class__'] }}",
    "{{ '' | attr('__class__') }}",
    "{% set x = messages.append(1) %}",
    "{% set ns = namespace(_secret=1) %}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ dict.__call__.__globals__ }}",
    "{{ (messages|first).update({'role': 'x'}) }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ raise_exception('nope') }}",
    "{% for %}",
    "{{ 1 / 0 }}",
])
def test_sandbox_refuses(template: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        render_chat([USER], template)
    assert isinstance(info.value, DGemmaError)


def test_bad_messages() -> None:
    for bad in ("hello", [{"content": "no role"}], ["text"]):
        with pytest.raises(ChatTemplateError):
            render_chat(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text,expected", [
    ("<|channel>thought\nLet me think.<channel|>The answer.", ("Let me think.", "The answer.")),
    ("Just an answer.<turn|>\n<pad><pad>", ("", "Just an answer.")),
    ("<|channel>thought\nstill thinking", ("still thinking", "")),
    ("prompt-opened thoughts<channel|>answer<eos>junk", ("prompt-opened thoughts", "answer")),
    ("<|channel>thought\n<channel|>Empty thoughts.", ("", "Empty thoughts.")),
    ("A<|channel>thought\nx<channel|>B<|channel>y<channel|>C", ("x\ny", "ABC")),
    ("<|channel>thoughtful<channel|>z", ("thoughtful", "z")),
    ("", ("", "")),
])
def test_split_thoughts(text: str, expected: tuple[str, str]) -> None:
    assert split_thoughts(text) == expected


def test_clean_output() -> None:
    assert clean_output("a<pad>b<turn|>c<eos>") == "ab"
    assert clean_output("x<|tool_response>y") == "x"
