"""``alignkit align dpo|ppo --config FILE [--force] [KEY=VALUE ...]``.

Stage modules are imported inside the handlers, so ``alignkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from alignkit.config import describe, load_config

RECIPES = {
    "dpo": ("rlhf.dpo", "DPOStageConfig", "direct preference optimisation with TRL's DPOTrainer",
            "DPO (sigmoid, ipo, hinge, ... losses) on preference pairs: full, LoRA or QLoRA. An interrupted run "
            "resumes from its last checkpoint when run again; a completed one is skipped unless --force."),
    "ppo": ("rlhf.ppo", "PPOConfig", "PPO against a reward model or a rule reward (our own implementation)",
            "PPO with a KL penalty to the reference, GAE, clipped policy and value losses (see docs/alignment.md). "
            "Runs under torchrun/accelerate launch; a killed run resumes from its last checkpoint."),
}


def _config_class(module_name: str, cls_name: str):
    import importlib

    return getattr(importlib.import_module(module_name), cls_name)


def _handler(args) -> int:
    module_name, cls_name, _, _ = RECIPES[args.recipe]
    import importlib

    module = importlib.import_module(module_name)
    cfg = load_config(getattr(module, cls_name), args.config, args.overrides)
    module.train(cfg, force=args.force)
    return 0


def _wants_help(name: str) -> bool:
    argv = sys.argv[1:]
    return "align" in argv and name in argv and ("-h" in argv or "--help" in argv)


def register_cli(sub) -> None:
    align = sub.add_parser("align", help="align a policy: DPO or PPO",
                           description="Align the SFT policy with preference pairs (dpo) or a reward (ppo).")
    recipes = align.add_subparsers(dest="recipe", metavar="RECIPE")
    for name, (module_name, cls_name, help_text, description) in RECIPES.items():
        keys = "  (see --help of this command)"
        if _wants_help(name):  # importing a recipe pulls in torch: only pay for it when its help is shown
            try:
                keys = describe(_config_class(module_name, cls_name))
            except ImportError as e:  # a broken optional dependency must not break the whole CLI
                keys = f"  (config keys unavailable: {e})"
        p = recipes.add_parser(name, help=help_text, description=description,
                               epilog="config keys (YAML or KEY=VALUE):\n" + keys,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help=f"YAML config (configs/{name}.yaml); keys below")
        p.add_argument("--force", action="store_true", help="run again from scratch even if completed")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
        p.set_defaults(func=_handler, recipe=name)
    align.set_defaults(func=lambda args: (align.print_help(), 2)[1])
