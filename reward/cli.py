"""``alignkit reward train|eval``: train a reward model, evaluate it on held-out pairs."""

from __future__ import annotations

import argparse

from alignkit.config import add_config_args, load_config


def _train(args) -> int:
    from alignkit.reward.train import RewardTrainConfig, train

    train(load_config(RewardTrainConfig, args.config, args.overrides), force=args.force)
    return 0


def _eval(args) -> int:
    from alignkit.reward.evaluate import RewardEvalConfig, evaluate

    evaluate(load_config(RewardEvalConfig, args.config, args.overrides), force=args.force)
    return 0


def configure_cli(p) -> None:
    from alignkit.reward.evaluate import RewardEvalConfig
    from alignkit.reward.train import RewardTrainConfig

    p.description = ("Reward model: `train` fits it on preference pairs, `eval` reports held-out accuracy, "
                     "calibration and length bias. See docs/reward.md.")
    verbs = p.add_subparsers(dest="reward_command", metavar="{train,eval}", required=True)
    for name, cls, func, help_text, example in (
        ("train", RewardTrainConfig, _train,
         "train with -log sigmoid(r_chosen - r_rejected - margin); resumes an interrupted run, skips a completed one",
         "configs/reward.yaml"),
        ("eval", RewardEvalConfig, _eval,
         "held-out accuracy (95%% CI), accuracy by margin, calibration, length correlation -> eval.json + report.html",
         "configs/reward_eval.yaml"),
    ):
        v = verbs.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_args(v, cls, example)
        v.set_defaults(func=func)
