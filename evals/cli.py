"""``alignkit eval`` (see :mod:`alignkit.evals.evaluate`). The command is wired in :mod:`alignkit.loop.human_eval`,
which adds ``--human-eval A,B`` (annotators in Argilla: another stage) to these arguments; ``alignkit chat`` is
wired in :mod:`alignkit.loop.chat`."""

from __future__ import annotations

from alignkit.config import add_config_args, load_config


def _eval(args) -> int:
    from alignkit.evals.evaluate import EvalConfig, evaluate

    evaluate(load_config(EvalConfig, args.config, args.overrides), force=args.force)
    return 0


def configure_eval_cli(p) -> None:
    from alignkit.evals.evaluate import EvalConfig

    p.description = ("Generate from several models on held-out prompts with the same seeds, score the replies with "
                     "a reward model and/or a rule reward and the constraint oracle, and write eval.json, "
                     "generations.jsonl and report.html (what each number means: docs/evaluation.md). "
                     "A completed run with the same config and inputs is skipped; an interrupted one reuses "
                     "the models it finished. models.NAME=DIR adds or replaces one model.")
    add_config_args(p, EvalConfig, "configs/eval.yaml",
                    force_help="run again even if completed (cached generations are redone)")
    p.set_defaults(func=_eval)
