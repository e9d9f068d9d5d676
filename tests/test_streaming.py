"""Streaming: committed text printed incrementally, drafts repainted in place on a terminal (checked with a
small terminal emulator), plain output only at the end, thoughts hidden or shown, sanitised model text."""
from __future__ import annotations

import importlib.util
import io
import random
import re
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch

from dgemma.runtime.chat import render_chat
from dgemma.runtime.errors import GenerationError
from dgemma.runtime.streaming import CanvasRenderer, TextStreamer, sanitize, visible_text
from dgemma.runtime.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Rayleigh scattering: short (blue) wavelengths scatter most.\n\tSo the sky looks blue 日本語 😀 — done."


class Screen:
    """A minimal terminal: auto-wrap with xterm's pending-wrap rule, '\\n' as CR LF (the tty's ONLCR), '\\r',
    ESC[nA (stops at the top of the screen), ESC[nC, ESC[J, ESC[...m (dim tracked per cell), scrolling."""

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.lines: list[list[tuple[str, bool]]] = [[]]
        self.r = self.c = 0
        self.pending = False
        self.dim = False

    def _top(self) -> int:
        return max(0, len(self.lines) - self.rows)

    def _newline(self) -> None:
        self.r += 1
        if self.r == len(self.lines):
            self.lines.append([])
        self.c, self.pending = 0, False

    def feed(self, data: str) -> None:
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                m = re.match(r"\x1b\[(\d*)([A-Za-z])", data[i:])
                assert m, f"unexpected escape {data[i:i + 8]!r}"
                n, op = int(m.group(1) or 1), m.group(2)
                if op == "A":
                    self.r, self.pending = max(self._top(), self.r - n), False
                elif op == "C":
                    self.c, self.pending = min(self.cols - 1, self.c + n), False
                elif op == "J":
                    del self.lines[self.r][self.c:]
                    for k in range(self.r + 1, len(self.lines)):
                        self.lines[k] = []
                elif op == "m":
                    self.dim = m.group(1) == "2"
                else:
                    raise AssertionError(f"unexpected escape {m.group(0)!r}")
                i += m.end()
                continue
            i += 1
            if ch == "\n":
                self._newline()
            elif ch == "\r":
                self.c, self.pending = 0, False
            else:
                assert unicodedata.category(ch) != "Cc", f"control character {ch!r} reached the terminal"
                w = 0 if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf") else (
                    2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1)
                if w == 0:
                    continue
                if self.pending or self.c + w > self.cols:
                    self._newline()
                line = self.lines[self.r]
                line += [(" ", False)] * (self.c - len(line))
                line[self.c:self.c + w] = [(ch, self.dim)] + [("", self.dim)] * (w - 1)
                self.c += w
                if self.c >= self.cols:
                    self.c, self.pending = self.cols, True

    def text(self, dim: bool | None = None) -> str:
        rows = ["".join(ch if dim is None or d == dim else (" " if ch else "") for ch, d in line).rstrip()
                for line in self.lines]
        while rows and not rows[-1]:
            rows.pop()
        return "\n".join(rows)


def layout(text: str, cols: int, rows: int = 1000) -> str:
    """`text` written on a clean terminal (tabs as spaces to the next multiple of 8, as the renderer sends)."""
    s = Screen(cols, rows)
    s.feed(text.expandtabs(8))
    return s.text()


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    spec = importlib.util.spec_from_file_location("_dg_tiny_tok", ROOT / "scripts" / "make_tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    d = tmp_path_factory.mktemp("stream_tok")
    mod.write_tiny_tokenizer(d, 384, "bpe")
    return Tokenizer.from_pretrained(d)


def canvases(tok: Tokenizer, text: str, size: int = 6, eos: str = "<turn|>") -> list[list[int]]:
    """The answer's ids + a stop token, cut into canvases and padded with <pad> like finished generation."""
    ids = tok.encode(text, add_bos=False) + [tok.token_to_id(eos)]
    ids += [tok.pad_id] * (-len(ids) % size)
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def drive(streamer: Any, tok: Tokenizer, text: str, *, prompt: str | None = None, drafts: int = 3,
          seed: int = 0, snap: Any = None, size: int = 6) -> None:
    """Call the streamer as DiffusionGemma's generate does: prompt, then per canvas drafts and the commit."""
    rng = random.Random(seed)
    p = prompt if prompt is not None else render_chat([{"role": "user", "content": "Why blue?"}])
    streamer.put(torch.tensor([tok.encode(p, add_bos=False)]))
    for canvas in canvases(tok, text, size):
        for step in range(drafts):
            noisy = [t if rng.random() < step / drafts else rng.randrange(tok.vocab_size) for t in canvas]
            streamer.put_draft(value=torch.tensor([noisy]))
            if snap:
                snap("draft")
        streamer.put(torch.tensor([canvas]))
        if snap:
            snap("commit")
    streamer.end()


def test_text_streamer_incremental(tok: Tokenizer) -> None:
    out = io.StringIO()
    seen: list[str] = []
    drive(TextStreamer(tok, out), tok, ANSWER, snap=lambda kind: seen.append(out.getvalue()))
    assert out.getvalue() == ANSWER + "\n"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    grew = sorted({len(s) for s in seen})
    assert len(grew) > 4, "text should appear canvas by canvas, not at the end"
    assert "\x1b" not in out.getvalue()


def test_plain_renderer_prints_only_final_text(tok: Tokenizer) -> None:
    out = io.StringIO()
    seen: list[str] = []
    r = CanvasRenderer(tok, out, is_tty=False)
    drive(r, tok, ANSWER, snap=lambda kind: seen.append(out.getvalue()))
    assert set(seen) == {""}
    assert out.getvalue() == ANSWER + "\n"
    assert r.drafts_drawn == 0


@pytest.mark.parametrize("cols,rows", [(16, 8), (23, 4), (80, 24)])
def test_tty_renderer_repaints_in_place(tok: Tokenizer, cols: int, rows: int) -> None:
    out = io.StringIO()
    screen = Screen(cols, rows)
    fed = 0
    committed: list[str] = []
    r = CanvasRenderer(tok, out, is_tty=True, width=cols, height=rows)

    def snap(kind: str) -> None:
        nonlocal fed
        screen.feed(out.getvalue()[fed:])
        fed = len(out.getvalue())
        if kind == "commit":
            committed.append(screen.text())
        else:
            assert screen.text(dim=True).strip(), "a draft should be visible (dimmed)"

    drive(r, tok, ANSWER, drafts=4, seed=cols, snap=snap)
    screen.feed(out.getvalue()[fed:])
    assert r.drafts_drawn > 0
    # No draft left behind: the final screen is exactly the answer laid out on a clean terminal.
    assert screen.text() == layout(ANSWER, cols)
    assert screen.text(dim=True).strip() == ""
    # After every commit the non-dimmed text is a prefix layout of the answer.
    for shown in committed:
        assert layout(ANSWER, cols).startswith(shown.rstrip())


def test_tty_renderer_tall_and_wide_drafts(tok: Tokenizer) -> None:
    """Drafts that wrap, hold wide characters and tabs, or are taller than the screen are cut and erased."""
    cols, rows = 12, 5
    out = io.StringIO()
    screen = Screen(cols, rows)
    r = CanvasRenderer(tok, out, is_tty=True, width=cols, height=rows)
    r.put(tok.encode("<bos><|turn>model\n", add_bos=False))
    r.put(tok.encode("Committed ", add_bos=False))
    for draft in ("\n".join(["line"] * 40), "日本語" * 20, "\tx\t" * 30, "a" * cols * 3, "ok"):
        r.put_draft(tok.encode(draft, add_bos=False))
        screen.feed(out.getvalue())
        out.seek(0)
        out.truncate()
        assert screen.text(dim=False).startswith("Committed")
        assert len(screen.lines) - screen._top() <= rows
    r.put(tok.encode("text.<turn|>", add_bos=False))
    r.end()
    screen.feed(out.getvalue())
    assert screen.text() == layout("Committed text.", cols)


def test_thoughts_hidden_or_shown(tok: Tokenizer) -> None:
    model_out = "<|channel>thought\nIt is scattering.<channel|>Blue light scatters."
    for show, expected in ((False, "Blue light scatters.\n"), (True, "It is scattering.\n\nBlue light scatters.\n")):
        out = io.StringIO()
        drive(TextStreamer(tok, out, show_thoughts=show), tok, model_out, size=4)
        assert out.getvalue() == expected
        out = io.StringIO()
        drive(CanvasRenderer(tok, out, is_tty=False, show_thoughts=show), tok, model_out, size=5)
        assert out.getvalue() == expected
    # The prompt opened the thought channel (a thinking-on template that primes it): text before <channel|>
    # is thought.
    out = io.StringIO()
    prompt = "<bos><|turn>user\nQ<turn|>\n<|turn>model\n<|channel>thought\n"
    drive(TextStreamer(tok, out), tok, "hidden reasoning<channel|>Visible.", prompt=prompt)
    assert out.getvalue() == "Visible.\n"


def test_model_text_is_sanitised(tok: Tokenizer) -> None:
    evil = "red \x1b[31mALERT\x1b[0m\r\x07 done \u202e"
    clean = "red \ufffd[31mALERT\ufffd[0m\ufffd\ufffd done \ufffd"
    assert sanitize(evil) == clean and sanitize("a\tb\n") == "a\tb\n"
    out = io.StringIO()
    drive(TextStreamer(tok, out), tok, evil)
    assert out.getvalue() == clean + "\n"
    out = io.StringIO()
    drive(CanvasRenderer(tok, out, is_tty=True, width=40, height=9), tok, evil)
    screen = Screen(40, 9)
    screen.feed(out.getvalue())  # the emulator fails on any control character other than the renderer's own
    assert screen.text() == layout(clean, 40)


def test_visible_text_prefix_stable(tok: Tokenizer) -> None:
    """Token by token, the visible text only grows (what the incremental printers rely on)."""
    full = "<|channel>thought\nabc def<channel|>Answer here.<turn|><pad><pad>"
    ids = tok.encode(full, add_bos=False)
    for show in (False, True):
        prev = ""
        for k in range(len(ids) + 1):
            v = visible_text(tok.decode(ids[:k]), show, partial=True).rstrip()
            assert v.startswith(prev), (show, k, prev, v)
            prev = v
        assert prev == ("abc def\n\nAnswer here." if show else "Answer here.")
    assert visible_text(full) == "Answer here."


def test_protocol_inputs(tok: Tokenizer) -> None:
    r = TextStreamer(tok, io.StringIO(), skip_prompt=False)
    r.put([2, 105])
    with pytest.raises(GenerationError):
        r.put(torch.zeros(2, 4, dtype=torch.long))
    r.put(torch.tensor(tok.encode("Hi", add_bos=False)))  # 1-D tensor
    r.put_draft(value=torch.tensor([[5, 6]]))
    r.end()
    assert r.out.getvalue().endswith("Hi\n")


@pytest.mark.parametrize("first", ["abcdefghij", "abcdefghi", "abcdefgh日", "abcdefghi日"])
def test_tty_renderer_committed_text_at_line_end(tok: Tokenizer, first: str) -> None:
    """Committed text that ends in (or wraps at) the last column, then drafts, then more text."""
    cols = 10
    out = io.StringIO()
    r = CanvasRenderer(tok, out, is_tty=True, width=cols, height=6)
    r.put(tok.encode("<bos>", add_bos=False))
    r.put(tok.encode(first, add_bos=False))
    for draft in ("noise noise", "x", "\nnew line", "日本語日本語"):
        r.put_draft(tok.encode(draft, add_bos=False))
    r.put(tok.encode("more text", add_bos=False))
    r.put_draft(tok.encode("zzzz zzzz zzzz", add_bos=False))
    r.end()
    screen = Screen(cols, 6)
    screen.feed(out.getvalue())
    assert screen.text() == layout(first + "more text", cols)
