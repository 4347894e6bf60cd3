"""``alignkit chat --web``: a blind side-by-side page that turns a tester's picks into preference data.

Two models answer every message. Which model is shown on the left (A) and which on the right (B)
is drawn at random for each conversation and never sent to the page; it is revealed only in the
saved records. After both answers arrive the tester picks one of "A is better", "B is better",
"Tie", "Both bad" before writing the next message:

- A or B: a preference pair is appended to ``--out`` (default ``runs/chat/preferences.jsonl``):
  ``{prompt, chosen, rejected, model_chosen, model_rejected, choice, timestamp, session_id, ...}``,
  TRL's conversational preference format, read as is by ``alignkit.data.load_preferences``. The
  conversation goes on with the chosen answer (both models see it as their previous turn, so every
  record's ``prompt`` is a conversation both answers really replied to).
- Tie / Both bad: no pair (it would teach nothing, or the wrong thing); the judgement goes to the
  sibling file ``<out stem>.ties.jsonl`` with both answers. After a tie the conversation goes on
  with answer A; after "both bad" the turn is dropped, so the tester can rephrase.

Every saved pick can also go elsewhere: ``Arena(..., on_pick=f)`` calls ``f(record)`` after saving
it and shows what it returns (or its error) on the page. ``alignkit chat --push-to-argilla DATASET``
(:mod:`alignkit.loop.chat`) passes one that pushes the pick to Argilla
(:func:`alignkit.annotation.picks.push_picks_to_argilla`).

Server: the standard library's ThreadingHTTPServer on 127.0.0.1; one generation runs at a time.
Endpoints (JSON in, JSON out): ``GET /`` the page, ``GET /api/state``, ``POST /api/chat``
``{conversation, message, system}``, ``POST /api/pick`` ``{conversation, choice}``,
``POST /api/reset`` ``{conversation}`` (forget it: the next message starts a new one, new assignment).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from alignkit.evals.chat import Bot, GenOptions, with_system

CHOICES = ("A", "B", "tie", "both_bad")


def ties_path(out: Path) -> Path:
    return out.with_name(out.stem + ".ties" + out.suffix)


class Arena:
    """Conversations, hidden left/right assignments, and the picks file."""

    def __init__(self, bot_1: Bot, bot_2: Bot, opts: GenOptions, out: str | Path, system: str | None = None,
                 on_pick: Callable[[dict], str | None] | None = None):
        self.bots = {bot_1.name: bot_1, bot_2.name: bot_2}
        if len(self.bots) < 2:  # the same model twice: still two independent samplers
            self.bots = {bot_1.name + " (1)": bot_1, bot_2.name + " (2)": bot_2}
        self.opts, self.out, self.system = opts, Path(out), system
        self.on_pick = on_pick  # where else a saved pick goes (the CLI's Argilla push)
        self.conversations: dict[str, dict] = {}
        self.generate_lock = threading.Lock()  # the models are shared: one generation at a time
        self.state_lock = threading.Lock()
        self.rng = random.SystemRandom()  # the assignment must not be guessable from a seed
        self.saved = {"pairs": 0, "ties": 0}

    def conversation(self, cid: str | None, system: str | None = None) -> dict:
        with self.state_lock:
            if cid in self.conversations:
                return self.conversations[cid]
            names = list(self.bots)
            self.rng.shuffle(names)
            conv = {"id": uuid.uuid4().hex[:12], "sides": {"A": names[0], "B": names[1]},
                    "system": (system if system is not None else self.system) or None,
                    "turns": [], "pending": None}
            self.conversations[conv["id"]] = conv
            return conv

    def chat(self, cid: str | None, message: str, system: str | None = None) -> dict:
        conv = self.conversation(cid, system)
        with self.generate_lock:
            if conv["pending"]:
                raise ValueError("pick the better answer first")
            prompt = with_system(conv["system"], conv["turns"] + [{"role": "user", "content": message}])
            answers = {side: self.bots[conv["sides"][side]].reply(prompt, self.opts) for side in "AB"}
            conv["pending"] = {"prompt": prompt, **answers}
        return {"conversation": conv["id"], "A": answers["A"], "B": answers["B"]}

    def pick(self, cid: str, choice: str) -> dict:
        """Save the pick of the conversation's last turn; returns the record (revealing the models)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        with self.state_lock:
            conv = self.conversations.get(cid)
            if conv is None or not conv["pending"]:
                raise ValueError("nothing to pick: send a message first")
            turn, sides = conv["pending"], conv["sides"]
            conv["pending"] = None
        record = {"prompt": turn["prompt"]}
        if choice in ("A", "B"):
            other = "B" if choice == "A" else "A"
            record.update(chosen=[{"role": "assistant", "content": turn[choice]}],
                          rejected=[{"role": "assistant", "content": turn[other]}],
                          model_chosen=sides[choice], model_rejected=sides[other])
        record.update(choice=choice, timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      session_id=conv["id"], response_a=turn["A"], response_b=turn["B"],
                      model_a=sides["A"], model_b=sides["B"],
                      generation={"max_new_tokens": self.opts.max_new_tokens, "temperature": self.opts.temperature,
                                  "top_p": self.opts.top_p})
        path = self.out if choice in ("A", "B") else ties_path(self.out)
        with self.state_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.saved["pairs" if choice in ("A", "B") else "ties"] += 1
        if choice != "both_bad":  # go on with the chosen answer (A after a tie); "both bad" drops the turn
            keep = turn["B"] if choice == "B" else turn["A"]
            conv["turns"] = turn["prompt"][1 if conv["system"] else 0:] + [{"role": "assistant", "content": keep}]
        return record

    def run_on_pick(self, record: dict) -> str | None:
        """``on_pick(record)``'s answer for the page, or its error: the pick is saved locally anyway."""
        if self.on_pick is None:
            return None
        try:
            return self.on_pick(record)
        except Exception as e:  # noqa: BLE001 - reported to the page and the terminal
            print(f"alignkit chat: Argilla push failed: {e}", file=sys.stderr, flush=True)
            return f"push failed: {type(e).__name__}: {e}"[:300]

    def history(self, cid: str | None) -> list[dict]:
        conv = self.conversations.get(cid)
        return conv["turns"] if conv else []


# --------------------------------------------------------------------------------------------
# HTTP


class JSONHandler(BaseHTTPRequestHandler):
    """Quiet request handler with JSON replies (this page's and ``--serve``'s API, chat_api.py)."""

    def log_message(self, fmt, *args):  # keep the terminal for the URL and errors
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")


def make_handler(arena: Arena):
    class Handler(JSONHandler):
        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/api/state":
                self._json({"saved": arena.saved, "system": arena.system or ""})
            else:
                self._json({"error": "not found"}, 404)

        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/api/chat":
                    message = str(body.get("message", "")).strip()
                    if not message:
                        raise ValueError("empty message")
                    self._json(arena.chat(body.get("conversation"), message, body.get("system")))
                elif self.path == "/api/pick":
                    rec = arena.pick(body.get("conversation"), body.get("choice"))
                    reply = {"saved": arena.saved, "history": arena.history(body.get("conversation"))}
                    outcome = arena.run_on_pick(rec)
                    if outcome is not None:  # the page shows it as "(Argilla: ...)"
                        reply["argilla"] = outcome
                    self._json(reply)
                elif self.path == "/api/reset":  # the next message starts a new conversation (new assignment)
                    arena.conversations.pop(body.get("conversation"), None)
                    self._json({"saved": arena.saved})
                else:
                    self._json({"error": "not found"}, 404)
            except ValueError as e:
                self._json({"error": str(e)}, 400)
            except Exception as e:
                self._json({"error": f"{type(e).__name__}: {e}"}, 500)

    return Handler


def http_server(handler, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A threading server for ``handler`` (not serving yet); ``server.server_address[1]`` is the port."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def start_http_server(handler, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``handler`` in a daemon thread (tests)."""
    server = http_server(handler, port, host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_until_interrupted(server: ThreadingHTTPServer) -> None:
    """Serve in this thread until Ctrl-C."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def start_server(arena: Arena, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``arena`` in a daemon thread; ``server.server_address[1]`` is the port."""
    return start_http_server(make_handler(arena), port, host)


def serve(bot_1: Bot, bot_2: Bot, opts: GenOptions, out: str, port: int = 8765, system: str | None = None,
          on_pick: Callable[[dict], str | None] | None = None) -> int:
    arena = Arena(bot_1, bot_2, opts, out, system, on_pick)
    server = http_server(make_handler(arena), port)
    print(f"alignkit chat: open http://127.0.0.1:{server.server_address[1]}/  (picks -> {out}; Ctrl-C stops)", flush=True)
    serve_until_interrupted(server)
    print(f"alignkit chat: saved {arena.saved['pairs']} pairs and {arena.saved['ties']} ties/both-bad this session")
    return 0


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>alignkit chat: blind comparison</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; --accent:#0969da; --good:#1a7f37; --bad:#cf222e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
header { background:#fff; border-bottom:1px solid var(--line); padding:12px 24px; display:flex; align-items:center; gap:16px; }
header h1 { font-size:18px; margin:0; }
header .sub { color:var(--muted); font-size:13px; }
#saved { margin-left:auto; font-size:14px; background:#ddf4ff; color:#0550ae; padding:4px 10px; border-radius:12px; }
main { max-width:1100px; margin:0 auto; padding:16px 24px 40px; }
label { font-weight:600; font-size:13px; color:var(--muted); display:block; margin-bottom:4px; }
textarea, input[type=text] { width:100%; font:inherit; padding:8px 10px; border:1px solid var(--line); border-radius:6px; background:#fff; }
textarea:disabled, input:disabled { background:#eef1f4; color:var(--muted); }
.row { display:flex; gap:8px; align-items:flex-end; }
.row textarea { flex:1; }
button { font:inherit; padding:8px 14px; border:1px solid var(--line); border-radius:6px; background:#fff; cursor:pointer; }
button:hover:not(:disabled) { border-color:var(--accent); }
button:disabled { opacity:.45; cursor:default; }
button.primary { background:var(--accent); color:#fff; border-color:var(--accent); }
#history { margin:16px 0; }
.msg { background:#fff; border:1px solid var(--line); border-radius:8px; padding:8px 12px; margin:6px 0; white-space:pre-wrap; }
.msg .who { font-size:12px; font-weight:600; color:var(--muted); display:block; }
.msg.user { background:#fff8c5; border-color:#eed888; }
.cols { display:grid; grid-template-columns:1fr 1fr; gap:16px; margin:12px 0; }
.col { background:#fff; border:1px solid var(--line); border-radius:8px; min-height:120px; display:flex; flex-direction:column; }
.col h2 { font-size:14px; margin:0; padding:8px 12px; border-bottom:1px solid var(--line); background:#f6f8fa; border-radius:8px 8px 0 0; }
.answer { padding:10px 12px; white-space:pre-wrap; overflow-wrap:anywhere; flex:1; }
.answer.wait { color:var(--muted); font-style:italic; }
.picks { display:flex; gap:8px; justify-content:center; flex-wrap:wrap; margin:8px 0 4px; }
.picks button.a, .picks button.b { border-color:var(--good); color:var(--good); font-weight:600; }
.picks button.bad { border-color:var(--bad); color:var(--bad); }
#status { text-align:center; color:var(--muted); min-height:1.5em; font-size:14px; }
.sys { margin-bottom:12px; }
</style></head>
<body>
<header><h1>alignkit chat</h1><span class="sub">two anonymous models answer; pick the better answer</span>
<span id="saved">...</span></header>
<main>
<div class="sys"><label for="system">System prompt (applies from the next conversation start)</label>
<input type="text" id="system" placeholder="optional, e.g. You are a concise assistant."></div>
<div id="history"></div>
<div class="cols">
  <div class="col"><h2>Model A</h2><div class="answer wait" id="answer-a">Answers appear here.</div></div>
  <div class="col"><h2>Model B</h2><div class="answer wait" id="answer-b">Answers appear here.</div></div>
</div>
<div class="picks">
  <button class="a" id="pick-a" disabled>A is better</button>
  <button class="b" id="pick-b" disabled>B is better</button>
  <button id="pick-tie" disabled>Tie</button>
  <button class="bad" id="pick-bad" disabled>Both bad</button>
</div>
<div id="status">Write a message to start.</div>
<label for="message">Your message</label>
<div class="row"><textarea id="message" rows="3" placeholder="Ask something... (Enter sends, Shift+Enter for a new line)"></textarea>
<div style="display:flex;flex-direction:column;gap:6px"><button class="primary" id="send">Send</button>
<button id="reset" title="new conversation, new hidden assignment">New conversation</button></div></div>
</main>
<script>
const $ = (id) => document.getElementById(id);
let conversation = null, pending = false, busy = false, turns = [];

async function api(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {})});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function showSaved(s) {
  const n = s.pairs + s.ties;
  $("saved").textContent = n + (n === 1 ? " pick" : " picks") + " saved";
}
function setAnswers(a, b, wait) {
  for (const [el, text] of [[$("answer-a"), a], [$("answer-b"), b]]) {
    el.textContent = text === "" ? "(empty answer)" : text;
    el.classList.toggle("wait", !!wait);
  }
}
function render(turns) {
  const h = $("history"); h.innerHTML = "";
  for (const m of turns) {
    const d = document.createElement("div"); d.className = "msg " + m.role;
    const w = document.createElement("span"); w.className = "who"; w.textContent = m.role === "user" ? "You" : "Answer kept";
    d.appendChild(w); d.appendChild(document.createTextNode(m.content)); h.appendChild(d);
  }
}
function update() {
  for (const id of ["pick-a", "pick-b", "pick-tie", "pick-bad"]) $(id).disabled = !pending || busy;
  $("send").disabled = pending || busy;
  $("message").disabled = pending || busy;
  $("system").disabled = conversation !== null;
}
async function send() {
  const message = $("message").value.trim();
  if (!message || pending || busy) return;
  busy = true; update();
  render(turns.concat([{role: "user", content: message}])); $("message").value = "";
  setAnswers("thinking...", "thinking...", true);
  $("status").textContent = "Both models are answering...";
  try {
    const r = await api("/api/chat", {conversation, message, system: $("system").value});
    conversation = r.conversation; pending = true;
    setAnswers(r.A, r.B, false);
    $("status").textContent = "Which answer is better?";
  } catch (e) { $("status").textContent = "Error: " + e.message; render(turns); $("message").value = message; setAnswers("", "", true); }
  busy = false; update();
}
async function pick(choice) {
  busy = true; update();
  try {
    const r = await api("/api/pick", {conversation, choice});
    pending = false; showSaved(r.saved); turns = r.history; render(turns);
    const said = {A: "A is better", B: "B is better", tie: "Tie", both_bad: "Both bad"}[choice];
    $("status").textContent = "Saved: " + said + (r.argilla ? " (Argilla: " + r.argilla + ")" : "") + ". Write your next message.";
    setAnswers("Answers appear here.", "Answers appear here.", true);
  } catch (e) { $("status").textContent = "Error: " + e.message; }
  busy = false; update(); $("message").focus();
}
async function reset() {
  const r = await api("/api/reset", {conversation});
  conversation = null; pending = false; turns = []; render(turns); showSaved(r.saved);
  setAnswers("Answers appear here.", "Answers appear here.", true);
  $("status").textContent = "New conversation: the models were shuffled again. Write a message to start.";
  update();
}
$("send").onclick = send;
$("reset").onclick = reset;
$("pick-a").onclick = () => pick("A");
$("pick-b").onclick = () => pick("B");
$("pick-tie").onclick = () => pick("tie");
$("pick-bad").onclick = () => pick("both_bad");
$("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
fetch("/api/state").then((r) => r.json()).then((s) => { showSaved(s.saved); if (s.system) $("system").value = s.system; update(); });
</script>
</body></html>
"""
