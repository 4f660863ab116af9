"""The LLM judge path against a local stub of an OpenAI-compatible server: VLMEvalKit's prompt, 3 tries,
then a seeded random choice; an endpoint that does not answer fails before anything is scored."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from eval_helpers import mcq_rows, write_tsv

from conftest import assert_clean_failure, run_parrot
from parrot.errors import ParrotError
from parrot.eval import LLMJudge, evaluate
from parrot.eval.judge import judge_prompt
from parrot.eval.sources import DataSource


class Stub:
    """Serves /v1/chat/completions; `reply(prompt)` gives the content (None: HTTP 500)."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, self.headers.get("Authorization"), body))
                content = stub.reply(body["messages"][0]["content"])
                if content is None:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def prompts(self):
        return [body["messages"][0]["content"] for _, _, body in self.requests]


@pytest.fixture
def stub():
    servers = []

    def make(reply):
        servers.append(Stub(reply))
        return servers[-1]

    yield make
    for s in servers:
        s.server.shutdown()


def test_prompt_is_vlmevalkits():
    p = judge_prompt("What colour", {"A": "red", "B": "green"}, "the red one")
    assert p.startswith("You are an AI assistant who will help me to match an answer with several options")
    assert p.endswith("Example 3: \nQuestion: What colour?\nOptions: There are several options: \nA. red\nB. green\n"
                      "\nAnswer: the red one\nYour output: ")
    cn = judge_prompt("什么颜色", {"A": "红"}, "红的")
    assert cn.startswith("你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。")
    assert cn.endswith("问题: 什么颜色?\n选项: There are several options: \nA. 红\n\n答案: 红的\n输出: ")


def test_unmatched_predictions_are_judged(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("PARROT_JUDGE_API_KEY", "sk-test")
    server = stub(lambda prompt: "hi" if prompt == "hello" else "The closest is B.")
    rows = mcq_rows(3)
    data = write_tsv(tmp_path / "MMMB_en.tsv", rows)
    preds = write_tsv(tmp_path / "p.tsv", [{"index": 0, "prediction": "A"}, {"index": 1, "prediction": "a couple"},
                                           {"index": 2, "prediction": "dunno"}])
    judge = LLMJudge(server.url, "judge-model")
    judge.check()
    s = evaluate([DataSource("MMMB_en", data)], tmp_path / "out", predictions=[preds], judge=judge, echo=print)
    entry = s["datasets"]["MMMB_en"]
    # row 0 matched by the rules (no request); rows 1 (answer B) and 2 (answer A) judged "B"
    assert entry["matched_by"] == {"rule": 1, "judge": 2, "random": 0, "none": 0}
    assert entry["overall"] == pytest.approx(2 / 3)
    path, auth, body = server.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert server.prompts()[1:] == [judge_prompt(rows[1]["question"], {"A": "one", "B": "two", "C": "three"},
                                                 "a couple"),
                                    judge_prompt(rows[2]["question"], {"A": "day", "B": "night"}, "dunno")]


def test_three_unusable_replies_then_a_seeded_random_choice(stub):
    server = stub(lambda prompt: "I cannot say")
    choices = {"A": "red", "B": "green"}
    picks = [LLMJudge(server.url, "m", seed=s).choose("Q", choices, "hmm", "7") for s in range(6)]
    assert len(server.requests) == 18  # 3 tries each
    assert all(how == "random" for _, how in picks)
    assert {opt for opt, _ in picks} <= {"A", "B", "Z"}
    again = [LLMJudge(server.url, "m", seed=s).choose("Q", choices, "hmm", "7")[0] for s in range(6)]
    assert again == [opt for opt, _ in picks]  # reproducible
    failing = stub(lambda prompt: None)
    opt, how = LLMJudge(failing.url, "m").choose("Q", choices, "hmm", "1")
    assert how == "random" and len(failing.requests) == 3


def test_judge_that_does_not_answer_fails_cleanly(tmp_path, stub):
    server = stub(lambda prompt: None)
    with pytest.raises(ParrotError, match="does not answer .*HTTP 500"):
        LLMJudge(server.url, "m").check()
    data = write_tsv(tmp_path / "MMMB_en.tsv", mcq_rows(2))
    preds = write_tsv(tmp_path / "p.tsv", [{"index": 0, "prediction": "A"}])
    p = run_parrot("eval", data, "--predictions", preds, "-o", tmp_path / "out", "--judge-url", server.url,
                   "--judge-model", "m")
    assert_clean_failure(p, "does not answer")
    assert not (tmp_path / "out").exists()
    assert_clean_failure(run_parrot("eval", data, "--predictions", preds, "-o", tmp_path / "o", "--judge-url",
                                    server.url), "--judge-url and --judge-model go together")
