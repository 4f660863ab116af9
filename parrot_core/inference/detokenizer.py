"""Streaming detokenization: token ids in, text pieces out, never a broken character.

Qwen2's tokenizer is byte-level BPE: one character may span several tokens (a Chinese character
is 3 UTF-8 bytes, often one token each). Each token's bytes go through an incremental UTF-8
decoder, which holds back an unfinished character until its last byte arrives. Bytes that can
never form a character become U+FFFD (at once when invalid, at `finalize` when the text ends
inside a character); decoding never raises. Special tokens are skipped, as in
`decode(skip_special_tokens=True)`.
"""

from __future__ import annotations

import codecs

from tokenizers import decoders

from ..model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte is shown as one printable character in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


class StreamingDetokenizer:
    """`add(token_id) -> str` returns the text that became complete; `finalize()` flushes the rest.

    `text` holds everything returned so far, so the pieces always concatenate to `text`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        added = tokenizer.backend.get_added_tokens_decoder()
        self._special = {i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items() if not t.special}
        self._byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only for tokenizers that are not byte-level

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (b"" for special tokens and ids outside the vocabulary)."""
        if token_id in self._special:
            return b""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        return b"".join(
            bytes([UNICODE_TO_BYTE[c]]) if c in UNICODE_TO_BYTE else c.encode("utf-8") for c in piece
        )

    def add(self, token_id: int) -> str:
        if self._byte_level:
            piece = self._utf8.decode(self.token_bytes(token_id))
        else:
            self._ids.append(token_id)
            piece = self._fallback(final=False)
        self.text += piece
        return piece

    def finalize(self) -> str:
        """Flushes bytes that never completed a character (as U+FFFD); the stream ends here."""
        piece = self._utf8.decode(b"", final=True) if self._byte_level else self._fallback(final=True)
        self.text += piece
        return piece

    def _fallback(self, final: bool) -> str:
        """Other tokenizers: decode everything, hold back trailing U+FFFD (a character still arriving)."""
        full = self.tokenizer.decode(self._ids)
        if not final:
            full = full.rstrip(REPLACEMENT)
        if not full.startswith(self.text):
            return ""  # the decoder rewrote earlier text (rare); emit nothing rather than garble
        return full[len(self.text):]
