"""The corpus of the bundled tiny code model: the Python standard library's own `*.py` source.

Shared by `train_tiny.py` (training), `eval_denoise_loss.py` (held-out loss) and the tests, so that all three
agree on which files are held out, how text becomes token ids and how a training window is cut.

- Files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, minus test suites, installed packages,
  byte-code caches, machine-generated files (`_sysconfigdata_*`, `config-*`) and the codec tables in
  `encodings/` (long runs of escaped characters that would dominate a small model's capacity).
- Split: a file is held out when sha1(its posix path relative to the stdlib) mod 20 == 0 (about 5%), so the split
  is the same on every machine and Python version for the files they share.
- Tokenizer: a byte-fallback SentencePiece BPE trained on the training files only, with DiffusionGemma's special
  tokens at their ids (layout and file writers shared with `make_tiny_tokenizer.py`).
- Windows: `<bos>` + P-1 tokens of one file starting at a line start (the prefix, committed by the encoder), then
  the next C tokens (the canvas the decoder denoises). A window that reaches the file's end continues with
  `<eos>` and then `<pad>`, exactly what generation leaves in a finished canvas.

Legend: B batch, P prefix length (incl. <bos>), C canvas length, V vocab.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import random
import sysconfig
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger("dgemma.tiny_code_corpus")

HOLDOUT_MOD = 20  # 1 in 20 files is held out
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
                  "__phello__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel: str) -> bool:
    """Deterministic split by the file's relative posix path."""
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest(), 16) % HOLDOUT_MOD == 0


def list_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), each sorted by relative path."""
    root = root or stdlib_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune excluded trees instead of walking them (the stdlib's test suite is most of its files)
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                f = Path(dirpath) / name
                found.append((f.relative_to(root).as_posix(), f))
    train, held = [], []
    for rel, f in sorted(found, key=lambda x: x[0].split("/")):  # path order, part by part
        (held if is_heldout(rel) else train).append(f)
    if not train or not held:
        raise RuntimeError(f"{root}: found {len(train)} training and {len(held)} held-out .py files; "
                           "is this a Python standard library directory?")
    return train, held


def read_text(f: Path) -> str | None:
    """A source file as text with '\\n' line ends, or None when it is not UTF-8 (a handful of stdlib files)."""
    try:
        return f.read_text(encoding="utf-8").replace("\r\n", "\n")
    except (UnicodeDecodeError, OSError) as e:
        log.info("skipping %s: %s", f, e)
        return None


# --- tokenizer --------------------------------------------------------------------------------------------------


def _tiny_tokenizer_module():
    """scripts/make_tiny_tokenizer.py: the special-token layout and the tokenizer file writers."""
    path = Path(__file__).resolve().parent / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("_dg_make_tiny_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def train_tokenizer(out_dir: Path, files: Sequence[Path], vocab_size: int = 4096, max_lines: int = 300_000,
                    seed: int = 0) -> None:
    """Train a byte-fallback SentencePiece BPE on `files` and write the tokenizer files into `out_dir`
    (tokenizer.model with the special tokens at DiffusionGemma's ids, tokenizer_config.json,
    special_tokens_map.json, chat_template.jinja). Deterministic for the same files and arguments."""
    from dgemma.runtime.tokenizer import SPECIAL_TOKEN_IDS, TAIL_SPECIAL_TOKENS

    mt = _tiny_tokenizer_module()
    lines: list[str] = []
    for f in files:
        text = read_text(f)
        if text is not None:
            lines += [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) > max_lines:
        lines = random.Random(seed).sample(lines, max_lines)
    out_dir = Path(out_dir)
    mt.write_spm(out_dir, mt.train_spm(lines, vocab_size, seed=seed, character_coverage=0.9995), vocab_size)
    mt._write_configs(out_dir, list(SPECIAL_TOKEN_IDS) + list(TAIL_SPECIAL_TOKENS))


# --- token streams and windows --------------------------------------------------------------------------------


class TokenStream:
    """All documents of a split, concatenated, each followed by <eos>.

    ids [N] int32; starts: indices where a window may start (file starts and line starts), sorted.
    (A plain class, not a dataclass: scripts are loaded by file path, without a sys.modules entry.)"""

    def __init__(self, ids: np.ndarray, starts: np.ndarray, eos_id: int, pad_id: int, bos_id: int) -> None:
        self.ids, self.starts = ids, starts
        self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)


def encode_files(tokenizer, files: Sequence[Path]) -> list[list[int]]:
    """Token ids of each readable file (no <bos>/<eos>)."""
    out = []
    for f in files:
        text = read_text(f)
        if text:
            out.append(tokenizer.encode(text, add_bos=False, add_eos=False))
    return out


def build_stream(docs: Sequence[Sequence[int]], newline_ids: Sequence[int], eos_id: int, pad_id: int,
                 bos_id: int) -> TokenStream:
    parts, total = [], 0
    file_starts = []
    for d in docs:
        file_starts.append(total)
        parts.append(np.asarray(d, dtype=np.int32))
        parts.append(np.asarray([eos_id], dtype=np.int32))
        total += len(d) + 1
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    after_nl = np.nonzero(np.isin(ids, np.asarray(newline_ids, dtype=np.int32)))[0] + 1
    # a line start right after a file's last newline is the <eos> itself: not a useful window start
    starts = np.union1d(np.asarray(file_starts, dtype=np.int64), after_nl[after_nl < ids.size])
    starts = starts[ids[starts] != eos_id]
    return TokenStream(ids, starts.astype(np.int64), eos_id, pad_id, bos_id)


def newline_ids(tokenizer) -> list[int]:
    """Ids of the pieces that end a line ('\\n' and '\\n\\n' are whole tokens in our tokenizer)."""
    out = []
    for piece in ("\n", "\n\n"):
        i = tokenizer.token_to_id(piece)
        if i is not None:
            out.append(i)
    if not out:
        raise ValueError("tokenizer has no newline token")
    return out


def cut_windows(stream: TokenStream, starts: np.ndarray, P: int, C: int) -> torch.Tensor:
    """Windows [B, P + C]: <bos>, P-1 prefix tokens from each start, then C canvas tokens.

    The prefix never crosses a file end: a start too close to its file's <eos> moves to the next file's start.
    After the first <eos> of a window everything is <pad>."""
    n = P - 1 + C
    N = stream.ids.size
    out = np.full((len(starts), P + C), stream.pad_id, dtype=np.int64)
    out[:, 0] = stream.bos_id
    for b, s in enumerate(starts):
        s = int(s)
        if P > 1:
            pre = stream.ids[s : s + P - 1]
            hit = np.nonzero(pre == stream.eos_id)[0]
            if hit.size:  # the file ends inside the prefix: use the next file from its start instead
                s = s + int(hit[0]) + 1
                if s >= N:
                    s = 0
        seg = stream.ids[s : s + n]
        eos = np.nonzero(seg == stream.eos_id)[0]
        if eos.size:
            seg = seg[: int(eos[0]) + 1]
        out[b, 1 : 1 + seg.size] = seg
    return torch.from_numpy(out)


def corrupt(canvas: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None,
            exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction t [B] of canvas [B, C] positions by uniform random ids (the block-diffusion forward
    process; generation starts from an all-random canvas, t = 1). exact=False: each position independently
    with probability t; exact=True: exactly round(t * C) positions per row (lower-variance evaluation).
    Returns (noisy canvas, replaced-position mask)."""
    B, C = canvas.shape
    u = torch.rand(B, C, generator=generator)
    if exact:
        k = torch.round(t * C).long().clamp(0, C)  # [B]
        rank = u.argsort(dim=-1).argsort(dim=-1)
        mask = rank < k[:, None]
    else:
        mask = u < t[:, None]
    noise = torch.randint(0, vocab_size, (B, C), generator=generator)
    return torch.where(mask, noise, canvas), mask


__all__ = ["list_files", "train_tokenizer", "encode_files", "build_stream", "newline_ids", "cut_windows",
           "corrupt", "TokenStream", "stdlib_dir", "is_heldout", "read_text"]
