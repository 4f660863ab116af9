"""The rule-based matcher against cases derived by reading VLMEvalKit's `can_infer` (vendored 989d6d0).

Each expectation is worked out by hand from its rules: separators `.()[],:;!*#{}` become spaces, one
option letter among the whitespace tokens wins, a lone Z (or a refusal phrase) means no answer,
else a unique option text contained in the lowercased answer, else no match."""

from __future__ import annotations

import pytest

from parrot.eval.matching import match_option

COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("answer, expected", [
    ("A", "A"), ("B.", "B"), ("(C)", "C"), ("[D]", "D"), ("**B**", "B"), ("Answer: C", "C"), ("D) yellow", "D"),
    ("{A}", "A"), ("#C;", "C"), ("B!", "B"), ("The answer is C", "C"),
    ("C,D", None),  # two letters, no option text: no match
    ("A or B", None),
    ("A B: it is green", "B"),  # two letters, then the one option text in the answer
    ("It is blue.", "C"), ("BLUE", "C"), ("a Green one", "B"),  # option text, any case
    ("red or green", None),  # two option texts
    ("Z", "Z"), ("Z.", "Z"), ("Z C", "C"),  # a lone Z means no answer; a letter beats it
    ("Sorry, I can't help with images of people yet.", "Z"),
    ("Cannot determine the answer, maybe A", "Z"),  # a refusal phrase wins over a letter
    ("I can't process this file.", "Z"),
    ("I'm sorry, but without the image provided I guess B", "Z"),
    ("cannot determine the answer", None),  # the phrases are case-sensitive
    ("", None), ("nan", None),
    ("a", None), ("b.", None), ("the answer is c", None),  # lowercase letters are not options
    ("B。", None),  # a full-width full stop is not a separator: the token is "B。"
    ("Failed to obtain answer via API. B", None),  # an API failure is never matched by letter
    ("Failed to obtain answer via API: red", "A"),  # ... but still by option text
    ("AB", None), ("A-B", None), ("E", None),  # not standing alone / not an option
])
def test_english_answers_map_as_vlmevalkit_does(answer, expected):
    assert match_option(answer, COLOURS) == expected


@pytest.mark.parametrize("answer, choices, expected", [
    ("答案是B", {"A": "红色", "B": "绿色"}, None),  # no space around the letter: one token
    ("答案是 B", {"A": "红色", "B": "绿色"}, "B"),
    ("B：绿色", {"A": "红色", "B": "绿色"}, "B"),  # full-width colon kept, but the option text matches
    ("是绿色的", {"A": "红色", "B": "绿色"}, "B"),
    ("A resposta é B", {"A": "vermelho", "B": "verde"}, None),  # the Portuguese article "A" is a letter too
    ("A resposta é verde", {"A": "vermelho", "B": "verde"}, "A"),  # ... alone, it is taken as the answer
    ("Resposta: verde", {"A": "vermelho", "B": "verde"}, "B"),
    ("الإجابة هي B", {"A": "أحمر", "B": "أخضر"}, "B"),
    ("أخضر", {"A": "أحمر", "B": "أخضر"}, "B"),
    ("Ответ: В", {"A": "красный", "B": "зелёный"}, None),  # Cyrillic В is not the letter B
    ("Ответ: B", {"A": "красный", "B": "зелёный"}, "B"),
    ("ЗЕЛЁНЫЙ", {"A": "красный", "B": "зелёный"}, "B"),
    ("Cevap: C", {"A": "kırmızı", "B": "yeşil", "C": "mavi"}, "C"),
    ("mavi renk", {"A": "kırmızı", "B": "yeşil", "C": "mavi"}, "C"),
])
def test_answers_in_every_language(answer, choices, expected):
    assert match_option(answer, choices) == expected


def test_empty_prediction_read_as_nan_can_match_an_option_text():
    # pandas reads an empty cell as NaN and VLMEvalKit scores str(NaN) == "nan": an option whose text
    # occurs in "nan" is matched
    assert match_option(float("nan"), {"A": "Na", "B": "K"}) == "A"
    assert match_option(float("nan"), COLOURS) is None


def test_option_values_are_compared_as_pandas_typed_them():
    # a numeric option column with an empty cell is float: options "1.0", "2.0"
    choices = {"A": 1.0, "B": 2.0}
    assert match_option("2.0", choices) == "B"
    assert match_option("2", choices) is None
    assert match_option("B", {"A": 3, "B": 4}) == "B"
