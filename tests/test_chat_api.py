"""`alignkit chat --serve`: the OpenAI-compatible endpoint, driven by the real `openai` client (and
plain HTTP where a client would not send such a request), on tiny models."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request

import openai
import pexpect
import pytest

from alignkit.evals.chat import Bot, GenOptions
from alignkit.evals.chat_api import ChatAPI, start_api_server
from alignkit.models import build_tiny_model
from alignkit.preferences import load_preferences
from tests.test_chat import ROOT

# sampled (a random tiny model's greedy answers are often empty); requests pass a seed where they must repeat
SAMPLED = GenOptions(max_new_tokens=8, temperature=1.0, top_p=1.0)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """Two different tiny models, loaded once."""
    other = build_tiny_model(tmp_path_factory.mktemp("api") / "b", seed=1)
    return Bot.load(str(tiny_model)), Bot.load(str(other))


@pytest.fixture
def server(models, tmp_path):
    """(api, base url): both models served on a free port, feedback into tmp_path."""
    api = ChatAPI(list(models), SAMPLED, tmp_path / "preferences.jsonl")
    srv = start_api_server(api)
    yield api, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with NO_PROXY.open(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_completion_and_stream_agree(server, models):
    api, url = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == [b.name for b in models]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    done = c.chat.completions.create(model=models[0].name, messages=messages, seed=0)
    assert done.object == "chat.completion" and done.model == models[0].name and done.id.startswith("chatcmpl-")
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason in ("stop", "length")
    from alignkit.generation import encode_prompt

    assert done.usage.prompt_tokens == len(encode_prompt(models[0].tokenizer, messages))
    assert 1 <= done.usage.completion_tokens <= SAMPLED.max_new_tokens
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    # Streamed: the role first, then the text in pieces, the same finish reason, usage on request; the same seed, the same text.
    chunks = list(c.chat.completions.create(model=models[0].name, messages=messages, stream=True, seed=0,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens and len({ch.id for ch in chunks}) == 1

    # Request options reach generation: a one-token cap ends on length; the other model answers differently.
    short = c.chat.completions.create(model=models[0].name, messages=messages, max_tokens=1, seed=0)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"
    other = c.chat.completions.create(model=models[1].name, messages=messages, seed=0)
    assert other.model == models[1].name and other.choices[0].message.content != choice.message.content


def test_concurrent_conversations_keep_their_own_context(server, models):
    """Two clients, each with its own multi-turn history, at once: every answer is the one its own
    conversation gets alone (same seeds), and counts exactly its own context's tokens."""
    _, url = server
    c = client(url)
    name = models[0].name
    starts = {"a": "Tell me about the sea.", "b": "List three colours, please, in order."}

    def converse(first: str, turns: int = 3) -> list[tuple[str, int]]:
        messages, out = [{"role": "user", "content": first}], []
        for i in range(turns):
            stream = i % 2 == 1
            if stream:
                text = "".join(ch.choices[0].delta.content or "" for ch in
                               c.chat.completions.create(model=name, messages=messages, stream=True, seed=i)
                               if ch.choices)
                tokens = None
            else:
                r = c.chat.completions.create(model=name, messages=messages, seed=i)
                text, tokens = r.choices[0].message.content, r.usage.prompt_tokens
            out.append((text, tokens))
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"and then? ({i})"}]
        return out

    alone = {k: converse(v) for k, v in starts.items()}
    assert alone["a"] != alone["b"]
    together, errors = {}, []

    def run(k):
        try:
            together[k] = converse(starts[k])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and together == alone


def test_bad_requests_get_openai_shaped_errors(server, models):
    _, url = server
    c = client(url)
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=ok)
    assert e.value.code == "model_not_found" and models[0].name in e.value.message
    for kwargs, param in [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
                          ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
                          ({"messages": ok, "n": 2}, "n"), ({"messages": ok, "temperature": 5}, "temperature"),
                          ({"messages": ok, "max_tokens": 0}, "max_tokens"),
                          ({"messages": ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=models[0].name, **kwargs)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error", kwargs
    # What the client library would not send: broken JSON, a body that is not an object, an unknown path.
    status, body = post(url + "/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert post(url + "/chat/completions", b"[1, 2]")[0] == 400
    status, body = post(url + "/completions", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"
    # And the server still answers.
    assert c.chat.completions.create(model=models[0].name, messages=ok).choices[0].message.content


def test_a_key_is_required_when_set(models, tmp_path):
    api = ChatAPI(list(models), SAMPLED, tmp_path / "p.jsonl", api_key="s3cret-key")
    srv = start_api_server(api)
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, "wrong").models.list()
        assert e.value.code == "invalid_api_key" and "s3cret" not in e.value.message
        assert len(client(url, "s3cret-key").models.list().data) == 2
    finally:
        srv.shutdown()


def test_thumbs_become_preference_data(server, models):
    """Two answers to one conversation (a "regenerate"), one thumbed up, one down: two thumbs
    records and one pair, which the reward and DPO stages' reader loads."""
    api, url = server
    c = client(url)
    messages = [{"role": "user", "content": "Write a word."}]
    answers = [c.chat.completions.create(model=models[0].name, messages=messages, temperature=1.0, seed=s,
                                         max_tokens=8) for s in range(6)]
    first, second = next((a, b) for a in answers for b in answers
                         if a.choices[0].message.content != b.choices[0].message.content)
    thumb = f"{url}/feedback"
    assert post(thumb, json.dumps({"id": first.id, "rating": "up"}).encode()) == (200, {"saved": {"thumbs": 1, "pairs": 0}, "pair": False})
    assert not api.out.exists()  # one thumb is no pair
    assert post(thumb, json.dumps({"id": second.id, "rating": "down"}).encode())[1]["pair"] is True
    thumbs = [json.loads(line) for line in api.thumbs_path.read_text().splitlines()]
    assert [t["label"] for t in thumbs] == [True, False] and thumbs[0]["prompt"] == messages
    assert thumbs[1]["completion"] == [{"role": "assistant", "content": second.choices[0].message.content}]
    pairs = load_preferences(api.out).pairs
    assert len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == first.choices[0].message.content
    assert pairs[0]["rejected"][0]["content"] == second.choices[0].message.content

    # A streamed answer's id takes a thumb too; unknown ids and ratings are refused.
    streamed = list(c.chat.completions.create(model=models[0].name, messages=messages, stream=True))
    assert post(thumb, json.dumps({"id": streamed[0].id, "rating": "up"}).encode())[0] == 200
    status, body = post(thumb, json.dumps({"id": "chatcmpl-nope", "rating": "up"}).encode())
    assert status == 404 and body["error"]["code"] == "completion_not_found"
    assert post(thumb, json.dumps({"id": first.id, "rating": "meh"}).encode())[0] == 400


def test_serve_flag_answers_and_stops_on_ctrl_c(tiny_model, tmp_path):
    env = {**os.environ, "ALIGNKIT_CHAT_API_KEY": "k-123", "HF_HUB_OFFLINE": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "alignkit.cli", "chat", "--model", str(tiny_model), "--serve",
                                           "--port", "0", "--max-new-tokens", "4", "--out", str(tmp_path / "p.jsonl")],
                          cwd=str(ROOT), encoding="utf-8", timeout=90, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # see test_chat.py
    child.expect(r"API at (http://127\.0\.0\.1:\d+/v1)")
    url = child.match.group(1)
    reply = client(url, "k-123").chat.completions.create(model=str(tiny_model), messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens <= 4
    child.sendintr()
    child.expect("saved 0 thumbs and 0 pairs")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "k-123" not in child.before
