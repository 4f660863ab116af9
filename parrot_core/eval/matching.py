"""VLMEvalKit's rule-based answer matcher for multiple-choice questions (exact-matching policy).

Written from a reading of `vlmeval/utils/matching_util.py` (`can_infer_option`, `can_infer_text`,
`can_infer`) in AIDC-AI/Parrot's vendored VLMEvalKit (commit 989d6d0), the code that scored the
paper. In order:

1. an answer containing "Failed to obtain answer via API" is not matched by letter;
2. an answer containing one of four refusal phrases means "no answer" (`Z`);
3. each of `.()[],:;!*#{}` becomes a space and the answer is split on whitespace; exactly one
   option letter among the tokens -> that letter; no option letter but a lone `Z` token -> `Z`;
4. otherwise the unique option whose text (lowercased) is a substring of the lowercased answer;
5. otherwise no match (`None`): wrong under exact matching, or a case for the LLM judge.

Later upstream VLMEvalKit versions changed the matcher (a letter must sit among the last five
tokens, a "the answer is X" regex, a length cap on text matching); the vendored version is kept.
VLMEvalKit's VERBOSE-only branch (refusing a lone `A` in long answers) is not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

API_FAILURE = "Failed to obtain answer via API"
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
SEPARATORS = ".()[],:;!*#{}"
NO_ANSWER = "Z"


def answer_tokens(answer: str) -> list[str]:
    """The answer split on whitespace after each separator character became a space."""
    for c in SEPARATORS:
        answer = answer.replace(c, " ")
    return answer.split()


def match_letter(answer: str, choices: Mapping[str, Any]) -> str | None:
    """Steps 1-3: an option letter standing alone, `Z` for a refusal or a lone Z, else None."""
    if API_FAILURE in answer:
        return None
    if any(phrase in answer for phrase in REFUSALS):
        return NO_ANSWER
    tokens = set(answer_tokens(answer))
    found = [letter for letter in choices if letter in tokens]
    if len(found) == 1:
        return found[0]
    if not found and NO_ANSWER in tokens:
        return NO_ANSWER
    return None


def match_text(answer: str, choices: Mapping[str, Any]) -> str | None:
    """Step 4: the one option whose lowercased text occurs in the lowercased answer."""
    low = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in low]
    return found[0] if len(found) == 1 else None


def match_option(answer: Any, choices: Mapping[str, Any]) -> str | None:
    """The option letter (or `Z`) an answer maps to, or None when the rules find none.

    answer: the prediction as VLMEvalKit holds it (`str()` of the cell, so an empty cell is "nan").
    choices: option letter -> option text, only the options that exist (non-empty cells).
    """
    answer = str(answer)
    return match_letter(answer, choices) or match_text(answer, choices)
