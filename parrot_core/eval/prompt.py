"""The question prompt and answer clean-up of the official Parrot wrapper in VLMEvalKit.

Written from a reading of `VLMEvalKit/vlmeval/vlm/parrot.py` in AIDC-AI/Parrot (commit 989d6d0):
`build_multi_choice_prompt`, `prepare_inputs`, `generate_inner` and its post-processing.

- Prompt: the hint (when present) and a newline, the question, one `\\nL. option` line per
  existing option, then the answer instruction. The instruction is chosen by the dataset name's
  last three characters (`_cn`, `_pt`, `_ar`, `_ru`, `_tr`); Chinese characters anywhere in the
  prompt choose Chinese whatever the name; anything else is English. A question without options
  asks for "a single word or phrase" instead (in Chinese when the prompt holds Chinese).
- Query: `<image>\\n` + prompt as the one user turn of the ChatML template (system prompt "You are a
  helpful assistant."), tokenized as the official `QwenConversationFormatter.format_query` does.
- Generation: greedy, at most 512 new tokens, stop at `<|im_end|>`; the answer is decoded without
  special tokens and stripped of ASCII whitespace.
- Clean-up, only when the query ends with the English instruction (the wrapper compares with a
  Chinese string that its Chinese instruction never ends with, so Chinese answers are never
  cleaned): repeatedly strip punctuation and whitespace; a leading capital letter followed by a
  space or punctuation, or a trailing one preceded by one, is the answer; else cut everything up
  to "answer is" / "answer:" (then up to "option") and look again.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from ..constants import DEFAULT_IMAGE_TOKEN
from ..model.prompt import format_conversation
from ..model.tokenizer import Tokenizer

OPTION_LETTERS = string.ascii_uppercase
ENGLISH = "\nAnswer with the option's letter from the given choices directly."
INSTRUCTIONS = {
    "_cn": "\n请直接用给定选项中的选项字母回答。",
    "_pt": "\nResponda diretamente com a letra da opção das escolhas dadas.",
    "_ar": "\nأجب مباشرةً بحرف الخيار من الاختيارات المعطاة.",
    "_ru": "\nОтветьте буквой варианта из предложенных вариантов напрямую.",
    "_tr": "\nVerilen seçeneklerden doğrudan seçeneğin harfi ile cevap verin.",
}
OPEN_EN = "\nAnswer the question using a single word or phrase."
OPEN_CN = "\n请用单个词或短语回答问题。"
# the wrapper's clean-up fires when the query ends with one of these (the second never occurs)
CLEANUP_SUFFIXES = ("Answer with the option's letter from the given choices directly.", "请直接回答选项字母。")
_CJK = re.compile("[\u4e00-\u9fff]")


def is_missing(value: Any) -> bool:
    """An empty cell as pandas reads it (NaN / None / NA)."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN is the only value unequal to itself
    except (TypeError, ValueError):
        return False


def has_chinese(text: str) -> bool:
    """VLMEvalKit's `cn_string`: any CJK unified ideograph."""
    return _CJK.search(text) is not None


def options_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """Option letter -> text for every single-letter column with a non-empty cell, in A..Z order."""
    return {k: row[k] for k in OPTION_LETTERS if k in row and not is_missing(row[k])}


def instruction(dataset: str, prompt: str) -> str:
    """The answer instruction for a dataset name and the prompt built so far."""
    if dataset[-3:] == "_cn" or has_chinese(prompt):
        return INSTRUCTIONS["_cn"]
    return INSTRUCTIONS.get(dataset[-3:], ENGLISH)


def build_prompt(row: Mapping[str, Any], dataset: str) -> str:
    """The wrapper's multiple-choice prompt for one dataset row (values as pandas read them)."""
    question = f"{row['question']}"
    hint = row.get("hint")
    if not is_missing(hint):
        question = f"{hint}\n{question}"
    options = options_of(row)
    prompt = question + "".join(f"\n{k}. {v}" for k, v in options.items())
    if options:
        return prompt + instruction(dataset, prompt)
    return prompt + (OPEN_CN if has_chinese(prompt) else OPEN_EN)


def build_query(prompt: str) -> str:
    """The wrapper's query for one image and one text: the image token first."""
    return DEFAULT_IMAGE_TOKEN + "\n" + prompt


def query_ids(tokenizer: Tokenizer, query: str) -> list[int]:
    """Token ids of the official `format_query(query)`: system turn, the user turn as is, bare assistant header."""
    return format_conversation(tokenizer, [{"from": "human", "value": query}], generation_preface="").input_ids


def _after(answer: str, prefixes: tuple[str, ...]) -> str:
    low = answer.lower()
    for p in prefixes:
        if p in low:
            return answer[low.find(p) + len(p):]
    return answer


def clean_answer(query: str, response: str) -> str:
    """The wrapper's final answer from the decoded response (see the module doc)."""
    answer = response.strip(string.whitespace)
    if not query.endswith(CLEANUP_SUFFIXES):
        return answer
    edge = string.whitespace + string.punctuation
    while True:
        answer = answer.strip(string.punctuation + string.whitespace)
        if len(answer) <= 1:
            return answer
        if answer[0] in string.ascii_uppercase and answer[1] in edge:
            return answer[0]
        if answer[-1] in string.ascii_uppercase and answer[-2] in edge:
            return answer[-1]
        if "answer is" in answer.lower() or "answer:" in answer.lower():
            answer = _after(_after(answer, ("answer is", "answer:")), ("option",))
        else:
            return answer
