"""`alignkit chat` in the terminal, driven through a pseudo-terminal (pexpect) like a person would."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from alignkit.models import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "you> "


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "alignkit.cli", "chat", *args], cwd=str(ROOT), encoding="utf-8",
                          codec_errors="replace", timeout=90, dimensions=(50, 200),
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    child.expect_exact(PROMPT)
    return child


def turn(child: pexpect.spawn, text: str, label: str = "bot") -> str:
    """Send a message; return the streamed answer shown after `label> `."""
    child.sendline(text)
    child.expect_exact(f"{label}> ")
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").strip()


def command(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n")


@pytest.fixture(scope="module")
def second_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("chat") / "b", seed=1)


def test_multi_turn_history_reset_and_commands(tiny_model):
    child = spawn("--model", str(tiny_model), "--max-new-tokens", "8", "--seed", "0")
    first = turn(child, "hello there")
    second = turn(child, "and a second question")
    assert first and second  # the sampled random model always says something in 8 tokens

    assert "history: 4 messages" in command(child, "/history")
    # The second turn's prompt carried the first exchange, through the chat template.
    prompt = command(child, "/prompt")
    assert prompt.count("<|im_start|>user") == 2 and prompt.count("<|im_start|>assistant") == 2
    assert prompt.index("hello there") < prompt.index("and a second question")
    assert first.splitlines()[0][:4] in prompt

    assert "conversation reset" in command(child, "/reset")
    assert "history: 0 messages" in command(child, "/history")
    assert "system prompt set" in command(child, "/system Answer in one word.")
    turn(child, "hi")
    prompt = command(child, "/prompt")
    assert "<|im_start|>system\nAnswer in one word." in prompt and "hello there" not in prompt
    assert "/reset" in command(child, "/help")
    assert "unknown command" in command(child, "/nope")

    child.sendeof()  # Ctrl-D leaves cleanly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_compare_answers_a_and_b(tiny_model, second_model):
    child = spawn("--model", str(tiny_model), "--compare", str(second_model), "--max-new-tokens", "6", "--seed", "0")
    child.sendline("hello")
    child.expect_exact("A> ")
    child.expect_exact("B> ")
    answer_a = child.before.replace("\r\n", "\n").strip()
    child.expect_exact(PROMPT)
    answer_b = child.before.replace("\r\n", "\n").strip()
    assert answer_a and answer_b
    assert "history: A 2 messages, B 2 messages" in command(child, "/history")
    prompts = command(child, "/prompt")
    assert "--- A ---" in prompts and "--- B ---" in prompts
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_web_flag_serves_the_page_and_stops_on_ctrl_c(tiny_model, second_model, tmp_path):
    import json
    import urllib.request

    # A terminal delivers Ctrl-C; a test suite started in the background (`.ci/run &`) inherits an
    # ignored SIGINT, which Python then keeps ignoring: give the child a terminal's default.
    child = pexpect.spawn(sys.executable, ["-m", "alignkit.cli", "chat", "--model", str(tiny_model), "--compare",
                                           str(second_model), "--web", "--port", "0", "--out", str(tmp_path / "p.jsonl")],
                          cwd=str(ROOT), encoding="utf-8", timeout=90,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(r"open (http://127\.0\.0\.1:\d+/)")
    url = child.match.group(1)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    assert "A is better" in opener.open(url, timeout=10).read().decode()
    assert json.loads(opener.open(url + "api/state", timeout=10).read()) == {"saved": {"pairs": 0, "ties": 0}, "system": ""}
    child.sendintr()
    child.expect("saved 0 pairs")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_web_needs_two_models(tiny_model, capsys):
    from alignkit.cli import main

    assert main(["chat", "--model", str(tiny_model), "--web"]) == 2  # refused before loading anything
    assert "--compare" in capsys.readouterr().err
