"""``alignkit eval --config FILE [--force] [KEY=VALUE ...]``: see :mod:`evals.evaluate`."""

from __future__ import annotations

import argparse


def _handler(args) -> int:
    from alignkit.config import load_config
    from evals.evaluate import EvalConfig, evaluate

    cfg = load_config(EvalConfig, args.config, args.overrides)
    evaluate(cfg, force=args.force)
    return 0


def register_cli(sub) -> None:
    from alignkit.config import describe
    from evals.evaluate import EvalConfig

    p = sub.add_parser(
        "eval", help="held-out prompts: reward, win rates, oracle, diversity",
        description="Generate from several models on held-out prompts with the same seeds, score the replies with "
                    "a reward model and/or a rule reward and the constraint oracle, and write eval.json, "
                    "generations.jsonl and report.html (what each number means: docs/evaluation.md). "
                    "A completed run with the same config and inputs is skipped; an interrupted one reuses "
                    "the models it finished.",
        epilog="config keys (YAML or KEY=VALUE; models.NAME=DIR adds or replaces one model):\n" + describe(EvalConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (configs/eval.yaml); keys below")
    p.add_argument("--force", action="store_true", help="run again even if completed (cached generations are redone)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    p.set_defaults(func=_handler)
