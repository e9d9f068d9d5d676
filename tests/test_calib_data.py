"""Calibration data: the packaged default set and user files (text / JSON lines), with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgemma.converter.calib_data import CalibSample, load_calibration, split_text
from dgemma.runtime.errors import DGemmaError, FormatError

CALIB_DIR = Path(__file__).resolve().parents[1] / "converter" / "calib"


def test_default_set_shape_and_mix():
    s = load_calibration()
    kinds = {k: sum(x.kind == k for x in s) for k in ("prose", "code", "chat")}
    print(f"default set: {len(s)} samples {kinds}")
    assert len(s) >= 200
    assert all(v >= 40 for v in kinds.values())
    assert all(isinstance(x, CalibSample) and x.prompt.strip() and x.continuation.strip() for x in s)
    assert (CALIB_DIR / "default.jsonl").stat().st_size < 1_000_000
    # chat samples are in the Gemma turn format: prompt ends by opening the model turn, answer closes it
    chats = [x for x in s if x.kind == "chat"]
    assert all(x.prompt.startswith(("<|turn>user\n", "<|turn>system\n")) for x in chats)
    assert all(x.prompt.endswith("<|turn>model\n") and x.continuation.endswith("<turn|>") for x in chats)
    assert any("def " in x.prompt for x in s if x.kind == "code")
    # any prefix is mixed
    first = load_calibration(n=30)
    assert first == s[:30] and {x.kind for x in first} == {"prose", "code", "chat"}
    # attribution ships next to the data
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (CALIB_DIR / "LICENSE-PSF.txt").read_text()
    sources = [json.loads(line)["source"] for line in (CALIB_DIR / "default.jsonl").read_text().splitlines()]
    assert all(src.startswith(("CPython 3.11 Lib/", "dgemma-original", "generated arithmetic")) for src in sources)


def test_split_text():
    p, c = split_text("one two three four")
    assert (p, c) == ("one two", " three four")
    assert split_text("abcdef") == ("abc", "def")
    p, c = split_text("a\nbb ccc dddd")
    assert p + c == "a\nbb ccc dddd" and c.startswith(" ")


def test_plain_text_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("First paragraph has a few words in it.\nIt continues here.\n\n\nshort\n\n"
                 "Second paragraph, also long enough to split.\n", encoding="utf-8")
    s = load_calibration(f)
    assert len(s) == 2  # "short" is skipped
    assert s[0].prompt + s[0].continuation == "First paragraph has a few words in it.\nIt continues here."
    assert s[1].kind == "user" and s[1].continuation.startswith(" ")
    assert load_calibration(f, n=1) == s[:1]
    assert load_calibration(f, n=10) == s  # more than available: all, with a warning


def test_jsonl_file(tmp_path):
    f = tmp_path / "calib.jsonl"
    rows = [{"prompt": "Q: 2+2?", "continuation": " A: 4", "kind": "math"}, {"text": "alpha beta gamma delta"}, {}]
    f.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    s = load_calibration(f)
    assert s == [CalibSample("Q: 2+2?", " A: 4", "math"), CalibSample("alpha beta", " gamma delta", "user")]
    # detected by content, whatever the suffix
    g = tmp_path / "calib.txt"
    g.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_calibration(g) == s


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"prompt": "a", "continuation": "b"}\n{"prompt": "a"\n', r":2: not valid JSON"),
        ('{"prompt": "a", "continuation": "b"}\n[1, 2]\n', r":2: expected a JSON object"),
        ('{"prompt": "a", "continuation": "b"}\n\n{"prompt": "a"}\n', r":3: 'prompt' and 'continuation'"),
        ('{"prompt": "a", "continuation": 5}\n', r":1: 'prompt' and 'continuation'"),
        ('{"prompt": " ", "continuation": "b"}\n', r":1: .*must not be empty"),
        ('{"text": 3}\n', r":1: 'text' must be a string"),
        ('{"text": "x"}\n', r":1: 'text' is too short"),
        ('{"body": "hello"}\n', r":1: expected fields"),
        ('{"text": "a b c d", "kind": 1}\n', r":1: 'kind' must be a string"),
    ],
)
def test_bad_jsonl_reports_line(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(FormatError, match=match):
        load_calibration(f)


def test_bad_files(tmp_path):
    with pytest.raises(DGemmaError, match="not found"):
        load_calibration(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(FormatError, match="no calibration samples"):
        load_calibration(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait, tr\xe8s bien, with enough words".encode("latin-1"))
    with pytest.raises(FormatError, match="UTF-8"):
        load_calibration(latin)
    for bad_n in (0, -3, 2.5):
        with pytest.raises(FormatError, match="positive integer"):
            load_calibration(n=bad_n)
