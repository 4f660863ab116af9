"""The optional LLM judge for predictions the rules cannot match, as VLMEvalKit runs it.

Written from a reading of `vlmeval/dataset/utils/multiple_choice.py` (`build_prompt`,
`build_prompt_cn`, `extract_answer_from_item`) and `vlmeval/smp/vlm.py` (`build_option_str`) in
AIDC-AI/Parrot's vendored VLMEvalKit (commit 989d6d0; upstream open-compass/VLMEvalKit keeps the same
prompts), and of its OpenAI wrapper (`vlmeval/api/gpt.py`: temperature 0, max_tokens 1024, the
answer is the first choice's message content, stripped):

- the prompt quotes the question (Chinese template when the question holds Chinese characters),
  "There are several options:" with one `L. text` line per option, and the prediction;
- up to 3 tries: each asks the judge and maps its reply with the same rules (`matching.py`); a
  reply that maps to an option (or Z) is the answer;
- after 3 failed tries, a random choice among the options and Z. VLMEvalKit draws it from Python's
  unseeded global generator; here it is seeded by `seed` and the row's index, so reruns agree.

Any OpenAI-compatible endpoint works (`--judge-url http://host:8000/v1`); the key, if one is
needed, is read from `PARROT_JUDGE_API_KEY` or `OPENAI_API_KEY`.
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from ..errors import ParrotError
from .matching import API_FAILURE, NO_ANSWER, match_option
from .prompt import has_chinese, is_missing

TRIES = 3
PROMPT_EN = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {}?\nOptions: {}\nAnswer: {}\nYour output: "
)
PROMPT_CN = (
    "你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。"
    "你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。"
    "如果所有选项的意义都与答案显著不同，则输出 Z。"
    "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。"
    "例 1:"
    "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n"
    "例 2: \n"
    "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n"
    "例 3: \n"
    "问题: {}?\n选项: {}\n答案: {}\n输出: "
)


def option_text(choices: Mapping[str, Any]) -> str:
    """VLMEvalKit's build_option_str."""
    return "There are several options: \n" + "".join(f"{k}. {v}\n" for k, v in choices.items() if not is_missing(v))


def judge_prompt(question: str, choices: Mapping[str, Any], prediction: str) -> str:
    template = PROMPT_CN if has_chinese(question) else PROMPT_EN
    return template.format(question, option_text(choices), prediction)


class LLMJudge:
    """An OpenAI-compatible chat endpoint used as VLMEvalKit's answer-matching judge."""

    def __init__(self, url: str, model: str, seed: int = 0, timeout: float = 60.0, api_key: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ParrotError(f"--judge-url {url!r}: expected an http(s) URL such as http://localhost:8000/v1")
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.seed, self.timeout = model, seed, timeout
        self.api_key = api_key or os.environ.get("PARROT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.calls = 0
        self.last_error: str | None = None

    def ask(self, prompt: str) -> str | None:
        """The judge's reply, or None when the request fails (the reason kept in `last_error`)."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": 1024, "n": 1}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.calls += 1
        try:
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read().decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("the message content is not text")
            return content.strip()
        except urllib.error.HTTPError as e:
            self.last_error = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:
            self.last_error = str(getattr(e, "reason", e))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            self.last_error = f"not an OpenAI chat completion reply ({type(e).__name__}: {e})"
        return None

    def check(self) -> None:
        """Fails with ParrotError unless the endpoint answers (VLMEvalKit's `working()`: 3 tries)."""
        for _ in range(TRIES):
            if self.ask("hello"):
                return
        raise ParrotError(f"--judge-url {self.url}: the judge does not answer ({self.last_error}); check the URL, "
                          "--judge-model and the API key (PARROT_JUDGE_API_KEY)")

    def choose(self, question: str, choices: Mapping[str, Any], prediction: str, key: str) -> tuple[str, str]:
        """(option letter or Z, "judge"), or after 3 unusable replies (a seeded random pick, "random")."""
        prompt = judge_prompt(question, choices, prediction)
        for _ in range(TRIES):
            reply = self.ask(prompt)
            if reply and API_FAILURE not in reply:
                opt = match_option(reply, choices)
                if opt:
                    return opt, "judge"
        pool = list(choices) + ([NO_ANSWER] if NO_ANSWER not in choices else [])
        return random.Random(f"{self.seed}:{key}").choice(pool), "random"
