"""Text <-> token ids for DiffusionGemma checkpoints.

Gemma 4 checkpoints ship `tokenizer.json`: a BPE over raw UTF-8 characters with merges and byte fallback
(`<0xNN>` tokens), spaces normalised to U+2581 '▁', no prefix space, and no word pre-splitting (the same
vocabulary llama.cpp calls `gemma4`). It is loaded with the `tokenizers` library. Checkpoints that ship a
SentencePiece `tokenizer.model` instead are loaded with `sentencepiece`; special tokens are split out of the
text first (as HF does), so both back ends give HF's ids.

The same vocabulary can be rebuilt from GGUF `tokenizer.ggml.*` arrays (`Tokenizer.from_gguf_metadata`) and
exported to them (`Tokenizer.to_gguf_metadata`) for the GGUF converter.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dgemma.runtime.errors import DGemmaError, FormatError

logger = logging.getLogger(__name__)

# --- token names --------------------------------------------------------------------------------------------
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
TURN_START, TURN_END = "<|turn>", "<turn|>"
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
THINK = "<|think|>"
TOOL_START, TOOL_END = "<|tool>", "<tool|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call>", "<tool_call|>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<|tool_response>", "<tool_response|>"
STRING_DELIM = '<|"|>'
IMAGE_START, IMAGE_END, IMAGE_SOFT = "<|image>", "<image|>", "<|image|>"

# The special-token layout of the tiny tokenizers (scripts/make_tiny_tokenizer.py). Ids 0-4, 50, 105, 106 are
# the released checkpoint's (config.json / generation_config.json: pad 0, bos 2, eos [1, 106, 50]); the other
# marker ids are our choice. Runtime code must look markers up by name (`Tokenizer.token_to_id`), never here.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    PAD: 0,
    EOS: 1,
    BOS: 2,
    UNK: 3,
    MASK: 4,
    TOOL_START: 46,
    TOOL_END: 47,
    TOOL_CALL_START: 48,
    TOOL_CALL_END: 49,
    TOOL_RESPONSE_START: 50,
    TOOL_RESPONSE_END: 51,
    STRING_DELIM: 52,
    THINK: 98,
    CHANNEL_START: 100,
    CHANNEL_END: 101,
    TURN_START: 105,
    TURN_END: 106,
}
# Vision markers sit at the last three ids of a tiny vocabulary (vocab_size-3 .. vocab_size-1), matching the
# boi / eoi / image token ids that scripts/make_tiny_checkpoint.py writes into config.json.
TAIL_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_START, IMAGE_END, IMAGE_SOFT)

# End-of-generation tokens in generation_config order ([1, 106, 50] on the released checkpoint).
EOS_TOKENS: tuple[str, ...] = (EOS, TURN_END, TOOL_RESPONSE_START)

# llama.cpp's Gemma 4 converter forces these to USER_DEFINED so that they are rendered as text (gguf.md, key 32).
GGUF_USER_DEFINED_TOKENS: frozenset[str] = frozenset(
    {CHANNEL_START, CHANNEL_END, TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END, STRING_DELIM}
)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"  # '▁'


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp / gguf-py), also SentencePiece's piece types."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFTokenizerMetadata:
    """The `tokenizer.*` GGUF keys for a `gemma4` BPE vocabulary (gguf.md section 2, keys 29-41)."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: list[str]  # "left right", as gguf.SpecialVocab writes them
    bos_id: int
    eos_id: int
    unk_id: int | None
    pad_id: int | None
    mask_id: int | None
    add_bos: bool = True
    add_space_prefix: bool = False
    chat_template: str | None = None
    model: str = "gemma4"

    def as_kv(self) -> dict[str, Any]:
        """Key -> value, with the GGUF key names (optional ids that are None are left out)."""
        kv: dict[str, Any] = {
            "tokenizer.ggml.model": self.model,
            "tokenizer.ggml.tokens": self.tokens,
            "tokenizer.ggml.scores": self.scores,
            "tokenizer.ggml.token_type": self.token_types,
            "tokenizer.ggml.merges": self.merges,
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
            "tokenizer.ggml.add_bos_token": self.add_bos,
            "tokenizer.ggml.add_space_prefix": self.add_space_prefix,
        }
        for key, value in (("unknown", self.unk_id), ("padding", self.pad_id), ("mask", self.mask_id)):
            if value is not None:
                kv[f"tokenizer.ggml.{key}_token_id"] = value
        if self.chat_template is not None:
            kv["tokenizer.chat_template"] = self.chat_template
        return kv


# --- minimal protobuf reader for SentencePiece ModelProto ------------------------------------------------------
# The sentencepiece Python API does not expose piece types (USER_DEFINED in particular) and the protobuf package
# is not a dependency, so the few fields we need are read straight from the wire format.


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def iter_proto_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes, bytes]]:
    """Yield (field number, wire type, value, raw bytes incl. tag) for each top-level field of a message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        fnum, wtype = key >> 3, key & 7
        value: int | bytes
        if wtype == 0:
            value, pos = _varint(data, pos)
        elif wtype == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos : pos + n], pos + n
        elif wtype in (1, 5):
            n = 8 if wtype == 1 else 4
            if pos + n > len(data):
                raise ValueError("truncated fixed-width field")
            value, pos = data[pos : pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wtype}")
        if fnum == 0:
            raise ValueError("protobuf field number 0")
        yield fnum, wtype, value, data[start:pos]


def read_spm_pieces(data: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every piece of a serialized SentencePiece ModelProto (field 1)."""
    pieces = []
    for fnum, wtype, value, _ in iter_proto_fields(data):
        if fnum != 1 or wtype != 2:
            continue
        piece, score, ptype = "", 0.0, int(TokenType.NORMAL)
        assert isinstance(value, bytes)
        for pf, pw, pv, _ in iter_proto_fields(value):
            if pf == 1 and pw == 2:
                piece = bytes(pv).decode("utf-8")  # type: ignore[arg-type]
            elif pf == 2 and pw == 5:
                (score,) = struct.unpack("<f", pv)
            elif pf == 3 and pw == 0:
                ptype = int(pv)  # type: ignore[arg-type]
        pieces.append((piece, float(score), ptype))
    return pieces


# --- back ends ------------------------------------------------------------------------------------------------


class _HFBackend:
    """`tokenizers.Tokenizer` (tokenizer.json, or built from GGUF arrays)."""

    def __init__(self, tok: Any, alias: dict[int, int] | None = None) -> None:
        self.tok = tok
        self.alias = alias or {}  # duplicate-string ids -> the id that owns the string in the model vocab
        self.size = max([tok.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in self.alias])
        self.added = {int(i): t for i, t in tok.get_added_tokens_decoder().items()}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        if self.alias:
            ids = [self.alias.get(i, i) for i in ids]
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(self.alias.get(i, i))

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        return {i for i, t in self.added.items() if t.special}

    def atomic_ids(self) -> set[int]:
        return set(self.added)


class _SPMBackend:
    """SentencePiece `tokenizer.model`; special and user-defined pieces are split out of the text first."""

    def __init__(self, sp: Any, pieces: list[tuple[str, float, int]], extra_atomic: Mapping[str, bool]) -> None:
        self.sp = sp
        self.pieces = pieces
        self.size = len(pieces)
        self.piece_to_id = {p: i for i, (p, _, _) in enumerate(pieces)}
        special_types = (TokenType.CONTROL, TokenType.UNKNOWN)
        # HF's SentencePiece import makes control pieces special added tokens, user-defined ones plain added tokens.
        self._special = {i for i, (_, _, t) in enumerate(pieces) if t in special_types}
        self._atomic = self._special | {i for i, (_, _, t) in enumerate(pieces) if t == TokenType.USER_DEFINED}
        for text, special in extra_atomic.items():
            if text in self.piece_to_id:
                self._atomic.add(self.piece_to_id[text])
                if special:
                    self._special.add(self.piece_to_id[text])
        self._byte = {i: int(m.group(1), 16) for i, (p, _, t) in enumerate(pieces)
                      if t == TokenType.BYTE and (m := _BYTE_TOKEN.fullmatch(p))}
        atoms = sorted((pieces[i][0] for i in self._atomic if pieces[i][0]), key=len, reverse=True)
        # Leftmost-longest match, as the `tokenizers` added-vocabulary splitter does.
        self._split = re.compile("|".join(re.escape(a) for a in atoms)) if atoms else None

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self._split is None:
            return list(self.sp.encode(text, out_type=int))
        ids: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                ids.extend(self.sp.encode(text[pos : m.start()], out_type=int))
            ids.append(self.piece_to_id[m.group(0)])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:], out_type=int))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Same rules as HF's Gemma decoder: '▁' -> ' ', runs of byte tokens joined and UTF-8 decoded, a run that
        # is not valid UTF-8 gives one U+FFFD per byte token, unknown ids are dropped.
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                try:
                    out.append(bytes(run).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(run))
                run.clear()

        for i in ids:
            i = int(i)
            if not 0 <= i < self.size:
                continue
            if skip_special_tokens and i in self._special:
                continue  # removed before byte runs are joined, as in `tokenizers`
            if i in self._byte:
                run.append(self._byte[i])
                continue
            flush()
            out.append(self.pieces[i][0].replace(_SPACE, " "))
        flush()
        return "".join(out)

    def id_to_token(self, i: int) -> str | None:
        return self.pieces[i][0] if 0 <= i < self.size else None

    def token_to_id(self, token: str) -> int | None:
        return self.piece_to_id.get(token)

    def special_ids(self) -> set[int]:
        return set(self._special)

    def atomic_ids(self) -> set[int]:
        return set(self._atomic)


# --- helpers --------------------------------------------------------------------------------------------------


def _token_str(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read JSON ({e})") from e


def _gemma_pipeline(tok: Any, add_space_prefix: bool = False) -> None:
    """Gemma's normalizer / pre-tokenizer / decoder (HF GemmaTokenizer, llama.cpp `gemma4`)."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    norm = normalizers.Replace(" ", _SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), norm]) if add_space_prefix else norm
    # A no-op after the normalizer (no ' ' is left); kept because HF's GemmaTokenizer has it.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])


# --- the tokenizer --------------------------------------------------------------------------------------------


@dataclass
class _Specials:
    bos: str = BOS
    eos: str = EOS
    pad: str = PAD
    unk: str = UNK
    mask: str = MASK
    extra: list[str] = field(default_factory=list)  # extra/additional special tokens named in the config


class Tokenizer:
    """Encode/decode text for one checkpoint. Build with `from_pretrained` or `from_gguf_metadata`."""

    def __init__(self, backend: _HFBackend | _SPMBackend, *, specials: _Specials, add_bos: bool = True,
                 add_eos: bool = False, add_space_prefix: bool = False, chat_template: str | None = None,
                 source: str = "") -> None:
        self._b = backend
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.source = source
        self.vocab_size: int = backend.size
        self.bos_token, self.eos_token, self.pad_token = specials.bos, specials.eos, specials.pad
        self.unk_token, self.mask_token = specials.unk, specials.mask
        self.bos_id = self.token_to_id(specials.bos)
        self.eos_id = self.token_to_id(specials.eos)
        self.pad_id = self.token_to_id(specials.pad)
        self.unk_id = self.token_to_id(specials.unk)
        self.mask_id = self.token_to_id(specials.mask)
        where = source or "tokenizer"
        if self.bos_id is None and add_bos:
            raise FormatError(f"{where}: BOS token {specials.bos!r} is not in the vocabulary")
        if self.eos_id is None:
            raise FormatError(f"{where}: EOS token {specials.eos!r} is not in the vocabulary")
        self.special_ids: frozenset[int] = frozenset(
            backend.special_ids() | {i for t in specials.extra if (i := self.token_to_id(t)) is not None}
            | {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.mask_id) if i is not None}
        )
        # End-of-generation ids present in this vocabulary, generation_config order first.
        self.eos_ids: list[int] = [self.eos_id]
        for name in EOS_TOKENS[1:]:
            i = self.token_to_id(name)
            if i is not None and i not in self.eos_ids:
                self.eos_ids.append(i)

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (preferred) or `tokenizer.model` from a checkpoint directory.

        `tokenizer_config.json` (optional) gives the special-token names, `add_bos_token` (default True),
        `add_eos_token` and extra added tokens; the chat template is found as `dgemma.runtime.chat` does.
        """
        d = Path(path)
        if not d.is_dir():
            raise FormatError(f"{d}: tokenizer directory does not exist")
        cfg: dict[str, Any] = {}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = _read_json(cfg_path)
            if not isinstance(cfg, dict):
                raise FormatError(f"{cfg_path}: expected a JSON object")
        specials = _Specials()
        for key in ("bos", "eos", "pad", "unk", "mask"):
            value = _token_str(cfg.get(f"{key}_token"))
            if value is not None:
                setattr(specials, key, value)
        for key in ("extra_special_tokens", "additional_special_tokens"):
            extra = cfg.get(key) or []
            items = extra.values() if isinstance(extra, dict) else extra
            specials.extra += [s for s in (_token_str(x) for x in items) if s is not None]
        # Config-level added tokens: HF splits these out of the text as well (content -> special flag).
        cfg_added: dict[str, bool] = {}
        for entry in (cfg.get("added_tokens_decoder") or {}).values():
            content = _token_str(entry)
            if content is not None:
                cfg_added[content] = bool(entry.get("special", True)) if isinstance(entry, dict) else True

        json_path, spm_path = d / "tokenizer.json", d / "tokenizer.model"
        backend: _HFBackend | _SPMBackend
        if json_path.is_file():
            gemma_class = str(cfg.get("tokenizer_class", "GemmaTokenizer")).removesuffix("Fast") == "GemmaTokenizer"
            backend = cls._load_tokenizer_json(json_path, cfg_added, gemma_class)
            source = str(json_path)
        elif spm_path.is_file():
            backend = cls._load_sentencepiece(spm_path, cfg_added)
            source = str(spm_path)
        else:
            raise FormatError(f"{d}: no tokenizer.json or tokenizer.model")

        from dgemma.runtime.chat import find_chat_template  # local import: chat does not need the tokenizer

        return cls(backend, specials=specials, add_bos=bool(cfg.get("add_bos_token", True)),
                   add_eos=bool(cfg.get("add_eos_token", False)), chat_template=find_chat_template(d),
                   source=source)

    @staticmethod
    def _load_tokenizer_json(path: Path, cfg_added: Mapping[str, bool], gemma_class: bool) -> _HFBackend:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises plain Exception
            _read_json(path)  # a clearer message for truncated / non-JSON files
            raise FormatError(f"{path}: not a valid tokenizer.json ({e})") from e
        if gemma_class:
            # HF's GemmaTokenizer keeps only the vocabulary, merges, added tokens and post-processor of the file
            # and rebuilds the rest; do the same so that the ids match HF for any file.
            if type(tok.model).__name__ != "BPE":
                raise FormatError(f"{path}: GemmaTokenizer needs a BPE model, found {type(tok.model).__name__}")
            m = tok.model
            m.byte_fallback, m.fuse_unk, m.dropout, m.ignore_merges = True, True, None, False
            m.continuing_subword_prefix, m.end_of_word_suffix = None, None
            _gemma_pipeline(tok)
        known = {t.content for t in tok.get_added_tokens_decoder().values()}
        for content, special in cfg_added.items():
            if content not in known and tok.token_to_id(content) is not None:
                tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        return _HFBackend(tok)

    @staticmethod
    def _load_sentencepiece(path: Path, cfg_added: Mapping[str, bool]) -> _SPMBackend:
        import sentencepiece as spm

        try:
            data = path.read_bytes()
            pieces = read_spm_pieces(data)
            if not pieces:
                raise ValueError("no pieces")
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(data)
        except (OSError, RuntimeError, ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not a valid SentencePiece model ({e})") from e
        if sp.get_piece_size() != len(pieces):
            raise FormatError(f"{path}: piece count mismatch ({sp.get_piece_size()} vs {len(pieces)})")
        return _SPMBackend(sp, pieces, cfg_added)

    @classmethod
    def from_gguf_metadata(cls, tokens: Sequence[str | bytes], scores: Sequence[float] | None,
                           token_types: Sequence[int], merges: Sequence[str], *, bos_id: int, eos_id: int,
                           unk_id: int | None = None, pad_id: int | None = None, mask_id: int | None = None,
                           add_bos: bool = True, add_space_prefix: bool = False,
                           chat_template: str | None = None) -> Tokenizer:
        """Rebuild a `gemma4` BPE tokenizer from GGUF `tokenizer.ggml.*` arrays.

        CONTROL / UNKNOWN tokens and the tokens llama.cpp forces to USER_DEFINED become special added tokens;
        other USER_DEFINED tokens become plain added tokens (split out of the text, kept by decode).
        `scores` are not used by BPE; they are only checked for length.
        """
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        toks = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else str(t) for t in tokens]
        n = len(toks)
        if n == 0:
            raise FormatError("GGUF tokenizer: empty tokenizer.ggml.tokens")
        if len(token_types) != n or (scores is not None and len(scores) != n):
            raise FormatError(f"GGUF tokenizer: {n} tokens but {len(token_types)} types / "
                              f"{None if scores is None else len(scores)} scores")
        for name, value in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id), ("mask", mask_id)):
            if value is not None and not 0 <= int(value) < n:
                raise FormatError(f"GGUF tokenizer: {name}_token_id {value} outside the vocabulary of {n}")
        vocab: dict[str, int] = {}
        alias: dict[int, int] = {}
        for i, t in enumerate(toks):
            if t in vocab:
                alias[i] = vocab[t]  # the same string twice: encode gives the first id, both decode the same
            else:
                vocab[t] = i
        if alias:
            logger.warning("GGUF tokenizer: %d duplicate token strings; the first id of each is used to encode",
                           len(alias))
        pairs = []
        for m in merges:
            parts = str(m).split(" ")
            if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
                raise FormatError(f"GGUF tokenizer: bad merge {m!r}")
            pairs.append((parts[0], parts[1]))
        unk = toks[unk_id] if unk_id is not None else None
        try:
            model = BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
        except Exception as e:
            raise FormatError(f"GGUF tokenizer: cannot build the BPE model ({e})") from e
        tok = HFTokenizer(model)
        _gemma_pipeline(tok, add_space_prefix)
        added = []
        for i, (t, ty) in enumerate(zip(toks, token_types)):
            if i in alias:
                continue
            ty = int(ty)
            if ty in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
                special = ty != TokenType.USER_DEFINED or t in GGUF_USER_DEFINED_TOKENS
                added.append(AddedToken(t, special=special, normalized=False))
        tok.add_tokens(added)
        specials = _Specials(bos=toks[bos_id], eos=toks[eos_id], pad=toks[pad_id] if pad_id is not None else PAD,
                             unk=unk or UNK, mask=toks[mask_id] if mask_id is not None else MASK)
        return cls(_HFBackend(tok, alias), specials=specials, add_bos=add_bos, add_space_prefix=add_space_prefix,
                   chat_template=chat_template, source="GGUF metadata")

    @classmethod
    def from_gguf_kv(cls, kv: Mapping[str, Any]) -> Tokenizer:
        """`from_gguf_metadata` from a key -> value mapping with the GGUF key names."""
        p = "tokenizer.ggml."
        if kv.get(p + "model") not in ("gemma4", None):
            raise FormatError(f"GGUF tokenizer: model {kv.get(p + 'model')!r} is not supported (need 'gemma4')")
        for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id"):
            if p + key not in kv:
                raise FormatError(f"GGUF tokenizer: missing {p + key}")
        return cls.from_gguf_metadata(
            kv[p + "tokens"], kv.get(p + "scores"), kv[p + "token_type"], kv[p + "merges"],
            bos_id=int(kv[p + "bos_token_id"]), eos_id=int(kv[p + "eos_token_id"]),
            unk_id=kv.get(p + "unknown_token_id"), pad_id=kv.get(p + "padding_token_id"),
            mask_id=kv.get(p + "mask_token_id"), add_bos=bool(kv.get(p + "add_bos_token", True)),
            add_space_prefix=bool(kv.get(p + "add_space_prefix", False)),
            chat_template=kv.get("tokenizer.chat_template"))

    def to_gguf_metadata(self) -> GGUFTokenizerMetadata:
        """The `tokenizer.ggml.*` arrays for this vocabulary, as llama.cpp's Gemma 4 converter writes them.

        tokenizer.json: every score is -1000 and types follow gguf.LlamaHfVocab (BYTE for <0xNN>, CONTROL for
        special ids, NORMAL otherwise) with the 7 tool/channel markers forced to USER_DEFINED, and non-special
        added tokens USER_DEFINED (so llama.cpp also keeps them whole); merges come from the BPE model.
        tokenizer.model: SentencePiece scores and types; merges are derived from the vocabulary in id order (as
        HF derives them when it imports a SentencePiece BPE), so a `gemma4` BPE rebuilt from them reproduces
        the ids.
        """
        tokens: list[str] = []
        for i in range(self.vocab_size):
            t = self._b.id_to_token(i)
            if t is None:
                raise FormatError(f"{self.source}: id {i} has no token (ids must be contiguous for GGUF)")
            tokens.append(t)
        special = self.special_ids
        types: list[int] = []
        if isinstance(self._b, _HFBackend):
            scores = [-1000.0] * len(tokens)
            for i, t in enumerate(tokens):
                if _BYTE_TOKEN.fullmatch(t):
                    types.append(TokenType.BYTE)
                elif t in GGUF_USER_DEFINED_TOKENS:
                    types.append(TokenType.USER_DEFINED)
                elif i in special:
                    types.append(TokenType.CONTROL)
                elif i in self._b.added:
                    types.append(TokenType.USER_DEFINED)
                else:
                    types.append(TokenType.NORMAL)
            model = json.loads(self._b.tok.to_str())["model"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        else:
            scores = [s for _, s, _ in self._b.pieces]
            for i, (t, _, ty) in enumerate(self._b.pieces):
                if t in GGUF_USER_DEFINED_TOKENS:
                    types.append(TokenType.USER_DEFINED)
                elif ty == TokenType.NORMAL and i in special:
                    types.append(TokenType.CONTROL)
                else:
                    types.append(ty)
            merges = spm_merges(tokens, skip={t for i, t in enumerate(tokens) if types[i] != TokenType.NORMAL})
        for m in merges:
            if m.count(" ") != 1:
                raise FormatError(f"{self.source}: merge {m!r} contains a space; GGUF merges cannot hold it")
        return GGUFTokenizerMetadata(
            tokens=tokens, scores=[float(s) for s in scores], token_types=[int(t) for t in types], merges=merges,
            bos_id=self.bos_id if self.bos_id is not None else self.eos_id, eos_id=self.eos_id,
            unk_id=self.unk_id, pad_id=self.pad_id, mask_id=self.mask_id, add_bos=self.add_bos,
            add_space_prefix=self.add_space_prefix, chat_template=self.chat_template)

    # -- encode / decode -----------------------------------------------------------------------------------

    def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.add_eos if add_eos is None else add_eos:
            ids = ids + [self.eos_id]
        return ids

    def _prep(self, text: str) -> str:
        if not isinstance(text, str):
            raise DGemmaError(f"encode expects str, got {type(text).__name__}")
        return text

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings in the text become their ids (as in HF).

        add_bos/add_eos: None means the checkpoint's `add_bos_token` / `add_eos_token`. Text rendered by a chat
        template already starts with the BOS string, so encode it with `add_bos=False`.
        """
        return self._wrap(self._b.encode(self._prep(text)), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None,
                     add_eos: bool | None = None) -> list[list[int]]:
        """`encode` for several texts (parallel in the `tokenizers` back end)."""
        return [self._wrap(ids, add_bos, add_eos) for ids in self._b.encode_batch([self._prep(t) for t in texts])]

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple, 1-D numpy array or torch tensor). Unknown ids are dropped, as in HF."""
        return self._b.decode(_as_id_list(ids), skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]

    def pad_batch(self, seqs: Sequence[Sequence[int]], padding_side: str = "left",
                  pad_to_multiple_of: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Pad id lists to one length -> (ids, attention_mask), mask 1 on real tokens. Left padding by default
        (generation appends on the right)."""
        if padding_side not in ("left", "right"):
            raise DGemmaError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        if self.pad_id is None:
            raise DGemmaError(f"{self.source}: the vocabulary has no pad token")
        width = max((len(s) for s in seqs), default=0)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        ids, mask = [], []
        for s in seqs:
            s = [int(x) for x in s]
            pad = width - len(s)
            if padding_side == "left":
                ids.append([self.pad_id] * pad + s)
                mask.append([0] * pad + [1] * len(s))
            else:
                ids.append(s + [self.pad_id] * pad)
                mask.append([1] * len(s) + [0] * pad)
        return ids, mask

    # -- vocabulary ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_token(self, i: int) -> str:
        t = self._b.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None
        if t is None:
            raise DGemmaError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return t

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. '<|turn>'), or None when the vocabulary lacks it."""
        return self._b.token_to_id(token)

    @property
    def added_token_ids(self) -> frozenset[int]:
        """Ids split out of text as whole tokens (special tokens and other added tokens)."""
        return frozenset(self._b.atomic_ids())

    @property
    def turn_start_id(self) -> int | None:
        return self.token_to_id(TURN_START)

    @property
    def turn_end_id(self) -> int | None:
        return self.token_to_id(TURN_END)

    @property
    def channel_start_id(self) -> int | None:
        return self.token_to_id(CHANNEL_START)

    @property
    def channel_end_id(self) -> int | None:
        return self.token_to_id(CHANNEL_END)

    @property
    def think_id(self) -> int | None:
        return self.token_to_id(THINK)

    def __repr__(self) -> str:
        kind = "tokenizers" if isinstance(self._b, _HFBackend) else "sentencepiece"
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, source={self.source!r})"


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensor / numpy array
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if ids and isinstance(ids[0], (list, tuple)):
        raise DGemmaError("decode expects one sequence of ids; use decode_batch for several")
    return [int(i) for i in ids]


def spm_merges(tokens: Sequence[str], skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, ordered by
    the merged piece's id, then by the parts' lengths (HF `generate_merges` without scores). Pieces in `skip`
    (special, byte, user-defined) neither merge nor are merged."""
    vocab = {t: i for i, t in enumerate(tokens) if t not in skip}
    found: list[tuple[int, int, int, str, str]] = []
    for piece, pid in vocab.items():
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        found += [(pid, len(lt), len(rt), lt, rt) for _, _, lt, rt in local]
    found.sort(key=lambda x: (x[0], x[1], x[2]))
    return [f"{lt} {rt}" for _, _, _, lt, rt in found]
