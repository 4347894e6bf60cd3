"""``alignkit chat``: the command's wiring. It joins two stages, which is why it lives above them:
the chat itself (:mod:`alignkit.evals.chat`, the page of ``--web`` in :mod:`alignkit.evals.chat_web`)
and, with ``--push-to-argilla``, the annotation stage's Argilla records of the picks
(:mod:`alignkit.annotation.picks`). docs/chat.md describes the command.
"""

from __future__ import annotations

import sys
from typing import Callable

from alignkit.evals.chat import HELP
from alignkit.models import DEFAULT_MODEL


def configure_cli(p) -> None:
    p.description = ("Chat with a model in the terminal (streaming, multi-turn, /help for commands). "
                     "--compare answers every turn with a second model too (labelled A and B). --web serves a "
                     "local page where a tester compares two anonymised models and saves which answer is better "
                     "as preference records (docs/chat.md).")
    p.epilog = HELP
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model dir, Hub id or offline:NAME (default {DEFAULT_MODEL})")
    p.add_argument("--compare", metavar="DIR", help="a second model: both answer every turn")
    p.add_argument("--web", action="store_true", help="serve the blind comparison page instead (needs --compare)")
    p.add_argument("--serve", action="store_true",
                   help="serve an OpenAI-compatible API instead (/v1/chat/completions, streaming or not, and /v1/models) "
                        "for --model and --compare, so a team's own chat tools can talk to them; thumbs sent to "
                        "/v1/feedback become preference data (docs/chat.md)")
    p.add_argument("--host", default="127.0.0.1",
                   help="--serve: address to listen on (0.0.0.0: every interface; set ALIGNKIT_CHAT_API_KEY then; "
                        "default 127.0.0.1)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    p.add_argument("--port", type=int, help="--web, --serve: port (0: any free port; default 8765 for --web, 8000 for --serve)")
    p.add_argument("--out", default="runs/chat/preferences.jsonl",
                   help="--web: JSONL file the picks are appended to; --serve: the pairs made from thumbs (the thumbs "
                        "themselves go to <stem>.thumbs.jsonl beside it) (default runs/chat/preferences.jsonl)")
    p.add_argument("--push-to-argilla", metavar="DATASET",
                   help="--web: also push every pick to this Argilla dataset (ARGILLA_API_URL/ARGILLA_API_KEY or "
                        "the local server of `alignkit annotate server up`)")
    p.add_argument("--workspace", default="alignkit", help="--web: Argilla workspace for --push-to-argilla")
    p.set_defaults(func=chat)


def argilla_push(dataset: str, workspace: str) -> Callable[[dict], str]:
    """The page's ``on_pick`` for ``--push-to-argilla``: each saved pick goes to ``dataset`` as it is
    made; the page reports "pushed" or the error (the pick is in the picks file either way)."""
    from alignkit.annotation.picks import push_picks_to_argilla

    def push(record: dict) -> str:
        push_picks_to_argilla([record], dataset, workspace)
        return "pushed"

    return push


def chat(args) -> int:
    import torch
    from alignkit.evals.chat import Bot, GenOptions, terminal_chat

    if args.web and not args.compare:
        print("alignkit chat: --web compares two models: add --compare DIR", file=sys.stderr)
        return 2
    if args.web and args.serve:
        print("alignkit chat: --web or --serve, not both", file=sys.stderr)
        return 2
    opts = GenOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    torch.manual_seed(args.seed)
    names = [args.model] + ([args.compare] if args.compare else [])
    bots = {}
    for label, name in zip("AB", names):
        print(f"loading {name} ...", flush=True)
        bots[label if args.compare else "bot"] = Bot.load(name)
    if args.serve:
        from alignkit.evals.chat_api import serve_api

        return serve_api(list(bots.values()), opts, out=args.out, port=8000 if args.port is None else args.port,
                         host=args.host)
    if args.web:
        from alignkit.evals.chat_web import serve

        on_pick = argilla_push(args.push_to_argilla, args.workspace) if args.push_to_argilla else None
        return serve(bots["A"], bots["B"], opts, out=args.out, port=8765 if args.port is None else args.port,
                     system=args.system, on_pick=on_pick)
    try:
        return terminal_chat(bots, args.system, opts)
    except KeyboardInterrupt:  # Ctrl-C leaves too, mid-answer included
        print()
        return 0
