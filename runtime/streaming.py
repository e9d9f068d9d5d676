"""Streaming generated text while a block-diffusion model denoises.

The protocol is HF's (`transformers.TextDiffusionStreamer`): `generate` calls `put(prompt_ids)` once, then
`put_draft(canvas_ids)` after every denoising step (the argmax canvas), `put(canvas_ids)` when a canvas is
final, and `end()` at the end. Ids may be lists, numpy arrays or tensors of shape (L,) or (1, L).

- `TextStreamer` prints the text of each finished canvas as it is committed and ignores drafts.
- `CanvasRenderer` on a terminal repaints the current draft canvas in place (dimmed, after the committed text)
  at every step, so the answer visibly resolves out of noise; when the output is not a terminal it prints only
  the final text at `end()`.

Both show the answer only (thought channels hidden, output cut at the first `<turn|>` / `<eos>`), or thoughts
then answer with `show_thoughts=True`. Model text is sanitised before it reaches a terminal (no escape codes).
"""
from __future__ import annotations

import shutil
import sys
import unicodedata
from typing import Any, Protocol, TextIO

from dgemma.runtime.chat import CHANNEL_END, CHANNEL_START, clean_output
from dgemma.runtime.errors import GenerationError

_DIM, _RESET = "\x1b[2m", "\x1b[0m"
_CLEAR_DOWN = "\x1b[J"
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
_TAB = 8


class Streamer(Protocol):
    """What `generate(..., streamer=...)` calls (HF-compatible)."""

    def put(self, value: Any) -> None: ...

    def put_draft(self, value: Any, **kwargs: Any) -> None: ...

    def end(self) -> None: ...


def _row(value: Any) -> list[int]:
    """One sequence of ids from a list / array / tensor of shape (L,) or (1, L)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int):
        return [value]
    value = list(value)
    if value and isinstance(value[0], (list, tuple)):
        if len(value) != 1:
            raise GenerationError(f"streaming supports one sequence at a time, got a batch of {len(value)}")
        value = list(value[0])
    return [int(v) for v in value]


def visible_text(text: str, show_thoughts: bool = False, partial: bool = False) -> str:
    """What a reader sees of decoded model output: cut at the first stop marker, `<pad>` removed, thought
    channels hidden (or, with `show_thoughts`, their text followed by a blank line). With `partial`, text that
    may still change (a half-written channel label) is left out, so each result is a prefix of the next."""
    text = clean_output(text)
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(CHANNEL_START, pos)
        close = text.find(CHANNEL_END, pos)
        if close != -1 and (start == -1 or close < start):  # closing marker without an opening one
            start = -1
        if start == -1 and close == -1:
            out.append(text[pos:])
            break
        if start == -1:
            out.append(text[pos:close])  # prompt-opened channel ended: treat the text so far as answer
            pos = close + len(CHANNEL_END)
            continue
        out.append(text[pos:start])
        body_start = start + len(CHANNEL_START)
        end = text.find(CHANNEL_END, body_start)
        body = text[body_start:] if end == -1 else text[body_start:end]
        if show_thoughts:
            if body.startswith("thought\n") or body == "thought":
                body = body[len("thought\n"):]
            elif partial and end == -1 and "thought\n".startswith(body):
                body = ""
            out.append(body.strip("\n") + ("\n\n" if end != -1 else ""))
        if end == -1:
            break
        pos = end + len(CHANNEL_END)
    return "".join(out).lstrip()


def sanitize(text: str) -> str:
    """Replace control characters (escape codes, carriage returns, bidi overrides) with U+FFFD; keep \\n, \\t."""
    return "".join(
        "\ufffd" if (unicodedata.category(c) == "Cc" and c not in "\n\t") or ord(c) in _BIDI else c for c in text
    )


def _char_width(c: str) -> int:
    if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


class _TermCursor:
    """Tracks where text written to a terminal leaves the cursor: (row, col), with the 'pending wrap' state a
    terminal enters after writing into the last column (the next character wraps, a newline does not add a
    row). Used to move back to the start of a draft without the terminal's save/restore cursor, which breaks
    when the draft scrolls the screen."""

    def __init__(self, cols: int, col: int = 0) -> None:
        self.cols = max(2, cols)
        self.row = 0
        self.col = col
        self.pending = False

    def write(self, text: str, max_rows: int | None = None) -> tuple[str, bool]:
        """Advance over `text` and return (the text as the terminal should receive it, with tabs expanded,
        truncated before it would take more than `max_rows` rows; whether it was truncated)."""
        out: list[str] = []
        for c in text:
            if c == "\n":
                if max_rows is not None and self.row + 1 >= max_rows:
                    return "".join(out), True
                self.row += 1
                self.col = 0
                self.pending = False
                out.append("\n")
                continue
            if c == "\t":  # sent as spaces up to the next tab stop, so wrapping is predictable
                chars, w = " " * (_TAB - self.column % _TAB), 1
            else:
                chars, w = c, _char_width(c)
            for ch in chars:
                if w == 0:
                    out.append(ch)
                    continue
                if self.pending or self.col + w > self.cols:
                    if max_rows is not None and self.row + 1 >= max_rows:
                        return "".join(out), True
                    self.row += 1
                    self.col = 0
                    self.pending = False
                out.append(ch)
                self.col += w
                if self.col >= self.cols:
                    self.col = self.cols
                    self.pending = True
        return "".join(out), False

    @property
    def column(self) -> int:
        """Column where the next character goes (0 after a pending wrap)."""
        return 0 if self.pending else self.col


class _Base:
    def __init__(self, tokenizer: Any, out: TextIO | None = None, *, skip_prompt: bool = True,
                 show_thoughts: bool = False) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.skip_prompt = skip_prompt
        self.show_thoughts = show_thoughts
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._printed = ""
        self._prefix = ""  # CHANNEL_START when the prompt left a thought channel open
        self._expect_prompt = True

    def _take_prompt(self, ids: list[int]) -> bool:
        """Handle the first `put` (the prompt, as HF sends it). True when it was consumed."""
        if not self._expect_prompt:
            return False
        self._expect_prompt = False
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if text.rfind(CHANNEL_START) > text.rfind(CHANNEL_END):
            self._prefix = CHANNEL_START
        if self.skip_prompt:
            return True
        self._write_raw(sanitize(self.tokenizer.decode(ids, skip_special_tokens=True)))
        return True

    def _visible(self, partial: bool) -> str:
        text = self._prefix + self.tokenizer.decode(self._ids, skip_special_tokens=False)
        return sanitize(visible_text(text, self.show_thoughts, partial))

    def _new_text(self, final: bool) -> str:
        """The part of the visible text not printed yet. Mid-stream, trailing whitespace and U+FFFD (a
        character whose bytes continue in the next canvas) are held back."""
        vis = self._visible(partial=not final)
        if final:
            vis = vis.rstrip()
        else:
            vis = vis.rstrip(" \t\n\ufffd")
        k = len(self._printed)
        if not vis.startswith(self._printed):
            # Rare (the text changed behind what was printed): a plain stream cannot un-print, so continue
            # after the common prefix.
            k = 0
            while k < min(len(vis), len(self._printed)) and vis[k] == self._printed[k]:
                k += 1
        self._printed = vis
        return vis[k:]

    def _write_raw(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.out.flush()


class TextStreamer(_Base):
    """Prints the text of every committed canvas as soon as it is final; drafts are ignored.

    tokenizer: anything with `decode(ids, skip_special_tokens=...)` (dgemma's `Tokenizer`).
    skip_prompt: the first `put` is the prompt (HF's protocol) and is not printed.
    """

    def put(self, value: Any) -> None:
        ids = _row(value)
        if self._take_prompt(ids):
            return
        self._ids += ids
        self._write_raw(self._new_text(final=False))

    def put_draft(self, value: Any = None, **kwargs: Any) -> None:
        """Drafts are not printed by this streamer."""

    def end(self) -> None:
        self._write_raw(self._new_text(final=True) + "\n")
        self._reset()


class CanvasRenderer(_Base):
    """Live view of diffusion decoding on a terminal; final text only elsewhere.

    is_tty: force terminal (True) or plain (False) mode; None asks `out.isatty()`.
    width / height: terminal size in cells (None: `shutil.get_terminal_size`). A draft is cut to fit the
    screen, since a cursor cannot move back above the top row.
    """

    def __init__(self, tokenizer: Any, out: TextIO | None = None, *, is_tty: bool | None = None,
                 skip_prompt: bool = True, show_thoughts: bool = False, width: int | None = None,
                 height: int | None = None) -> None:
        super().__init__(tokenizer, out, skip_prompt=skip_prompt, show_thoughts=show_thoughts)
        if is_tty is None:
            isatty = getattr(self.out, "isatty", None)
            is_tty = bool(isatty()) if callable(isatty) else False
        self.is_tty = is_tty
        self._width, self._height = width, height
        self._col = 0  # column after the committed text
        self._draft_rows: int | None = None  # rows the draft advanced; None = no draft on screen
        self.drafts_drawn = 0

    def _size(self) -> tuple[int, int]:
        if self._width is not None and self._height is not None:
            return self._width, self._height
        size = shutil.get_terminal_size((80, 24))
        return self._width or size.columns, self._height or size.lines

    def _clear_draft(self) -> None:
        if self._draft_rows is None:
            return
        seq = "\r" + (f"\x1b[{self._draft_rows}A" if self._draft_rows else "")
        seq += (f"\x1b[{self._col}C" if self._col else "") + _CLEAR_DOWN
        self.out.write(seq)
        self._draft_rows = None

    def _commit_text(self, text: str) -> None:
        if not text:
            return
        cols, _ = self._size()
        cur = _TermCursor(cols, self._col)
        shown, _ = cur.write(text)
        self.out.write(shown)
        self._col = cur.column

    def put(self, value: Any) -> None:
        ids = _row(value)
        if self._take_prompt(ids):
            if not self.skip_prompt and self.is_tty:
                self._col = 0  # the prompt echo is not tracked; start the answer on a new line
                self._write_raw("\n")
            return
        self._ids += ids
        if not self.is_tty:
            return
        self._clear_draft()
        self._commit_text(self._new_text(final=False))
        self.out.flush()

    def put_draft(self, value: Any = None, **kwargs: Any) -> None:
        """Repaint the draft canvas (the argmax canvas of the latest denoising step) after the committed text."""
        if not self.is_tty or value is None:
            return
        ids = _row(value)
        text = sanitize(self.tokenizer.decode(ids, skip_special_tokens=True))
        cols, rows = self._size()
        self._clear_draft()
        cur = _TermCursor(cols, self._col)
        shown, _ = cur.write(text, max_rows=max(1, rows - 1))
        self.out.write(_DIM + shown + _RESET)
        self._draft_rows = cur.row
        self.drafts_drawn += 1
        self.out.flush()

    def end(self) -> None:
        if self.is_tty:
            self._clear_draft()
            self._commit_text(self._new_text(final=True))
            self.out.write("\n")
            self.out.flush()
        else:
            self._write_raw(self._new_text(final=True) + "\n")
        self._reset()
        self._col = 0
        self._draft_rows = None
