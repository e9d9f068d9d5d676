"""Tokenizer: ids and decoding equal to HF transformers on the same files, both kinds, GGUF round trips."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import re
import types
from pathlib import Path
from typing import Any, Iterator

import pytest

from dgemma.runtime.errors import DGemmaError, FormatError
from dgemma.runtime.tokenizer import (
    GGUF_USER_DEFINED_TOKENS, SPECIAL_TOKEN_IDS, TAIL_SPECIAL_TOKENS, Tokenizer, TokenType, read_spm_pieces,
)

ROOT = Path(__file__).resolve().parents[1]


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("_dg_tiny_tok", ROOT / "scripts" / "make_tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


MT = load_script()

CORPUS = [
    "Hello world! Why is the sky blue?",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttab runs, new\nlines\n\n\nand a blank line\n",
    "windows\r\nline endings\r\n",
    "café naïve Ærøskøbing straße déjà-vu",
    "日本語のテキスト。中文：天空为什么是蓝色的？한국어 문장입니다.",
    "emoji 😀🚀 👍🏽 👨‍👩‍👧 ❤️ family, flags 🇫🇷",
    "Ελληνικά και Русский текст; العربية; עברית",
    "def f(x: int) -> int:\n    \"\"\"Doc.\"\"\"\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "for i in range(10):\n        print(i, end='')\n",
    "<bos><|turn>user\nHi there<turn|>\n<|turn>model\n<|channel>thought\nhmm<channel|>Hello<turn|>",
    "<pad><eos><unk><mask><|think|><|tool_call>call:f{a:<|\"|>x<|\"|>}<tool_call|><|tool_response><tool_response|>",
    "<|image><|image|><image|> <unused0> <0x41> <|tur <turn| <|channel <bos",
    "x" * 300 + " " * 17 + "y",
    "\u3000ideographic space, nbsp\u00a0here, zero\u200bwidth, \u2581 lower block",
    "1234567890 3.14159 1e-6 0xFF -42",
]
CASES = [("bpe", 320), ("bpe", 4096), ("sentencepiece", 300), ("sentencepiece", 4096)]


@contextlib.contextmanager
def hf_sentencepiece_import() -> Iterator[None]:
    """HF reads tokenizer.model with the protobuf package. When it is missing, hand HF's SentencePiece extractor
    the pieces through our proto reader (checked against sentencepiece in a test below); everything after that
    (merge derivation, BPE, added tokens, decoding) is HF's own code."""
    try:
        import google.protobuf  # noqa: F401

        yield
        return
    except ImportError:
        pass
    import transformers.convert_slow_tokenizer as cst

    def fake_init(self: Any, model: str) -> None:
        pieces = read_spm_pieces(Path(model).read_bytes())
        self.proto = types.SimpleNamespace(
            pieces=[types.SimpleNamespace(piece=p, score=s, type=t) for p, s, t in pieces],
            trainer_spec=types.SimpleNamespace(unk_id=3, model_type=2),
            normalizer_spec=types.SimpleNamespace(precompiled_charsmap=b""),
        )

    orig = cst.SentencePieceExtractor.__init__
    cst.SentencePieceExtractor.__init__ = fake_init
    try:
        yield
    finally:
        cst.SentencePieceExtractor.__init__ = orig


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    out = {}
    for kind, v in CASES:
        d = tmp_path_factory.mktemp(f"{kind}{v}")
        MT.write_tiny_tokenizer(d, v, kind)
        out[(kind, v)] = d
    return out


@pytest.fixture(scope="module")
def hf_toks(tok_dirs: dict) -> dict:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    with hf_sentencepiece_import():
        return {k: transformers.AutoTokenizer.from_pretrained(str(d)) for k, d in tok_dirs.items()}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return CORPUS + MT.build_corpus()[::9]


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{v}" for k, v in CASES])
def test_ids_equal_hf(case: tuple, tok_dirs: dict, hf_toks: dict, corpus: list[str]) -> None:
    mine, hf = Tokenizer.from_pretrained(tok_dirs[case]), hf_toks[case]
    assert mine.vocab_size == len(hf) == case[1]
    bad = [t for t in corpus if mine.encode(t) != hf.encode(t)]
    bad += [t for t in corpus if mine.encode(t, add_bos=False) != hf.encode(t, add_special_tokens=False)]
    print(f"{case}: {len(bad)} of {2 * len(corpus)} encodings differ from HF")
    assert not bad, bad[:3]
    assert mine.encode_batch(corpus) == [hf.encode(t) for t in corpus]
    assert mine.encode(CORPUS[0])[0] == 2


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{v}" for k, v in CASES])
def test_decode_equal_hf_and_round_trip(case: tuple, tok_dirs: dict, hf_toks: dict, corpus: list[str]) -> None:
    mine, hf = Tokenizer.from_pretrained(tok_dirs[case]), hf_toks[case]
    for t in corpus:
        ids = mine.encode(t, add_bos=False)
        assert mine.decode(ids) == t.replace("\u2581", " ")  # a literal '▁' is a space to Gemma (HF too)
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # Random ids (draft canvases): byte tokens that are not valid UTF-8, specials, unused ids.
    rng = random.Random(7)
    for _ in range(60):
        ids = [rng.randrange(case[1]) for _ in range(rng.randint(1, 40))]
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert mine.decode_batch([[72], [2, 73]], skip_special_tokens=True) == hf.batch_decode(
        [[72], [2, 73]], skip_special_tokens=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{v}" for k, v in CASES])
def test_special_ids_and_vocab(case: tuple, tok_dirs: dict) -> None:
    tok = Tokenizer.from_pretrained(tok_dirs[case])
    v = case[1]
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.eos_ids == [1, 106, 50]
    assert (tok.turn_start_id, tok.turn_end_id) == (105, 106)
    assert tok.token_to_id("<|tool_response>") == 50
    assert tok.channel_start_id is not None and tok.channel_end_id is not None and tok.think_id is not None
    for name, i in SPECIAL_TOKEN_IDS.items():
        assert tok.id_to_token(i) == name and tok.token_to_id(name) == i and i < 128
    for k, name in enumerate(TAIL_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == v - 3 + k
    tokens = [tok.id_to_token(i) for i in range(v)]
    assert len(set(tokens)) == v == len(tok)
    assert sum(bool(re.fullmatch(r"<0x[0-9A-F]{2}>", t)) for t in tokens) == 256
    assert set(SPECIAL_TOKEN_IDS.values()) <= tok.special_ids
    assert tok.add_bos and tok.chat_template is not None and "<|turn>" in tok.chat_template
    assert tok.token_to_id("no such token") is None
    with pytest.raises(DGemmaError):
        tok.id_to_token(v)


def test_batch_padding(tok_dirs: dict) -> None:
    tok = Tokenizer.from_pretrained(tok_dirs[("bpe", 320)])
    ids, mask = tok.pad_batch([[5, 6, 7], [8]])
    assert ids == [[5, 6, 7], [0, 0, 8]] and mask == [[1, 1, 1], [0, 0, 1]]
    ids, mask = tok.pad_batch([[5, 6, 7], [8]], padding_side="right", pad_to_multiple_of=4)
    assert ids == [[5, 6, 7, 0], [8, 0, 0, 0]] and mask == [[1, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(DGemmaError):
        tok.pad_batch([[1]], padding_side="middle")


def test_newline_presplit_invariance(tok_dirs: dict, corpus: list[str]) -> None:
    """llama.cpp's `gemma4` pre-tokenizer splits text into newline runs and the rest before BPE; the tiny
    vocabularies are trained so that this gives the same ids as HF's unsplit BPE."""
    for case in CASES:
        tok = Tokenizer.from_pretrained(tok_dirs[case])
        for t in corpus:
            if "<" in t:
                continue  # special tokens are split out before either pre-tokenizer runs
            pieces = [p for p in re.findall(r"[^\n]+|\n+", t)]
            split_ids = [i for p in pieces for i in tok.encode(p, add_bos=False)]
            assert split_ids == tok.encode(t, add_bos=False), (case, t)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_writer_deterministic_and_sizes(kind: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    MT.write_tiny_tokenizer(a, 333, kind)
    MT.write_tiny_tokenizer(b, 333, kind)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert ("tokenizer.json" in names) == (kind == "bpe") and ("tokenizer.model" in names) == (kind != "bpe")
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    for v in (MT.MIN_VOCAB, 1000):
        MT.write_tiny_tokenizer(tmp_path / f"v{v}", v, kind)
        assert Tokenizer.from_pretrained(tmp_path / f"v{v}").vocab_size == v
    with pytest.raises(ValueError):
        MT.write_tiny_tokenizer(tmp_path / "small", MT.MIN_VOCAB - 1, kind)
    cfg = json.loads((a / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["tokenizer_class"] == "GemmaTokenizer"


def test_spm_proto_reader_matches_sentencepiece(tok_dirs: dict) -> None:
    import sentencepiece as spm

    path = tok_dirs[("sentencepiece", 300)] / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces = read_spm_pieces(path.read_bytes())
    assert len(pieces) == sp.get_piece_size() == 300
    for i, (p, s, t) in enumerate(pieces):
        assert p == sp.id_to_piece(i) and s == pytest.approx(sp.get_score(i))
        assert (t == TokenType.CONTROL) == sp.is_control(i) and (t == TokenType.BYTE) == sp.is_byte(i)
        assert (t == TokenType.UNKNOWN) == sp.is_unknown(i)
    # User-defined pieces are whole tokens for sentencepiece itself.
    assert [sp.id_to_piece(i) for i in sp.encode("a\n\nb", out_type=int)].count("\n\n") == 1
    assert [(i, p) for i, (p, _, t) in enumerate(pieces) if t == TokenType.USER_DEFINED]


def _rebuild(tok: Tokenizer) -> Tokenizer:
    md = tok.to_gguf_metadata()
    return Tokenizer.from_gguf_metadata(md.tokens, md.scores, md.token_types, md.merges, bos_id=md.bos_id,
                                        eos_id=md.eos_id, unk_id=md.unk_id, pad_id=md.pad_id,
                                        mask_id=md.mask_id, add_bos=md.add_bos,
                                        add_space_prefix=md.add_space_prefix, chat_template=md.chat_template)


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{v}" for k, v in CASES])
def test_gguf_metadata_round_trip(case: tuple, tok_dirs: dict, corpus: list[str]) -> None:
    tok = Tokenizer.from_pretrained(tok_dirs[case])
    back = _rebuild(tok)
    md = tok.to_gguf_metadata()
    assert md.model == "gemma4" and not md.add_space_prefix and md.add_bos
    assert (md.bos_id, md.eos_id, md.unk_id, md.pad_id, md.mask_id) == (2, 1, 3, 0, 4)
    assert len(md.tokens) == len(md.scores) == len(md.token_types) == case[1] and md.merges
    assert {t for t, ty in zip(md.tokens, md.token_types) if ty == TokenType.USER_DEFINED} >= GGUF_USER_DEFINED_TOKENS
    bad = [t for t in corpus if back.encode(t) != tok.encode(t)]
    print(f"{case}: {len(bad)} of {len(corpus)} differ after the GGUF round trip, {len(md.merges)} merges")
    assert not bad, bad[:3]
    rng = random.Random(3)
    for _ in range(40):
        ids = [rng.randrange(case[1]) for _ in range(20)]
        for skip in (False, True):
            assert back.decode(ids, skip) == tok.decode(ids, skip)
    assert back.special_ids == tok.special_ids and back.eos_ids == tok.eos_ids
    assert back.to_gguf_metadata() == tok.to_gguf_metadata() or case[0] == "sentencepiece"


@pytest.mark.parametrize("v", [320, 4096])
def test_gguf_metadata_matches_gguf_py(v: int, tok_dirs: dict) -> None:
    """Our arrays equal what gguf-py's LlamaHfVocab + SpecialVocab produce from tokenizer.json (with the 7
    markers forced to USER_DEFINED, as llama.cpp's Gemma 4 converter does)."""
    gguf = pytest.importorskip("gguf")
    d = tok_dirs[("bpe", v)]
    md = Tokenizer.from_pretrained(d).to_gguf_metadata()
    vocab = gguf.LlamaHfVocab(d)
    toks, scores, types_ = [], [], []
    for text, score, ty in vocab.all_tokens():
        s = text.decode("utf-8")
        toks.append(s)
        scores.append(score)
        types_.append(int(gguf.TokenType.USER_DEFINED if s in GGUF_USER_DEFINED_TOKENS else ty))
    special = gguf.SpecialVocab(d, load_merges=True)
    assert toks == md.tokens and scores == md.scores and types_ == md.token_types
    assert special.merges == md.merges
    assert special.special_token_ids == {"bos": 2, "eos": 1, "unk": 3, "pad": 0, "mask": 4}
    assert special.add_special_token.get("bos") is True


def test_gguf_file_round_trip(tok_dirs: dict, corpus: list[str], tmp_path: Path) -> None:
    """Write the arrays with gguf.GGUFWriter, read them back with gguf.GGUFReader, rebuild, compare ids."""
    gguf = pytest.importorskip("gguf")
    tok = Tokenizer.from_pretrained(tok_dirs[("bpe", 320)])
    md = tok.to_gguf_metadata()
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), arch="diffusion-gemma")
    w.add_tokenizer_model(md.model)
    w.add_token_list(md.tokens)
    w.add_token_scores(md.scores)
    w.add_token_types(md.token_types)
    w.add_token_merges(md.merges)
    w.add_bos_token_id(md.bos_id)
    w.add_eos_token_id(md.eos_id)
    w.add_unk_token_id(md.unk_id)
    w.add_pad_token_id(md.pad_id)
    w.add_mask_token_id(md.mask_id)
    w.add_add_bos_token(md.add_bos)
    w.add_add_space_prefix(md.add_space_prefix)
    w.add_chat_template(md.chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    kv = {name: f.contents() for name, f in r.fields.items() if name.startswith("tokenizer.")}
    back = Tokenizer.from_gguf_kv(kv)
    assert back.chat_template == tok.chat_template
    assert [back.encode(t) for t in corpus] == [tok.encode(t) for t in corpus]


def test_gguf_metadata_errors() -> None:
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "<0x63>"]
    types_ = [3, 3, 3, 2, 1, 1, 1, 6]
    ok = Tokenizer.from_gguf_metadata(toks, None, types_, ["a b"], bos_id=2, eos_id=1, unk_id=3, pad_id=0)
    assert ok.encode("abcab") == [2, 6, 7, 6] and ok.decode([6, 7, 1]) == "abc<eos>"
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_metadata(toks, None, types_, ["a c"], bos_id=2, eos_id=1)
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_metadata(toks, [0.0], types_, [], bos_id=2, eos_id=1)
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_metadata(toks, None, types_, [], bos_id=2, eos_id=99)
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_kv({"tokenizer.ggml.model": "llama"})
    with pytest.raises(FormatError):
        Tokenizer.from_gguf_kv({"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": toks})


def test_missing_and_corrupt_files(tok_dirs: dict, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_pretrained(empty)
    src = tok_dirs[("bpe", 320)]
    text = (src / "tokenizer.json").read_text(encoding="utf-8")
    for name, content in [("trunc", text[: len(text) // 2]), ("notjson", "\x00\x01garbage"),
                          ("wrongjson", json.dumps({"model": {"type": "Nope"}}))]:
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(content, encoding="utf-8")
        with pytest.raises(FormatError, match="tokenizer.json"):
            Tokenizer.from_pretrained(d)
    d = tmp_path / "badcfg"
    d.mkdir()
    (d / "tokenizer.json").write_text(text, encoding="utf-8")
    (d / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FormatError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}), encoding="utf-8")
    with pytest.raises(FormatError, match="BOS"):
        Tokenizer.from_pretrained(d)
    spm_src = (tok_dirs[("sentencepiece", 300)] / "tokenizer.model").read_bytes()
    for name, content in [("spmtrunc", spm_src[: len(spm_src) // 3]), ("spmjunk", bytes(range(256)) * 4)]:
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.model").write_bytes(content)
        with pytest.raises(FormatError, match="tokenizer.model"):
            Tokenizer.from_pretrained(d)


def test_encode_rejects_non_text(tok_dirs: dict) -> None:
    tok = Tokenizer.from_pretrained(tok_dirs[("bpe", 320)])
    with pytest.raises(DGemmaError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(DGemmaError):
        tok.decode([[1, 2], [3]])


def test_gemma_class_pipeline_and_config_added_tokens(tok_dirs: dict, corpus: list[str], tmp_path: Path) -> None:
    """HF's GemmaTokenizer rebuilds the normalizer / pre-tokenizer / decoder whatever tokenizer.json says and
    adds the tokens of tokenizer_config.json's added_tokens_decoder; the runtime matches it in both cases."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    src = tok_dirs[("bpe", 320)]
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tj["added_tokens"]}
    tj["pre_tokenizer"] = {"type": "Whitespace"}  # a foreign pipeline that GemmaTokenizer ignores
    tj["decoder"] = {"type": "Strip", "content": " ", "start": 1, "stop": 1}
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|think|>"]
    cfg["added_tokens_decoder"] = added
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    mine, hf = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    texts = corpus + ["<|think|> thinking on"]
    assert [mine.encode(t) for t in texts] == [hf.encode(t) for t in texts]
    assert [mine.decode(mine.encode(t)) for t in texts] == [hf.decode(hf.encode(t)) for t in texts]
    assert mine.encode("<|think|>", add_bos=False) == [98]


def test_gguf_duplicate_token_strings() -> None:
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "ab"]
    tok = Tokenizer.from_gguf_metadata(toks, None, [3, 3, 3, 2, 1, 1, 1, 1], ["a b"], bos_id=2, eos_id=1)
    assert tok.encode("ab", add_bos=False) == [6]
    assert tok.decode([6, 7]) == "abab" and tok.id_to_token(7) == "ab"
