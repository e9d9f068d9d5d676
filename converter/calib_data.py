"""Calibration text for NVFP4 conversion: the packaged default set or a user file, as prompt/continuation pairs.

The encoder path calibrates on prompts; the decoder path on canvases built from continuations (noised), so
every sample is split in two. Accepted user files (`--calib FILE`):
- JSON lines: one object per non-blank line with either `prompt` + `continuation` or `text` (split at a word
  boundary near the middle); optional `kind` (defaults to "user"). Detected by a `.jsonl` / `.ndjson` suffix or
  a first non-blank line that is a JSON object.
- plain UTF-8 text: paragraphs separated by blank lines, each split near its middle; paragraphs under
  `MIN_PARAGRAPH_CHARS` characters are skipped.
The default set (converter/calib/default.jsonl, 276 samples of prose, code and Gemma-format chat) is made by
`scripts/make_calib_set.py`; see converter/calib/README.md for its sources and license.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..runtime.errors import FormatError

log = logging.getLogger(__name__)

DEFAULT_NAME = "default.jsonl"
MIN_PARAGRAPH_CHARS = 16
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class CalibSample:
    prompt: str
    continuation: str
    kind: str  # "prose" | "code" | "chat" for the default set, "user" (or the file's own) otherwise


def split_text(text: str) -> tuple[str, str]:
    """Split at the whitespace closest to the middle (the continuation keeps the leading space, as a tokenizer
    would see it in running text); text without whitespace is split at the middle character."""
    mid = len(text) // 2
    best = None
    for i, ch in enumerate(text):
        if ch.isspace() and 0 < i < len(text) - 1 and (best is None or abs(i - mid) < abs(best - mid)):
            best = i
    cut = best if best is not None else mid
    return text[:cut], text[cut:]


def _from_text_field(text: str, kind: str, where: str) -> CalibSample:
    text = text.strip()
    if len(text) < 2:
        raise FormatError(f"{where}: 'text' is too short to split into a prompt and a continuation")
    p, c = split_text(text)
    return CalibSample(p, c, kind)


def _parse_jsonl(lines: list[str], source: str) -> list[CalibSample]:
    out = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        kind = obj.get("kind", "user")
        if not isinstance(kind, str):
            raise FormatError(f"{where}: 'kind' must be a string")
        if "prompt" in obj or "continuation" in obj:
            p, c = obj.get("prompt"), obj.get("continuation")
            if not isinstance(p, str) or not isinstance(c, str):
                raise FormatError(f"{where}: 'prompt' and 'continuation' must both be present and be strings")
            if not p.strip() or not c.strip():
                raise FormatError(f"{where}: 'prompt' and 'continuation' must not be empty")
            out.append(CalibSample(p, c, kind))
        elif "text" in obj:
            if not isinstance(obj["text"], str):
                raise FormatError(f"{where}: 'text' must be a string")
            out.append(_from_text_field(obj["text"], kind, where))
        else:
            raise FormatError(f"{where}: expected fields 'prompt' and 'continuation', or 'text'; got {sorted(obj)}")
    return out


def _parse_text(content: str, source: str) -> list[CalibSample]:
    out, skipped = [], 0
    para: list[str] = []
    for line in content.splitlines() + [""]:
        if line.strip():
            para.append(line.rstrip())
            continue
        if para:
            text = "\n".join(para).strip()
            para = []
            if len(text) < MIN_PARAGRAPH_CHARS:
                skipped += 1
                continue
            out.append(CalibSample(*split_text(text), "user"))
    if skipped:
        log.info("%s: skipped %d paragraph(s) shorter than %d characters", source, skipped, MIN_PARAGRAPH_CHARS)
    return out


def _looks_like_jsonl(content: str) -> bool:
    for line in content.splitlines():
        if line.strip():
            try:
                return isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                return False
    return False


def _read_default() -> tuple[str, str]:
    res = resources.files(__package__).joinpath("calib").joinpath(DEFAULT_NAME)  # one arg per call: py3.10
    return res.read_text(encoding="utf-8"), f"<packaged calib/{DEFAULT_NAME}>"


def load_calibration(path: str | Path | None = None, n: int | None = None) -> list[CalibSample]:
    """Calibration samples from `path` (text or JSON lines) or the packaged default set; the first `n` if given.

    The default set is stored with its kinds interleaved, so any prefix is a mix of prose, code and chat."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise FormatError(f"the number of calibration samples must be a positive integer, got {n!r}")
    if path is None:
        content, source = _read_default()
        samples = _parse_jsonl(content.splitlines(), source)
    else:
        p = Path(path)
        if not p.is_file():
            raise FormatError(f"{p}: calibration file not found")
        try:
            content = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{p}: not UTF-8 text (byte {e.start}); calibration files must be UTF-8") from None
        source = str(p)
        if p.suffix.lower() in _JSONL_SUFFIXES or _looks_like_jsonl(content):
            samples = _parse_jsonl(content.splitlines(), source)
        else:
            samples = _parse_text(content, source)
    if not samples:
        raise FormatError(f"{source}: no calibration samples found (empty file, or only short paragraphs)")
    if n is not None:
        if n > len(samples):
            log.warning("%s has %d calibration samples; %d requested, using all", source, len(samples), n)
        samples = samples[:n]
    return samples
