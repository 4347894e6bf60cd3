"""``alignkit chat --serve``: an OpenAI-compatible chat endpoint for one or two models.

A team points the chat tools it already uses (the ``openai`` client, Open WebUI, curl) at
``http://HOST:PORT/v1`` instead of sitting at this machine's terminal or arena page:

- ``GET /v1/models``: the served models; their ids are the ``--model`` / ``--compare`` arguments.
- ``POST /v1/chat/completions``: ``{model, messages, stream?, max_tokens? (or
  max_completion_tokens), temperature?, top_p?, seed?, n? (1 only), stream_options?}``; the answer
  (or its ``chat.completion.chunk`` events, ending with ``data: [DONE]``) in OpenAI's shapes, usage
  included. Other OpenAI fields are accepted and ignored, except the ones that would change the
  answer's meaning (``tools``, ``response_format``, ``logprobs``, ``n`` > 1): those are refused.
- ``POST /v1/feedback``: alignkit's own, ``{id, rating: "up"|"down"}`` for a completion this
  server returned (the last 1,000 are remembered). Each thumb is appended to ``<out stem>.thumbs.jsonl``
  as TRL's unpaired preference record ``{prompt, completion, label}`` (KTO reads it); when the same
  conversation has a thumbed-up and a thumbed-down answer (a "regenerate" in a chat UI), the pair is
  also appended to ``--out`` as ``{prompt, chosen, rejected, ...}``, the format reward and DPO read.

Context: as with OpenAI's API, every request carries its whole conversation in ``messages`` and
the server keeps none between requests, so each client keeps its own context and no two
conversations can see each other's. The models are shared, so one answer is generated at a time;
requests queue. Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with
400 (bad request), 401 (key), 404 (unknown model or path) or 500.

With ``ALIGNKIT_CHAT_API_KEY`` set, every request must send ``Authorization: Bearer <key>``
(the key is read from the environment, never from the command line, so it stays out of ``ps``).
"""

from __future__ import annotations

import collections
import datetime as _dt
import hmac
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

from alignkit.evals.chat import Bot, GenOptions
from alignkit.evals.chat_web import JSONHandler, http_server, serve_until_interrupted, start_http_server

ROLES = ("system", "user", "assistant")
REFUSED = ("tools", "functions", "response_format", "logprobs", "top_logprobs")  # they change what an answer is
REMEMBERED = 1000  # completions a thumb can still refer to
API_KEY_ENV = "ALIGNKIT_CHAT_API_KEY"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def parse_messages(messages) -> list[dict]:
    """OpenAI's messages (content a string or a list of text parts) -> ``[{role, content}]``."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{where}: role must be one of {', '.join(ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": m["role"], "content": content})
    return out


def number(body: dict, key: str, low: float, high: float, default, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'} from {low} to {high}, "
                            f"not {value!r}", key)
    return value


class ChatAPI:
    """The served models, the completions a thumb may refer to, and the feedback files."""

    def __init__(self, bots: list[Bot], opts: GenOptions, out: str | Path, api_key: str | None = None):
        self.bots = {b.name: b for b in bots}
        self.opts, self.out, self.api_key = opts, Path(out), api_key
        self.created = int(time.time())
        self.generate_lock = threading.Lock()  # the models are shared: one answer at a time
        self.state_lock = threading.Lock()
        self.served: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.saved = {"thumbs": 0, "pairs": 0}

    @property
    def thumbs_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".thumbs" + self.out.suffix)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "alignkit"} for name in self.bots]}

    def request(self, body) -> tuple[Bot, list[dict], GenOptions, int | None]:
        """Check a chat completion request: the model, its messages, its generation options."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        refused = [key for key in REFUSED if body.get(key)]
        if refused:
            raise APIError(400, f"'{refused[0]}' is not supported by this server", refused[0], "unsupported_parameter")
        if number(body, "n", 1, 1, 1, integer=True) != 1:
            raise APIError(400, "'n' must be 1", "n")
        name = body.get("model")
        if name not in self.bots:
            raise APIError(404, f"The model '{name}' does not exist here; served: {', '.join(self.bots)}", "model",
                           "model_not_found")
        messages = parse_messages(body.get("messages"))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        opts = GenOptions(
            max_new_tokens=number({"max_tokens": limit}, "max_tokens", 1, 1 << 20, self.opts.max_new_tokens, integer=True),
            temperature=number(body, "temperature", 0, 2, self.opts.temperature),
            top_p=number(body, "top_p", 0, 1, self.opts.top_p))
        if opts.top_p == 0:
            raise APIError(400, "'top_p' must be above 0", "top_p")
        seed = number(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True)
        return self.bots[name], messages, opts, seed

    def complete(self, bot: Bot, messages: list[dict], opts: GenOptions, seed: int | None, on_text=None,
                 cid: str | None = None) -> dict:
        """Generate one answer (streamed through ``on_text`` when given); remember it, as ``cid``, for feedback."""
        with self.generate_lock:
            if seed is not None:
                torch.manual_seed(seed)
            text = bot.reply(messages, opts, on_text=on_text)
            usage = dict(bot.last_usage)
        finish = usage.pop("finish_reason")
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        cid = cid or new_id()
        with self.state_lock:
            self.served[cid] = {"prompt": messages, "text": text, "model": bot.name, "rating": None}
            while len(self.served) > REMEMBERED:
                self.served.popitem(last=False)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": bot.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage}

    def feedback(self, body) -> dict:
        """A thumb on a served completion -> a thumbs record, and a pair when the same conversation
        now has an answer rated up and one rated down."""
        if not isinstance(body, dict) or body.get("rating") not in ("up", "down"):
            raise APIError(400, "send {\"id\": <completion id>, \"rating\": \"up\" or \"down\"}", "rating")
        up = body["rating"] == "up"
        with self.state_lock:
            served = self.served.get(body.get("id"))
            if served is None:
                raise APIError(404, f"no completion '{body.get('id')}' among the last {REMEMBERED} served", "id",
                               "completion_not_found")
            served["rating"] = body["rating"]
            record = {"prompt": served["prompt"], "completion": [{"role": "assistant", "content": served["text"]}],
                      "label": up, "model": served["model"], "completion_id": body["id"], "timestamp": now()}
            append_jsonl(self.thumbs_path, record)
            self.saved["thumbs"] += 1
            other = next((c for c in reversed(self.served.values()) if c is not served and c["prompt"] == served["prompt"]
                          and c["rating"] == ("down" if up else "up") and c["text"] != served["text"]), None)
            if other is not None:
                chosen, rejected = (served, other) if up else (other, served)
                append_jsonl(self.out, {"prompt": served["prompt"],
                                        "chosen": [{"role": "assistant", "content": chosen["text"]}],
                                        "rejected": [{"role": "assistant", "content": rejected["text"]}],
                                        "model_chosen": chosen["model"], "model_rejected": rejected["model"],
                                        "source": "api_thumbs", "timestamp": record["timestamp"]})
                self.saved["pairs"] += 1
                chosen["rating"] = rejected["rating"] = "paired"  # each answer goes into one pair at most
        return {"saved": dict(self.saved), "pair": other is not None}


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def make_handler(api: ChatAPI):
    class Handler(JSONHandler):
        def fail(self, e: APIError) -> None:
            self._json(e.body(), e.status)

        def authorised(self) -> bool:
            if not api.api_key:
                return True
            sent = self.headers.get("Authorization", "")
            if hmac.compare_digest(sent.encode(), f"Bearer {api.api_key}".encode()):
                return True
            self.fail(APIError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", None,
                               "invalid_api_key"))
            return False

        def do_GET(self):
            if not self.authorised():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._json(api.models())
            else:
                self.fail(APIError(404, f"Unknown path {self.path}", code="not_found"))

        def do_POST(self):
            if not self.authorised():
                return
            try:
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                except (ValueError, UnicodeDecodeError) as e:
                    raise APIError(400, f"the request body is not JSON: {e}") from None
                if self.path == "/v1/chat/completions":
                    bot, messages, opts, seed = api.request(body)
                    if body.get("stream"):
                        self.stream(bot, messages, opts, seed, bool((body.get("stream_options") or {}).get("include_usage")))
                    else:
                        self._json(api.complete(bot, messages, opts, seed))
                elif self.path == "/v1/feedback":
                    self._json(api.feedback(body))
                else:
                    raise APIError(404, f"Unknown path {self.path}", code="not_found")
            except APIError as e:
                self.fail(e)
            except Exception as e:  # a bug or a model failure: said, not a dropped connection
                self.fail(APIError(500, f"{type(e).__name__}: {e}", kind="server_error"))

        def stream(self, bot: Bot, messages: list[dict], opts: GenOptions, seed: int | None, include_usage: bool):
            """Server-sent events: the role, the text as it is generated, the finish reason, [DONE]."""
            cid, created = new_id(), int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            gone = []  # the client hung up: generation finishes (the model is locked until it does), unsent

            def event(data) -> None:
                if gone:
                    return
                try:
                    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
                    self.wfile.write(f"data: {payload}\n\n".encode())
                    self.wfile.flush()
                except OSError:
                    gone.append(True)

            event(chunk(cid, created, bot.name, {"role": "assistant", "content": ""}))
            try:
                done = api.complete(bot, messages, opts, seed, cid=cid,
                                    on_text=lambda piece: event(chunk(cid, created, bot.name, {"content": piece})))
            except Exception as e:  # headers are sent: the error goes as an event, as OpenAI's does mid-stream
                event(APIError(500, f"{type(e).__name__}: {e}", kind="server_error").body())
                return
            event(chunk(cid, created, bot.name, {}, done["choices"][0]["finish_reason"]))
            if include_usage:
                event({**chunk(cid, created, bot.name, {}), "choices": [], "usage": done["usage"]})
            event("[DONE]")

    return Handler


def start_api_server(api: ChatAPI, port: int = 0, host: str = "127.0.0.1"):
    """Serve ``api`` in a daemon thread; ``server.server_address[1]`` is the port."""
    return start_http_server(make_handler(api), port, host)


def serve_api(bots: list[Bot], opts: GenOptions, out: str, port: int = 8000, host: str = "127.0.0.1") -> int:
    api = ChatAPI(bots, opts, out, api_key=os.environ.get(API_KEY_ENV) or None)
    server = http_server(make_handler(api), port, host)
    url = f"http://{host}:{server.server_address[1]}/v1"
    print(f"alignkit chat: OpenAI-compatible API at {url} (models: {', '.join(api.bots)})", flush=True)
    print(f"  e.g. OpenAI(base_url=\"{url}\", api_key=\"{'<the key>' if api.api_key else 'none'}\")", flush=True)
    print(f"  thumbs (POST /v1/feedback) -> {api.thumbs_path}; pairs from them -> {api.out}; Ctrl-C stops", flush=True)
    if host not in ("127.0.0.1", "localhost") and not api.api_key:
        print(f"  warning: other machines can reach it without a key (set {API_KEY_ENV})", file=sys.stderr, flush=True)
    serve_until_interrupted(server)
    print(f"alignkit chat: saved {api.saved['thumbs']} thumbs and {api.saved['pairs']} pairs this session")
    return 0
