"""ChatML prompts with the image placeholder, tokenized turn by turn as the official formatter does.

Each turn is `role_header + message + <|im_end|>`, plus `\\n` after every turn but the last; text is
split at `<image>` and each chunk tokenized on its own, the placeholder becoming id -200. Labels
supervise an assistant turn's tokens after its `<|im_start|>assistant\\n` header. The concatenation
is checked against the whole prompt's tokenization (a silent mismatch would mask every label).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import (
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    IM_END,
    IMAGE_TOKEN_INDEX,
    ROLE_HEADERS,
)
from ..errors import ParrotError
from .tokenizer import Tokenizer


@dataclass
class Formatted:
    prompt: str
    input_ids: list[int]
    labels: list[int]


def tokenize_with_image(tok: Tokenizer, text: str) -> list[int]:
    ids: list[int] = []
    chunks = text.split(DEFAULT_IMAGE_TOKEN)
    for i, chunk in enumerate(chunks):
        ids.extend(tok.encode(chunk))
        if i < len(chunks) - 1:
            ids.append(IMAGE_TOKEN_INDEX)
    return ids


def move_image_to_front(value: str) -> str:
    """The official data pipeline: `<image>` removed wherever it is and put first, then a newline."""
    if DEFAULT_IMAGE_TOKEN not in value:
        return value
    value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return (DEFAULT_IMAGE_TOKEN + "\n" + value).strip()


def format_conversation(
    tok: Tokenizer, conversations: list[dict], generation_preface: str | None = None
) -> Formatted:
    """The official QwenConversationFormatter.format, without mutating its input."""
    convs = list(conversations)
    if not convs or convs[0].get("from") != "system":
        convs.insert(0, {"from": "system", "value": DEFAULT_SYSTEM_PROMPT})
    if generation_preface is not None:
        convs.append({"from": "gpt", "value": generation_preface})
    header_len = len(tok.encode(ROLE_HEADERS["gpt"]))
    prompt, input_ids, labels = "", [], []
    n = len(convs)
    for i, conv in enumerate(convs):
        frm = conv.get("from")
        if frm not in ROLE_HEADERS:
            raise ParrotError(f"conversation turn {i}: unknown role {frm!r} (expected system, human or gpt)")
        value = conv.get("value")
        if not isinstance(value, str):
            raise ParrotError(f"conversation turn {i}: 'value' must be a string")
        text = ROLE_HEADERS[frm] + value
        if i < n - 1 or generation_preface is None:
            text += IM_END
        if i < n - 1:
            text += "\n"
        prompt += text
        ids = tokenize_with_image(tok, text)
        input_ids.extend(ids)
        lab = [IGNORE_INDEX] * len(ids)
        if frm == "gpt":
            lab[header_len:] = ids[header_len:]
        labels.extend(lab)
    if tokenize_with_image(tok, prompt) != input_ids:
        raise ParrotError(
            "tokenizing turn by turn differs from tokenizing the whole prompt; the labels would be misaligned. "
            "Check the tokenizer (it must keep <|im_start|>/<|im_end|> as single special tokens)."
        )
    return Formatted(prompt, input_ids, labels)


def inference_conversation(
    prompt: str, has_image: bool, system: str | None = None, history: list[tuple[str, str]] | None = None
) -> list[dict]:
    """The turns of an inference prompt: optional system, past (user, assistant) pairs, the new user turn.

    The image goes in front of the first user message, as `<image>\\n`.
    """
    convs: list[dict] = [{"from": "system", "value": system if system is not None else DEFAULT_SYSTEM_PROMPT}]
    turns = list(history or []) + [(prompt, None)]
    for j, (user, answer) in enumerate(turns):
        if has_image and j == 0:
            text = move_image_to_front(user) if DEFAULT_IMAGE_TOKEN in user else DEFAULT_IMAGE_TOKEN + "\n" + user
        else:
            text = user.replace(DEFAULT_IMAGE_TOKEN, "")
        convs.append({"from": "human", "value": text})
        if answer is not None:
            convs.append({"from": "gpt", "value": answer})
    return convs


def build_inference_ids(
    tok: Tokenizer, prompt: str, has_image: bool, system: str | None = None,
    history: list[tuple[str, str]] | None = None,
) -> list[int]:
    """Token ids ending with the bare `<|im_start|>assistant\\n` header (official format_query)."""
    convs = inference_conversation(prompt, has_image, system, history)
    return format_conversation(tok, convs, generation_preface="").input_ids


def check_image_placeholder(input_ids: list[int], has_image: bool) -> None:
    """A prompt's ids hold one image placeholder (-200) exactly when an image comes with them."""
    n = sum(1 for i in input_ids if i == IMAGE_TOKEN_INDEX)
    if n > 1:
        raise ParrotError("the prompt holds more than one image placeholder (-200); Parrot takes one image per "
                          "conversation")
    if n == 1 and not has_image:
        raise ParrotError("the prompt holds an image placeholder (-200, <image>) but no image was given")
    if n == 0 and has_image:
        raise ParrotError("an image was given but the prompt holds no image placeholder (-200, <image>)")
