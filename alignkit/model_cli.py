"""``alignkit model fetch|tiny``: prepare models ahead of a run (offline default, tiny test models)."""

from __future__ import annotations

import argparse


def _fetch(args) -> int:
    from alignkit.models import resolve_model

    print(resolve_model(args.name))
    return 0


def _tiny(args) -> int:
    from alignkit.models import build_tiny_model

    print(build_tiny_model(args.out, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed))
    return 0


def configure_cli(p) -> None:
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    f = msub.add_parser("fetch", help="resolve a model name (offline:..., a Hub id, a dir) and print its local path",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("name", nargs="?", default="offline:smollm2-135m-instruct")
    f.set_defaults(func=_fetch)
    t = msub.add_parser("tiny", help="build a random tiny Llama + BPE tokenizer for smoke runs",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("out")
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)
