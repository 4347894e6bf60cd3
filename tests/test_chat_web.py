"""`alignkit chat --web`: the blind comparison page in headless Chromium, with two tiny models.

The server runs in-process (the same Arena and HTTP handler `alignkit chat --web` serves), so the
test can see the hidden left/right assignment and check that the saved record reveals it right.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alignkit.preferences import load_preferences
from alignkit.models import build_tiny_model
from tests.argilla_fixture import argilla_server  # noqa: F401  (session fixture: a real local Argilla)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = Path(os.environ.get("ALIGNKIT_SCREENSHOTS", "")) if os.environ.get("ALIGNKIT_SCREENSHOTS") else None


@pytest.fixture(scope="module")
def arena_server(tiny_model, tmp_path_factory):
    import torch
    from alignkit.evals.chat import Bot, GenOptions
    from alignkit.evals.chat_web import Arena, start_server

    tmp = tmp_path_factory.mktemp("chatweb")
    other = build_tiny_model(tmp / "b", seed=1)
    torch.manual_seed(0)
    # Sampling (random tiny models answer mostly whitespace when greedy); 12 tokens keep it quick.
    arena = Arena(Bot.load(str(tiny_model)), Bot.load(str(other)), GenOptions(max_new_tokens=12, temperature=1.0),
                  out=tmp / "picks" / "preferences.jsonl", system="Be brief.")
    server = start_server(arena, port=0)
    yield arena, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def ask(page, text: str) -> tuple[str, str]:
    page.fill("#message", text)
    page.click("#send")
    page.wait_for_selector("#pick-a:not([disabled])")
    return page.inner_text("#answer-a"), page.inner_text("#answer-b")


def test_pick_is_saved_as_preference_record(arena_server, page):
    arena, url = arena_server
    page.goto(url)
    page.wait_for_function("document.getElementById('saved').textContent === '0 picks saved'")  # /api/state loaded
    assert page.input_value("#system") == "Be brief."

    answer_a, answer_b = ask(page, "What is the capital of France?")
    assert len(arena.conversations) == 1
    conv = next(iter(arena.conversations.values()))
    assert page.is_disabled("#send") and page.is_disabled("#system")  # pick before going on
    assert "What is the capital of France?" in page.inner_text("#history")
    if SCREENSHOT_DIR:
        page.screenshot(path=str(SCREENSHOT_DIR / "chat_web_answers.png"), full_page=True)

    page.click("#pick-a")
    page.wait_for_function("document.getElementById('saved').textContent === '1 pick saved'")
    assert "Saved: A is better" in page.inner_text("#status")

    lines = arena.out.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    for key in ("prompt", "chosen", "rejected", "model_chosen", "model_rejected", "choice", "timestamp", "session_id"):
        assert key in rec, key
    assert rec["choice"] == "A" and rec["session_id"] == conv["id"]
    assert rec["prompt"] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is the capital of France?"}]
    shown = lambda s: s if s.strip() else "(empty answer)"  # noqa: E731
    assert shown(rec["chosen"][0]["content"]) == answer_a and shown(rec["rejected"][0]["content"]) == answer_b
    assert rec["model_chosen"] == conv["sides"]["A"] and rec["model_rejected"] == conv["sides"]["B"]
    assert {rec["model_chosen"], rec["model_rejected"]} == set(arena.bots)
    # The page never learns which model is which.
    assert rec["model_chosen"] not in page.content() and rec["model_rejected"] not in page.content()

    # The conversation goes on with the chosen answer: it shows, and the next prompt includes it.
    assert page.inner_text("#history").count("What is the capital of France?") == 1
    ask(page, "And of Italy?")
    if SCREENSHOT_DIR:
        page.screenshot(path=str(SCREENSHOT_DIR / "chat_web_turn2.png"), full_page=True)
    assert arena.conversations[conv["id"]]["pending"]["prompt"][1:] == [
        {"role": "user", "content": "What is the capital of France?"}, rec["chosen"][0],
        {"role": "user", "content": "And of Italy?"}]
    page.click("#pick-tie")
    page.wait_for_function("document.getElementById('saved').textContent === '2 picks saved'")
    ties = [json.loads(x) for x in (arena.out.parent / "preferences.ties.jsonl").read_text().splitlines()]
    assert [t["choice"] for t in ties] == ["tie"] and "chosen" not in ties[0]
    assert len(arena.out.read_text().splitlines()) == 1  # ties are not pairs

    data = load_preferences(arena.out, on_bad_pair="error")
    assert len(data.pairs) == 1
    assert data.pairs[0]["prompt"] == rec["prompt"] and data.pairs[0]["chosen"] == rec["chosen"]

    # New conversation: history cleared, system prompt editable again.
    page.click("#reset")
    page.wait_for_function("document.getElementById('history').children.length === 0")
    assert not page.is_disabled("#system")


def test_push_picks_to_argilla(argilla_server):  # noqa: F811  (fixture from tests.argilla_fixture)
    import argilla as rg
    from alignkit.annotation.picks import push_picks_to_argilla

    prompt = [{"role": "user", "content": "Name a colour."}]
    picks = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Seven."}], "model_chosen": "m1", "model_rejected": "m2",
         "choice": "A", "response_a": "Blue.", "response_b": "Seven.", "model_a": "m1", "model_b": "m2",
         "timestamp": "2025-01-01T00:00:00+00:00", "session_id": "s1"},
        {"prompt": prompt, "choice": "tie", "response_a": "Red.", "response_b": "Green.", "model_a": "m2",
         "model_b": "m1", "timestamp": "2025-01-01T00:00:01+00:00", "session_id": "s2"},
    ]
    client = rg.Argilla(api_url=argilla_server.url, api_key=argilla_server.api_key)
    assert push_picks_to_argilla(picks, "chat-picks-test", "chat-test", client=client) == 2
    assert push_picks_to_argilla(picks, "chat-picks-test", "chat-test", client=client) == 2  # again: no duplicates
    ds = client.datasets("chat-picks-test", workspace="chat-test")
    records = {r.fields["response_1"]: r for r in ds.records(with_suggestions=True)}
    assert set(records) == {"Blue.", "Red."}
    blue = records["Blue."]
    assert blue.fields["response_2"] == "Seven." and blue.metadata["model_a"] == "m1"
    assert blue.suggestions["preference"].value == "response_1"
    assert records["Red."].metadata["choice"] == "tie" and not list(records["Red."].suggestions)


def test_page_reports_the_argilla_push_of_each_pick(arena_server, page, argilla_server, monkeypatch, tmp_path):  # noqa: F811
    """--push-to-argilla's wiring (alignkit.loop.chat): each pick is pushed as it is saved, and the
    page says so; a push that fails is reported on the page while the pick stays saved."""
    import argilla as rg
    from alignkit.evals.chat_web import Arena, start_server
    from alignkit.loop.chat import argilla_push

    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    bots = list(arena_server[0].bots.values())
    push = argilla_push("chat-web-push-test", "chat-test")
    calls = []

    def on_pick(record):
        calls.append(record)
        if len(calls) == 2:
            raise RuntimeError("server down")
        return push(record)

    arena = Arena(*bots, arena_server[0].opts, out=tmp_path / "preferences.jsonl", on_pick=on_pick)
    server = start_server(arena, port=0)
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        page.wait_for_function("document.getElementById('saved').textContent === '0 picks saved'")
        ask(page, "Name a colour.")
        page.click("#pick-b")
        page.wait_for_function("document.getElementById('saved').textContent === '1 pick saved'")
        assert "Saved: B is better (Argilla: pushed)." in page.inner_text("#status")
        ask(page, "Another one?")
        page.click("#pick-a")
        page.wait_for_function("document.getElementById('saved').textContent === '2 picks saved'")
        assert "(Argilla: push failed: RuntimeError: server down)" in page.inner_text("#status")
    finally:
        server.shutdown()
        server.server_close()
    assert len(arena.out.read_text().splitlines()) == 2  # both saved, the failed push included
    client = rg.Argilla(api_url=argilla_server.url, api_key=argilla_server.api_key)
    records = list(client.datasets("chat-web-push-test", workspace="chat-test").records(with_suggestions=True))
    assert len(records) == 1 and records[0].metadata["session_id"] == calls[0]["session_id"]
    assert records[0].suggestions["preference"].value == "response_2"
