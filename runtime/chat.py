"""Chat templates (rendered in a Jinja sandbox) and splitting model output into thoughts and answer.

Templates come from the checkpoint (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) and
are untrusted input: they run in `jinja2.sandbox.ImmutableSandboxedEnvironment` with the same settings and
helpers as HF `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `tojson`,
`strftime_now`, a namespace that refuses underscore names), so a template renders exactly as in HF and an
attempt to reach Python internals raises `ChatTemplateError`. Checkpoints without a template get
`GEMMA4_CHAT_TEMPLATE`, our own Gemma 4 turn format (architecture.md section 8).
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from dgemma.runtime.errors import FormatError

logger = logging.getLogger(__name__)

CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
# Stop markers of a model turn: anything after them is not part of the answer.
STOP_MARKERS: tuple[str, ...] = ("<turn|>", "<eos>", "<|tool_response>")

# The built-in Gemma 4 format:
#   <bos>[<|turn>system\n[<|think|>\n]{system}<turn|>\n](<|turn>{user|model}\n{content}<turn|>\n)*<|turn>model\n
# - roles: system/developer (first message only, becomes the system turn), user, assistant/model -> 'model';
# - enable_thinking puts <|think|> at the top of the system turn (a system turn is opened for it if needed);
# - thought channels (<|channel>...<channel|>) are stripped from earlier model turns;
# - with thinking off, the generation prompt primes an empty thought channel `<|channel>thought\n<channel|>`
#   (as in google/gemma-4 templates; unconfirmed for DiffusionGemma, see architecture.md section 8).
GEMMA4_CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is mapping -%}
{{- content['text'] if 'text' in content else '' -}}
{%- elif content is iterable -%}
{%- for item in content -%}
{%- if item is string -%}
{{- item -}}
{%- elif item is mapping and item.get('type', 'text') == 'text' -%}
{{- item.get('text', '') -}}
{%- endif -%}
{%- endfor -%}
{%- elif content is not none -%}
{{- content | string -}}
{%- endif -%}
{%- endmacro -%}
{%- macro strip_thoughts(text) -%}
{%- set ns = namespace(out='') -%}
{%- for part in text.split('<channel|>') -%}
{%- if '<|channel>' in part -%}
{%- set ns.out = ns.out + part.split('<|channel>')[0] -%}
{%- else -%}
{%- set ns.out = ns.out + part -%}
{%- endif -%}
{%- endfor -%}
{{- ns.out -}}
{%- endmacro -%}
{%- set thinking = enable_thinking is defined and enable_thinking -%}
{%- set has_system = messages | length > 0 and messages[0]['role'] in ['system', 'developer'] -%}
{{- bos_token -}}
{%- if thinking or has_system -%}
{{- '<|turn>system\n' -}}
{%- if thinking -%}
{{- '<|think|>\n' -}}
{%- endif -%}
{%- if has_system -%}
{{- render_content(messages[0]['content']) | trim -}}
{%- endif -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (loop.first and has_system) -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- if role not in ['user', 'model', 'system', 'developer'] -%}
{{- raise_exception("the built-in Gemma 4 template has no role '" + role + "' (use system, user, assistant)") -}}
{%- endif -%}
{%- set role = 'system' if role == 'developer' else role -%}
{{- '<|turn>' + role + '\n' -}}
{%- if role == 'model' -%}
{{- strip_thoughts(render_content(message['content'])) | trim -}}
{%- else -%}
{{- render_content(message['content']) | trim -}}
{%- endif -%}
{{- '<turn|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\n' -}}
{%- if not thinking -%}
{{- '<|channel>thought\n<channel|>' -}}
{%- endif -%}
{%- endif -%}
"""


class ChatTemplateError(FormatError):
    """A chat template that does not parse, fails while rendering, or breaks the sandbox's rules."""


def find_chat_template(model_dir: str | Path) -> str | None:
    """The checkpoint's own template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`
    (a string, or a list of {name, template} where 'default' is taken). None when it has none."""
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{jinja}: cannot read ({e})") from e
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{cfg_path}: cannot read JSON ({e})") from e
        tmpl = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(tmpl, list):
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default")
        if tmpl is not None and not isinstance(tmpl, str):
            raise FormatError(f"{cfg_path}: chat_template must be a string or a list of named templates")
        return tmpl
    return None


def load_chat_template(model_dir: str | Path) -> str:
    """`find_chat_template`, falling back to the built-in `GEMMA4_CHAT_TEMPLATE`."""
    tmpl = find_chat_template(model_dir)
    if tmpl is None:
        logger.info("%s has no chat template; using the built-in Gemma 4 format", model_dir)
        return GEMMA4_CHAT_TEMPLATE
    return tmpl


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tag) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class _Namespace(jinja2.utils.Namespace):
        # Refuse underscore names so a template cannot plant dunder attributes (as HF does).
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _StrictSandbox(ImmutableSandboxedEnvironment):
        # Jinja's sandbox turns an unsafe attribute into an Undefined that renders as ''; raising at once
        # makes a template that reaches for Python internals fail loudly instead.
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e} (line {e.lineno})") from e


class _TemplateDict:
    """`dict(...)` / `dict.fromkeys(...)` inside templates without handing over the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the template never sees an object with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None = None, *,
                add_generation_prompt: bool = True, enable_thinking: bool = False, bos_token: str = "<bos>",
                eos_token: str = "<eos>", tools: Sequence[Mapping[str, Any]] | None = None,
                **kwargs: Any) -> str:
    """Render `messages` ([{'role': ..., 'content': ...}, ...]) with `template` (None: the built-in one).

    The result already contains the BOS string when the template writes it (Gemma's does): encode it with
    `Tokenizer.encode(text, add_bos=False)`. Extra keyword arguments are passed to the template, as in HF.
    """
    import jinja2

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    chat = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"each message must be a dict with a 'role', got {m!r}")
        m = _plain(m)
        # HF copies a message's reasoning under the names templates read.
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    compiled = _compile(template if template is not None else GEMMA4_CHAT_TEMPLATE)
    try:
        return compiled.render(messages=chat, tools=_plain(tools), documents=None,
                               add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                               bos_token=bos_token, eos_token=eos_token, **_plain(kwargs))
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, template: str | None = None,
                add_generation_prompt: bool = True, enable_thinking: bool = False, **kwargs: Any) -> list[int]:
    """Prompt ids for `messages`: render with `template`, else the tokenizer's checkpoint template, else the
    built-in one, then encode without adding BOS (the template writes it), as HF's
    `apply_chat_template(tokenize=True)` does."""
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    text = render_chat(messages, template, add_generation_prompt=add_generation_prompt,
                       enable_thinking=enable_thinking, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                       **kwargs)
    return tokenizer.encode(text, add_bos=False)


def split_thoughts(text: str) -> tuple[str, str]:
    """Split decoded model output into (thoughts, answer).

    Thoughts are the contents of `<|channel>...<channel|>` blocks (a leading 'thought' label and the newline
    after it are dropped); an unterminated channel runs to the end. A `<channel|>` with no opening marker (the
    prompt opened the channel) makes everything before it thoughts. Text after the first stop marker
    (`<turn|>`, `<eos>`, `<|tool_response>`) and `<pad>` tokens are removed. Both parts are stripped.
    """
    text = clean_output(text)
    thoughts: list[str] = []
    answer: list[str] = []
    pos = 0
    first_end = text.find(CHANNEL_END)
    first_start = text.find(CHANNEL_START)
    if first_end != -1 and (first_start == -1 or first_end < first_start):
        thoughts.append(text[:first_end])
        pos = first_end + len(CHANNEL_END)
    while True:
        start = text.find(CHANNEL_START, pos)
        if start == -1:
            answer.append(text[pos:])
            break
        answer.append(text[pos:start])
        body_start = start + len(CHANNEL_START)
        end = text.find(CHANNEL_END, body_start)
        body = text[body_start:] if end == -1 else text[body_start:end]
        thoughts.append(_drop_label(body))
        if end == -1:
            break
        pos = end + len(CHANNEL_END)
    return "\n".join(t.strip() for t in thoughts if t.strip()), "".join(answer).strip()


def _drop_label(body: str) -> str:
    # '<|channel>thought\n...' names the channel on its first line.
    if body.startswith("thought"):
        rest = body[len("thought"):]
        if rest == "" or rest[0] in "\n ":
            return rest[1:] if rest else rest
    return body


def clean_output(text: str) -> str:
    """Cut decoded output at the first stop marker and remove `<pad>` strings."""
    cut = min((i for i in (text.find(m) for m in STOP_MARKERS) if i != -1), default=len(text))
    return text[:cut].replace("<pad>", "")
