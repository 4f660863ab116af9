"""The question prompt, the query's token ids and the answer clean-up of the official Parrot wrapper
(`VLMEvalKit/vlmeval/vlm/parrot.py`, AIDC-AI/Parrot 989d6d0), with expectations written out by hand."""

from __future__ import annotations

import math

import pytest

from parrot.eval.prompt import build_prompt, build_query, clean_answer, query_ids
from parrot.model.tokenizer import Tokenizer

ROW = {"index": 0, "question": "What is it?", "A": "a cat", "B": "a dog", "C": math.nan, "D": math.nan,
       "hint": math.nan, "answer": "A"}
EN = "\nAnswer with the option's letter from the given choices directly."


@pytest.mark.parametrize("name, instruction", [
    ("MMMB_en", EN),
    ("MMMB_cn", "\n请直接用给定选项中的选项字母回答。"),
    ("MMBench_dev_pt", "\nResponda diretamente com a letra da opção das escolhas dadas."),
    ("mmmb_ar", "\nأجب مباشرةً بحرف الخيار من الاختيارات المعطاة."),
    ("MMMB_ru", "\nОтветьте буквой варианта из предложенных вариантов напрямую."),
    ("MMBench_dev_tr", "\nVerilen seçeneklerden doğrudan seçeneğin harfi ile cevap verin."),
    ("MMMB", EN), ("my_set", EN), ("MMMB_zh", EN),  # only the last three characters count
])
def test_instruction_follows_the_dataset_name(name, instruction):
    assert build_prompt(ROW, name) == "What is it?\nA. a cat\nB. a dog" + instruction


def test_chinese_characters_choose_chinese_whatever_the_name():
    row = {**ROW, "question": "这是什么？"}
    assert build_prompt(row, "MMMB_pt") == "这是什么？\nA. a cat\nB. a dog\n请直接用给定选项中的选项字母回答。"
    assert build_prompt({**ROW, "B": "狗"}, "MMMB_en").endswith("\nB. 狗\n请直接用给定选项中的选项字母回答。")


def test_hint_goes_first_and_options_keep_pandas_types():
    row = {**ROW, "hint": "Look left.", "C": 3.0, "D": 4}
    assert build_prompt(row, "MMMB_en") == "Look left.\nWhat is it?\nA. a cat\nB. a dog\nC. 3.0\nD. 4" + EN


def test_question_without_options_asks_for_a_word_or_phrase():
    row = {"index": 1, "question": "What is it?", "A": math.nan, "B": None}
    assert build_prompt(row, "MMMB_pt") == "What is it?\nAnswer the question using a single word or phrase."
    assert build_prompt({**row, "question": "这是什么"}, "x") == "这是什么\n请用单个词或短语回答问题。"


def test_query_tokens_equal_the_official_format_query(tiny_ckpt):
    tok = Tokenizer.from_dir(tiny_ckpt)
    query = build_query("What is it?\nA. a cat" + EN)
    assert query == "<image>\nWhat is it?\nA. a cat" + EN
    # format_query: system turn, then "<|im_start|>user\n" + query + "<|im_end|>\n", then the bare assistant
    # header; each turn tokenized on its own, the text split at <image> (id -200)
    expected = (tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
                + tok.encode("<|im_start|>user\n") + [-200]
                + tok.encode("\nWhat is it?\nA. a cat" + EN + "<|im_end|>\n")
                + tok.encode("<|im_start|>assistant\n"))
    assert query_ids(tok, query) == expected


QUERY_EN = "<image>\nQ?\nA. x\nB. y" + EN


@pytest.mark.parametrize("response, answer", [
    ("B", "B"), ("  B\n", "B"), ("B.", "B"), ("(C)", "C"), ("A. a cat", "A"), ("A) a cat", "A"),
    ("The answer is B", "B"), ("It is a dog, so B.", "B"),
    ("Answer is D because it is round", "D"),  # cut after "answer is", then a leading letter
    ("answer: option C is right", "C"),  # cut after "answer:", then after "option"
    ("a dog", "a dog"), ("apple", "apple"), ("", ""), ("!!", ""), ("I", "I"),
    ("the answer is b", "b"),
])
def test_english_answers_are_cleaned_up(response, answer):
    assert clean_answer(QUERY_EN, response) == answer


def test_other_languages_are_only_stripped():
    query = "<image>\nQ?\nA. x\nB. y\nResponda diretamente com a letra da opção das escolhas dadas."
    assert clean_answer(query, " A. x \n") == "A. x"
    # the Chinese instruction differs from the string the wrapper checks, so no clean-up either
    assert clean_answer("<image>\nQ\nA. x\n请直接用给定选项中的选项字母回答。", "A。") == "A。"
    # the string it checks does get the clean-up (only ASCII punctuation is stripped)
    assert clean_answer("<image>\nQ\n请直接回答选项字母。", "A. x") == "A"
    assert clean_answer("<image>\nQ\n请直接回答选项字母。", "A。") == "A。"
