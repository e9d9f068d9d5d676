#!/usr/bin/env python
"""Write a small Gemma-4-shaped tokenizer for tiny DiffusionGemma test checkpoints.

kind "bpe" (default) trains a byte-fallback BPE with the `tokenizers` library and writes `tokenizer.json` in
the layout of Gemma 4's (HF GemmaTokenizer pipeline: ' ' -> '▁' normalizer, no word pre-splitting, byte
fallback to `<0xNN>` tokens, decoder '▁' -> ' ' + ByteFallback + Fuse, `<bos>` template). kind "sentencepiece"
trains a byte-fallback SentencePiece BPE and writes `tokenizer.model`. Both also write `tokenizer_config.json`,
`special_tokens_map.json` and `chat_template.jinja` (dgemma's built-in Gemma 4 template), and both place
DiffusionGemma's special tokens at the ids of `dgemma.runtime.tokenizer.SPECIAL_TOKEN_IDS` (pad 0, eos 1,
bos 2, unk 3, mask 4, <|tool_response> 50, <|turn> 105, <turn|> 106, ...) with the three vision markers at the
last three ids. The vocabulary has exactly `vocab_size` ids. The SentencePiece output is byte-identical for the
same arguments; the BPE output is not always: the `tokenizers` trainer may order tokens with equal counts
differently from one process to the next (measured: two runs gave different alphabet ids). Tests therefore
compare against HF on the files they write, never against stored ids.

Training never merges newlines with other characters nor a non-space character with a following '▁', so the
BPE gives the same ids with or without llama.cpp's `gemma4` newline pre-split.

    python scripts/make_tiny_tokenizer.py OUT_DIR --vocab-size 512 [--kind bpe|sentencepiece]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import struct
import sys
from pathlib import Path

from dgemma.runtime.chat import GEMMA4_CHAT_TEMPLATE
from dgemma.runtime.tokenizer import (
    BOS, EOS, MASK, PAD, SPECIAL_TOKEN_IDS, TAIL_SPECIAL_TOKENS, UNK, TokenType, iter_proto_fields,
    read_spm_pieces,
)

SPACE = "\u2581"
MIN_VOCAB = len(SPECIAL_TOKEN_IDS) + len(TAIL_SPECIAL_TOKENS) + 256 + 12
# SentencePiece pieces that are always whole tokens (as in Gemma's SentencePiece models).
SPM_USER_DEFINED = ["\n", "\n\n", "\t"]

# --- training corpus ------------------------------------------------------------------------------------------

_WORDS = """the of and to in is was for on that with as by at from it an be this are or which have not has
had but were their one all can more also there been other when new time into only first two after most
some would over such what about than like where between during about these many through before each
light sky blue red green water air sun model token text language word answer question reason because
small large fast slow simple every people world system number value result example method test data
think know make find give take use work call read write run open close start stop build keep show
diffusion canvas block noise step sample entropy decode encode cache layer expert router weight matrix
""".split()
_NAMES = "alpha beta gamma delta count total index value items result buffer config tokens logits".split()
_UNICODE = [
    "café naïve résumé façade coöperate déjà vu über straße Ærøskøbing",
    "Ελληνικά: γειά σου κόσμε. Русский: привет, мир! Українська мова.",
    "日本語のテキストです。中文文本：天空为什么是蓝色的？한국어 문장입니다.",
    "emoji 😀 🚀 🌍 ✨ 👍🏽 👨‍👩‍👧 ❤️ — “quotes” and ‘single’ … ½ ∑ ∞ ≠ ≤ → ←",
    "العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया।",
    "math: α + β = γ, ∀x ∈ ℝ, ∫ f(x) dx ≈ 3.14159; 10⁻⁶ µs; 25 °C; €5 £3 ¥100",
]


def build_corpus(seed: int = 0) -> list[str]:
    """Deterministic training documents: English prose, Python code, unicode samples, whitespace runs."""
    rng = random.Random(seed)
    # Pseudo-words from syllables widen the vocabulary so that large vocab sizes fill up with real merges.
    onsets = "b c d f g h k l m n p r s t v w br cr dr st tr pl gr ch sh th".split()
    vowels = "a e i o u ea ou ai".split()
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
    pseudo = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                             for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    lexicon = _WORDS * 8 + pseudo
    docs: list[str] = []
    for _ in range(900):
        sents = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(lexicon) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 2048)))
            s = " ".join(words)
            sents.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", ",", ":"]))
        docs.append(" ".join(sents))
    for k in range(120):
        a, b, c = rng.sample(_NAMES, 3)
        indent = "\t" if k % 7 == 0 else "    "
        docs.append(
            f"def {a}_{b}({a}, {b}={k}):\n{indent}\"\"\"Return the {c} of {a}.\"\"\"\n"
            f"{indent}{c} = []\n{indent}for i in range(len({a})):\n{indent}{indent}if {a}[i] > {b}:\n"
            f"{indent}{indent}{indent}{c}.append({a}[i] * {k % 9 + 1})\n{indent}return {c}\n\n"
        )
        docs.append(f"class {a.title()}{b.title()}:\n    {c}: int = {k}\n\n    def __init__(self):\n"
                    f"        self.{c} = {{'{a}': {k}, '{b}': [1, 2, 3]}}\n")
    for k, u in enumerate(_UNICODE * 6):
        docs.append(u if k % 2 else u + "\n")
    docs += ["a  b   c    d", "x\t\ty", "line one\nline two\n\n\nline five", "    indented\n        twice"] * 10
    return docs


# --- vocabulary layout ----------------------------------------------------------------------------------------


def _layout(vocab_size: int, others: list[str]) -> list[str]:
    """Id -> token: the fixed special ids first, then `others` in order in the free ids, then `<unusedN>`."""
    slots: list[str | None] = [None] * vocab_size
    for tok, i in SPECIAL_TOKEN_IDS.items():
        slots[i] = tok
    for k, tok in enumerate(TAIL_SPECIAL_TOKENS):
        slots[vocab_size - len(TAIL_SPECIAL_TOKENS) + k] = tok
    fixed = {t for t in slots if t is not None}
    rest = iter(t for t in others if t not in fixed)
    unused = 0
    for i in range(vocab_size):
        if slots[i] is None:
            tok = next(rest, None)
            if tok is None:
                tok = f"<unused{unused}>"
                unused += 1
            slots[i] = tok
    left = list(rest)
    assert not left, f"{len(left)} tokens did not fit"
    out = [t for t in slots if t is not None]
    assert len(set(out)) == vocab_size, "duplicate tokens in the layout"
    return out


def _special_set(tokens: list[str]) -> list[str]:
    fixed = set(SPECIAL_TOKEN_IDS) | set(TAIL_SPECIAL_TOKENS)
    return [t for t in tokens if t in fixed or (t.startswith("<unused") and t.endswith(">"))]


# --- BPE (tokenizer.json) -------------------------------------------------------------------------------------


def _train_bpe(vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    n_free = vocab_size - len(SPECIAL_TOKEN_IDS) - len(TAIL_SPECIAL_TOKENS) - 256
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # Training-only split: newline runs, then '▁*' + a run without '▁'/newline, then bare '▁' runs. Merges thus
    # never cross a newline boundary or a "x▁" boundary (see the module docstring).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"\n+|{SPACE}*[^{SPACE}\n]+|{SPACE}+"), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=n_free, min_frequency=2, show_progress=False, special_tokens=[],
        limit_alphabet=max(3, min(n_free // 2, 300)), initial_alphabet=[SPACE, "\n", "\t"][: max(1, n_free // 4)],
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return learned, merges  # type: ignore[return-value]


def _write_bpe(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    learned, merges = _train_bpe(vocab_size)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    clash = set(learned) & (set(byte_tokens) | set(SPECIAL_TOKEN_IDS))
    assert not clash, f"learned tokens clash with reserved ones: {clash}"
    tokens = _layout(vocab_size, byte_tokens + learned)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True,
                        dropout=None))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = SPECIAL_TOKEN_IDS[BOS]
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                                       special_tokens=[(BOS, bos)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _special_set(tokens)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)


# --- SentencePiece (tokenizer.model) --------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _piece_bytes(piece: str, score: float, ptype: int) -> bytes:
    raw = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
    if ptype != TokenType.NORMAL:
        body += b"\x18" + _varint(ptype)
    return b"\x0a" + _varint(len(body)) + body


def train_spm(lines: list[str], vocab_size: int, *, seed: int = 0, character_coverage: float = 1.0) -> bytes:
    """Train a byte-fallback SentencePiece BPE on `lines` (one sentence each) with DiffusionGemma's special
    tokens; returns the serialized model (specials not yet at their ids: see `write_spm`)."""
    import sentencepiece as spm

    n_fixed = len(SPECIAL_TOKEN_IDS) + len(TAIL_SPECIAL_TOKENS) + len(SPM_USER_DEFINED) + 256
    n_free = vocab_size - n_fixed
    # Keep the required characters to ~1/2 of the free ids (the rest become merges): the trainer sees only the
    # most frequent characters (text is cut at the others, which fall back to bytes when encoding).
    counts: dict[str, int] = {}
    for line in lines:
        for ch in line:
            counts[ch] = counts.get(ch, 0) + 1
    keep = sorted(counts, key=lambda ch: (-counts[ch], ch))[: max(2, min(n_free // 2, 300))]
    cut = re.compile("[^" + "".join(re.escape(ch) for ch in keep) + "]+")
    corpus = [frag for line in lines for frag in cut.split(line) if frag.strip(" ")]
    controls = [MASK] + [t for t in sorted(SPECIAL_TOKEN_IDS, key=SPECIAL_TOKEN_IDS.get)
                         if SPECIAL_TOKEN_IDS[t] > 4] + list(TAIL_SPECIAL_TOKENS)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    # Lines are sentences (newline is a user-defined piece, never merged); whitespace-only pieces let indentation
    # runs become single tokens; digits are split as in Gemma.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=character_coverage, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 14,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
        control_symbols=controls, user_defined_symbols=SPM_USER_DEFINED, num_threads=1, minloglevel=2,
    )
    return buf.getvalue()


def write_spm(out_dir: Path, data: bytes, vocab_size: int) -> None:
    """Write `tokenizer.model` from a trained model (`train_spm`) with the specials moved to their ids."""
    pieces = read_spm_pieces(data)
    by_name = {p: (p, s, t) for p, s, t in pieces}
    assert len(by_name) == len(pieces) <= vocab_size, "unexpected SentencePiece vocabulary"
    # Re-order the pieces so the specials sit at their ids (SentencePiece scores, not ids, drive its BPE, and
    # the learned pieces keep their relative order so HF's id-ordered merges stay the same).
    tokens = _layout(vocab_size, [p for p, _, _ in pieces])
    body = b"".join(_piece_bytes(*by_name.get(t, (t, 0.0, TokenType.CONTROL))) for t in tokens)
    rest = b"".join(raw for fnum, _, _, raw in iter_proto_fields(data) if fnum != 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(body + rest)


# --- config files ---------------------------------------------------------------------------------------------


def _write_configs(out_dir: Path, tokens_special: list[str]) -> None:
    markers = [t for t in tokens_special if t not in (PAD, EOS, BOS, UNK, MASK)]
    cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": MASK,
        "extra_special_tokens": markers,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": 1_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    smap = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "mask_token": MASK,
            "extra_special_tokens": markers}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(GEMMA4_CHAT_TEMPLATE, encoding="utf-8")


def write_tiny_tokenizer(out_dir: Path, vocab_size: int, kind: str = "bpe") -> None:
    """Write the tokenizer files of a tiny checkpoint into `out_dir` (created if needed)."""
    if kind not in ("bpe", "sentencepiece"):
        raise ValueError(f"kind must be 'bpe' or 'sentencepiece', not {kind!r}")
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (specials + 256 byte tokens), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A directory holds one kind: remove the other kind's file so loaders cannot pick a stale one.
    stale = out_dir / ("tokenizer.model" if kind == "bpe" else "tokenizer.json")
    if stale.exists():
        stale.unlink()
    if kind == "bpe":
        _write_bpe(out_dir, vocab_size)
    else:
        lines = [line for doc in build_corpus() for line in doc.split("\n") if line]
        write_spm(out_dir, train_spm(lines, vocab_size), vocab_size)
    specials = list(SPECIAL_TOKEN_IDS) + list(TAIL_SPECIAL_TOKENS)
    _write_configs(out_dir, specials)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--kind", default="bpe", choices=["bpe", "sentencepiece"])
    a = ap.parse_args(argv)
    try:
        write_tiny_tokenizer(a.out, a.vocab_size, a.kind)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a {a.kind} tokenizer with {a.vocab_size} tokens to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
