"""``alignkit``: one command per stage of the alignment loop.

:data:`VERBS` is the one table of commands. Each entry names the function that fills in the
command's parser (``configure(parser)``, which sets ``func=handler``; ``handler(args) -> int`` is
the exit code) by its import path, so only the module of the command being run is imported:
``alignkit --help`` and ``alignkit sft`` do not pay for Argilla's or the chat's imports. The core
names the stages here as strings only; it never imports them at module level.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from alignkit.distributed import end_processes, prepare_processes
from alignkit.errors import AlignkitError

# command -> ("module:function" that configures its parser, one-line help), in loop order
VERBS = {
    "sft": ("alignkit.sft.train:configure_cli", "supervised fine-tuning on instruction data"),
    "annotate": ("alignkit.annotation.cli:configure_cli",
                 "candidates -> Argilla -> annotators -> agreement report -> preference pairs"),
    "reward": ("alignkit.reward.cli:configure_cli", "train/evaluate a reward model with the pairwise ranking loss"),
    "align": ("alignkit.rlhf.cli:configure_cli", "align a policy: DPO, PPO, GRPO or RLOO"),
    "eval": ("alignkit.loop.human_eval:configure_cli",
             "held-out prompts: reward, win rates, oracle, diversity, forgetting; --human-eval A,B: blind A/B in Argilla"),
    "chat": ("alignkit.loop.chat:configure_cli", "talk to a model (terminal or --web), side by side with --compare"),
    "run": ("alignkit.loop.run:configure_cli", "the whole loop from one config, resumable"),
    "sweep": ("alignkit.loop.sweep:configure_cli", "A/B test settings of a training stage on validation data, pick the winner"),
    "export": ("alignkit.export:configure_cli", "a trained model as a merged HF directory, a GGUF file or an Ollama model"),
    "model": ("alignkit.model_cli:configure_cli", "fetch the offline default model or build a tiny test model"),
}

EPILOG = """\
Every config key can be overridden on the command line as KEY=VALUE (nested: lora.r=8);
`alignkit COMMAND --help` lists the command's keys with their defaults and meaning.
Docs: README.md and docs/ in the repository."""


def _configure(name: str):
    module, function = VERBS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the full sub-parser of the command named in ``argv`` only (the others are
    listed with their help line: filling them in would import every stage)."""
    parser = argparse.ArgumentParser(
        prog="alignkit", description="RLHF and preference tuning, stage by stage.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == wanted:
            _configure(name)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        prepare_processes()
        return int(args.func(args) or 0)
    except AlignkitError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignkit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        end_processes()


if __name__ == "__main__":
    sys.exit(main())
