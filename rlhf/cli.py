"""``alignkit align dpo|ppo|grpo|rloo --config FILE [--force] [KEY=VALUE ...]``."""

from __future__ import annotations

import importlib
import sys

from alignkit.config import add_config_args, load_config

RECIPES = {  # name -> (module, config class, train function, help, description)
    "dpo": ("alignkit.rlhf.dpo", "DPOStageConfig", "train", "direct preference optimisation with TRL's DPOTrainer",
            "DPO (sigmoid, ipo, hinge, ... losses) on preference pairs: full, LoRA or QLoRA. An interrupted run "
            "resumes from its last checkpoint when run again; a completed one is skipped unless --force."),
    "ppo": ("alignkit.rlhf.ppo", "PPOConfig", "train", "PPO against a reward model or a rule reward (our own implementation)",
            "PPO with a KL penalty to the reference, GAE, clipped policy and value losses (see docs/alignment.md). "
            "Runs under torchrun/accelerate launch; a killed run resumes from its last checkpoint."),
    "grpo": ("alignkit.rlhf.online", "OnlineRLConfig", "train_grpo", "GRPO (TRL's GRPOTrainer) against a reward model or a rule",
             "Group-relative policy optimisation: num_generations replies per prompt, each compared with its group's "
             "mean; no value model. Resumes from its last checkpoint when run again."),
    "rloo": ("alignkit.rlhf.online", "OnlineRLConfig", "train_rloo", "RLOO (TRL's RLOOTrainer) against a reward model or a rule",
             "REINFORCE leave-one-out: each reply's baseline is the mean reward of the other replies to its prompt; "
             "no value model. Resumes from its last checkpoint when run again."),
}


def _handler(args) -> int:
    module_name, cls_name, function, _, _ = RECIPES[args.recipe]
    module = importlib.import_module(module_name)
    getattr(module, function)(load_config(getattr(module, cls_name), args.config, args.overrides), force=args.force)
    return 0


def _help_asked_for(recipe: str) -> bool:
    argv = sys.argv[1:]
    return recipe in argv and ("-h" in argv or "--help" in argv)


def configure_cli(align) -> None:
    align.description = "Align the SFT policy with preference pairs (dpo) or a reward (ppo, grpo, rloo)."
    recipes = align.add_subparsers(dest="recipe", metavar="RECIPE")
    for name, (module_name, cls_name, _, help_text, description) in RECIPES.items():
        p = recipes.add_parser(name, help=help_text, description=description)
        # importing a recipe pulls in torch and TRL: only to list its keys when its --help is asked for
        cls = getattr(importlib.import_module(module_name), cls_name) if _help_asked_for(name) else None
        add_config_args(p, cls, f"configs/{name}.yaml")
        p.set_defaults(func=_handler, recipe=name)
    align.set_defaults(func=lambda args: (align.print_help(), 2)[1])
