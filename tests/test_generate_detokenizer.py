"""The streaming detokenizer: characters split across tokens never show broken; the rest is U+FFFD."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from parrot.inference.detokenizer import StreamingDetokenizer, bytes_to_unicode
from parrot.model.tokenizer import Tokenizer
from parrot.testing import write_tokenizer

MULTILINGUAL = {
    "zh": "这张图片里有什么？图片里有一只猫坐在窗台上。",
    "ar": "ما الذي في الصورة؟ هناك قطة تجلس على حافة النافذة.",
    "ru": "Что изображено на картинке? Кошка сидит на подоконнике.",
    "tr": "Resimde ne var? Çok güzel, değil mi? ığüşöç İĞÜŞÖÇ",
    "emoji": "A parrot 🦜 and a cat 🐈‍⬛!",
}


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def tok(request, tmp_path_factory) -> Tokenizer:
    """The tiny byte-level BPE, loaded from tokenizer.json or rebuilt from vocab.json + merges.txt."""
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    if request.param == "vocab+merges":
        slow = tmp_path_factory.mktemp("tok_slow")
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(d / name, slow / name)
        d = slow
    return Tokenizer.from_dir(d)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = StreamingDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.finalize()]
    assert "".join(pieces) == d.text
    return pieces


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte (the byte-level alphabet is in the vocabulary)."""
    table = bytes_to_unicode()
    return [tok.token_to_id(table[b]) for b in data]


@pytest.mark.parametrize("lang", sorted(MULTILINGUAL))
def test_multilingual_text_streams_back_exactly_without_broken_characters(tok, lang):
    text = MULTILINGUAL[lang]
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the test means something only if some token ends inside a character
    d = StreamingDetokenizer(tok)
    split = [i for i in ids if not _valid_utf8(d.token_bytes(i))]
    if lang != "tr":  # Turkish has few multi-byte letters; the tiny BPE may keep them whole
        assert split, f"no token splits a character in {lang}"


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_character_spread_over_byte_tokens_appears_only_when_complete(tok):
    cat, parrot_emoji, alef = "猫".encode(), "🦜".encode(), "ا".encode()
    assert stream(tok, byte_ids(tok, cat)) == ["", "", "猫", ""]
    assert stream(tok, byte_ids(tok, parrot_emoji)) == ["", "", "", "🦜", ""]
    assert stream(tok, byte_ids(tok, alef + b"x")) == ["", "ا", "x", ""]


def test_bytes_that_never_complete_a_character_become_replacement_at_the_end(tok):
    assert stream(tok, byte_ids(tok, "猫".encode()[:2])) == ["", "", "\ufffd"]
    assert stream(tok, byte_ids(tok, b"ok" + "🦜".encode()[:3])) == ["o", "k", "", "", "", "\ufffd"]


def test_invalid_bytes_mid_stream_become_replacement_and_text_continues(tok):
    pieces = stream(tok, byte_ids(tok, b"\x80a" + "猫".encode()[:2] + b"b"))
    assert "".join(pieces) == "\ufffda\ufffdb"


def test_special_and_unknown_ids_are_skipped_without_error(tok):
    ids = tok.encode("hi") + [tok.eos_id, tok.pad_id, 10_000] + tok.encode(" there")
    assert "".join(stream(tok, ids)) == "hi there"


def test_stream_equals_tokenizer_decode_on_random_token_sequences(tok):
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size + 5, size=rng.integers(1, 24))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_non_byte_level_tokenizer_holds_back_partial_characters():
    """Tokenizers with byte-fallback tokens (<0xE7>) go through the decode-and-diff path."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"a": 256, "b": 257})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = Tokenizer(hf)
    ids = [vocab[f"<0x{b:02X}>"] for b in "猫".encode()] + [256]
    assert stream(tok, ids) == ["", "", "猫", "a", ""]
    assert "".join(stream(tok, ids[:2])) == tok.decode(ids[:2])  # the unfinished bytes, as the tokenizer shows them
