"""Rule rewards: Python functions named in a config, used by PPO (as the reward) and eval (as a score).

A rule reward is ``fn(prompts: list[str], responses: list[str]) -> list[float]``, named as
``"package.module:function"`` or ``"path/to/file.py:function"`` (see ``rlhf/rule_rewards.py``).
It lives here, not in ``alignkit.training``, because eval uses it without training anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from alignkit.config import ConfigError


def load_reward_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function.

    Every way the spec can be wrong is a ``ConfigError`` naming the spec, so a stage can call this
    before it writes anything and the CLI prints one clear line instead of a traceback."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise ConfigError(f"reward_function {spec!r}: expected 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.exists():
            raise ConfigError(f"reward_function {spec!r}: file {path} not found")
        # A prefixed module name: a file called e.g. json.py must not pass for the real module.
        module_spec = importlib.util.spec_from_file_location(f"_alignkit_rule_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        # `python -m` puts the working directory on sys.path but the `alignkit` script does not:
        # add it, so a rule module beside the config imports the same way under either.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"reward_function {spec!r}: cannot import {module_name}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward_function {spec!r}: {module_name} has no function {name!r}")
    return fn
