"""``alignkit``: one command per stage of the alignment loop.

Each stage module registers its own sub-command (``register_cli(subparsers)``) and sets
``func=handler`` where ``handler(args) -> int`` is the exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from alignkit.config import ConfigError
from alignkit.data import DataError

EPILOG = """\
stages, in loop order:
  sft        supervised fine-tuning on instruction data
  annotate   candidates -> Argilla -> annotators -> agreement report -> preference pairs
  reward     train/evaluate a reward model with the pairwise ranking loss
  align      DPO or PPO against the reward model
  eval       held-out prompts: reward, win rates, oracle, diversity
  chat       talk to a model (terminal or --web), side by side with --compare
  run        the whole loop from one config, resumable

Every config key can be overridden on the command line as KEY=VALUE (nested: lora.r=8).
Docs: README.md and docs/ in the repository."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit", description="RLHF and preference tuning, stage by stage.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from alignkit import model_cli
    from sft import train as sft_train

    sft_train.register_cli(sub)
    for module_name in ("annotation.cli", "reward.cli", "rlhf.cli", "evals.cli", "evals.chat", "alignkit.loop"):
        module = _optional_module(module_name)
        if module is not None:
            module.register_cli(sub)
    model_cli.register_cli(sub)
    return parser


def _optional_module(name: str):
    """Stage modules are imported lazily so that ``alignkit sft`` does not pay for Argilla imports."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(name.split(".")[0]) is None or importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
        return int(args.func(args) or 0)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignkit: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
