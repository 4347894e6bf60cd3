"""Rule rewards: plain functions ``(prompts: list[str], responses: list[str]) -> list[float]``.

PPO takes one instead of a reward model with ``reward_function: "alignkit.rlhf.rule_rewards:NAME"`` (or
``"path/to/file.py:NAME"`` for your own). They are cheap and deterministic, which is what smoke
runs, tests and the demo need: a reward a tiny random model can learn within a few PPO steps, so
that "the reward goes up" is a real check of the recipe rather than of the reward model.
"""

from __future__ import annotations


def digit_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the reply's non-space characters that are digits (0 for an empty reply)."""
    out = []
    for r in responses:
        chars = [c for c in r if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """``1 - words / 20``, floored at -1: short replies score high (combine with the missing-EOS
    penalty to teach a model to stop)."""
    return [max(-1.0, 1.0 - len(r.split()) / 20.0) for r in responses]


def mentions_prompt(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the prompt's distinct words (3+ letters) that the reply repeats: a crude
    "stays on topic" rule for demos."""
    out = []
    for p, r in zip(prompts, responses):
        words = {w.lower().strip(".,!?;:") for w in p.split() if len(w) >= 3}
        said = {w.lower().strip(".,!?;:") for w in r.split()}
        out.append(len(words & said) / len(words) if words else 0.0)
    return out
