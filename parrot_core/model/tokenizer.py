"""The Qwen2 tokenizer through the `tokenizers` library (no torch, no transformers).

Loads tokenizer.json as transformers' Qwen2TokenizerFast does; without it, rebuilds the Qwen2
byte-level BPE from vocab.json + merges.txt (what transformers' slow-to-fast conversion does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from ..constants import IM_END, IM_START, PAD_TOKEN
from ..errors import ParrotError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _HFTokenizer:
    """A Qwen2-style byte-level BPE (NFC, Qwen2 split regex, byte-level) over a vocab and merges."""
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _added_tokens(directory: Path) -> list[AddedToken]:
    out: dict[str, AddedToken] = {}
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        for entry in json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).values():
            out[entry["content"]] = AddedToken(entry["content"], special=entry.get("special", True), normalized=False)
    added = directory / "added_tokens.json"
    if added.is_file():
        for content in json.loads(added.read_text(encoding="utf-8")):
            out.setdefault(content, AddedToken(content, special=True, normalized=False))
    for content in (PAD_TOKEN, IM_START, IM_END):
        out.setdefault(content, AddedToken(content, special=True, normalized=False))
    return list(out.values())


def is_text(v: object) -> bool:
    """A str the tokenizer can encode: JSON's \\uXXXX escapes can make lone surrogates, which are not."""
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, directory: Path | None = None):
        self.backend = backend
        self.directory = directory
        self.eos_id = self._require(IM_END)
        self.pad_id = self._require(PAD_TOKEN)
        self.im_start_id = self._require(IM_START)

    def _require(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            where = f" in {self.directory}" if self.directory else ""
            raise ParrotError(f"tokenizer{where} lacks the ChatML special token {token!r}")
        return i

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        d = Path(directory)
        try:
            if (d / "tokenizer.json").is_file():
                backend = _HFTokenizer.from_file(str(d / "tokenizer.json"))
            elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
                vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
                lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
                merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
                backend = qwen2_backend(vocab, merges)
                backend.add_special_tokens(_added_tokens(d))
            else:
                raise ParrotError(
                    f"{d}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt). Copy them from the "
                    "base model's directory."
                )
        except ParrotError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            raise ParrotError(f"{d}: cannot read the tokenizer ({e})") from None
        return cls(backend, d)

    def encode(self, text: str) -> list[int]:
        if not is_text(text):
            raise ParrotError(f"text {text[:40]!r}{'...' if len(text) > 40 else ''} is not valid Unicode (it holds a "
                              "lone surrogate, e.g. from a JSON \\ud800 escape); the tokenizer cannot encode it")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies every tokenizer file that exists; raises if there is none."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if not ({"tokenizer.json"} & set(copied) or {"vocab.json", "merges.txt"} <= set(copied)):
        raise ParrotError(
            f"{src}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt). Copy them from the base "
            "model's directory."
        )
    return copied
