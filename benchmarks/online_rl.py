"""Online RL side by side: PPO, GRPO and RLOO on the same model, reward and prompts, for the same
budget of generated tokens, in one run (one after the other, so a noisy machine hits all three).

Each method runs its alignkit stage (``alignkit align ppo|grpo|rloo``) from the same starting
model, seed, learning-rate schedule (constant) and KL weight ``--beta``, with the same reward (a rule,
by default the share of digits in the reply, or ``--reward-model``) and no missing-EOS penalty for
PPO, so that all three optimise the same number. Every step samples ``--batch`` replies of at
most ``--new-tokens`` tokens: PPO one reply to each of ``--batch`` prompts, GRPO and RLOO
``--num-generations`` replies to each of ``--batch / --num-generations`` prompts. The budget
``--budget`` (generated tokens per method) sets the steps: ``budget / (batch x new_tokens)``, so
each method samples the same replies with the same cap on their tokens; the tokens each really
generated (replies stop at EOS) are printed too.

Printed per method, and each against PPO:

  reward gain   mean reward of the last quarter of the steps minus that of the first quarter
                (the training logs: PPO's ``score``, TRL's ``reward``; the same reward function)
  reward        the final policy's mean reward on fresh replies to the prompts (the eval stage)
  KL            KL(final policy || starting model) per reply, in nats, estimated by the eval stage
                on each policy's own sampled replies: the same estimate for all three (their training
                logs estimate it differently: PPO sums log-ratios over a reply, TRL averages k3 per token)
  samples/s     replies sampled per second of the training loop (PPO: the sum of its step times;
  tokens/s      GRPO, RLOO: the trainer's train_runtime), and generated tokens per second

One JSON line per run is appended to ``benchmarks/results/online_rl.jsonl``.

  python benchmarks/online_rl.py                                 # tiny random model, digit rule
  python benchmarks/online_rl.py --model offline:smollm2-135m-instruct --trainable-layers 10 \\
      --batch 8 --num-generations 4 --new-tokens 32 --budget 2560 --lr ppo=1e-4,grpo=1e-5,rloo=1e-5
  python benchmarks/online_rl.py --model runs/quickstart/sft/model --reward-model runs/quickstart/reward \\
      --prompts runs/quickstart/sft/train_prompts.jsonl --trainable-layers 10 ...     # the loop's reward model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from align_throughput import PROMPTS, n_params  # benchmarks/align_throughput.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("ppo", "grpo", "rloo")
DEFAULT_RULE = "alignkit.rlhf.rule_rewards:digit_fraction"  # dense and learnable by the tiny model
# Rates at which each method learns the digit rule on the tiny model (tests/test_ppo.py, test_online_rl.py)
DEFAULT_LR = "ppo=5e-3,grpo=5e-3,rloo=1e-2"


def learning_rates(text: str) -> dict[str, float]:
    rates = dict(part.split("=", 1) for part in text.split(","))
    if set(rates) != set(METHODS):
        raise SystemExit(f"--lr: give one rate per method, e.g. {DEFAULT_LR}")
    return {m: float(rates[m]) for m in METHODS}


def reward_keys(args) -> dict:
    """The reward every method (and the eval) is given: a reward model or a rule."""
    if args.reward_model:
        return {"reward_model": args.reward_model, "reward_function": None}
    return {"reward_model": None, "reward_function": args.reward_function}


def summary(rewards: list[float], tokens: list[float], samples: int, seconds: float) -> dict:
    """Reward gain (last quarter of the steps minus the first), sampled replies and tokens, and rates."""
    k = max(1, len(rewards) // 4)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    return {"steps": len(rewards), "reward_first": first, "reward_last": last, "reward_gain": last - first,
            "samples": samples, "generated_tokens": sum(tokens), "train_s": seconds,
            "samples_per_s": samples / seconds, "tokens_per_s": sum(tokens) / seconds}


def run_ppo(args, model: str, prompts: Path, out: Path, steps: int, lr: float) -> dict:
    from alignkit.config import from_dict
    from alignkit.rlhf.ppo import PPOConfig, read_metrics, train

    train(from_dict(PPOConfig, {
        **reward_keys(args), "model": model, "prompts": str(prompts), "output_dir": str(out), "seed": args.seed,
        "total_steps": steps, "rollout_batch_size": args.batch, "mini_batch_size": max(1, args.batch // 2),
        "max_new_tokens": args.new_tokens, "learning_rate": lr, "kl_coef": args.beta, "missing_eos_penalty": None,
        "trainable_layers": args.trainable_layers, "save_steps": 10**6, "report_to": []}), force=True)
    rows = read_metrics(out)
    return summary([r["score"] for r in rows], [r["response_length"] * args.batch for r in rows],
                   rows[-1]["samples"], sum(r["time/step_s"] for r in rows))


def run_trl(method: str, args, model: str, prompts: Path, out: Path, steps: int, lr: float) -> dict:
    from alignkit.config import from_dict
    from alignkit.rlhf.online import OnlineRLConfig, train

    manifest = train(from_dict(OnlineRLConfig, {
        **reward_keys(args), "model": model, "data": str(prompts), "output_dir": str(out), "seed": args.seed,
        "max_steps": steps, "batch_size": args.batch, "num_generations": args.num_generations,
        "max_new_tokens": args.new_tokens, "learning_rate": lr, "beta": args.beta,
        "trainable_layers": args.trainable_layers, "logging_steps": 1, "save_steps": 10**6, "report_to": []}),
        method, force=True)
    rows = [r for r in map(json.loads, (out / "log_history.jsonl").read_text().splitlines()) if "reward" in r]
    return summary([r["reward"] for r in rows], [r["completions/mean_length"] * args.batch for r in rows],
                   len(rows) * args.batch, manifest["metrics"]["train_runtime_s"])


def measure_kl_and_reward(args, model: str, prompts: Path, work: Path, results: dict) -> None:
    """One eval of the starting model and the three trained policies on the same prompts: the KL of
    each to the starting model and its mean reward, on its own sampled replies."""
    from alignkit.config import from_dict
    from alignkit.evals.evaluate import EvalConfig, evaluate

    result = evaluate(from_dict(EvalConfig, {
        **reward_keys(args), "models": {"start": model, **{m: str(work / m / "model") for m in METHODS}},
        "baseline": "start", "prompts": str(prompts), "max_prompts": args.eval_prompts,
        "samples_per_prompt": args.eval_samples, "max_new_tokens": args.new_tokens, "batch_size": args.batch,
        "oracle": False, "general_text": None, "output_dir": str(work / "eval"), "report_to": []}), force=True)
    for m in METHODS:
        scored = result["models"][m]
        results[m]["kl"] = scored["kl"]["mean"]
        results[m]["reward_final"] = scored["reward"][result["primary_reward"]]["mean"]
    results["start_reward"] = result["models"]["start"]["reward"][result["primary_reward"]]["mean"]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_table(results: dict) -> None:
    rows = [("reward gain", "reward_gain", "{:+.4f}"), ("reward (final policy)", "reward_final", "{:.4f}"),
            ("KL to the start (nats/reply)", "kl", "{:.4f}"), ("samples/s", "samples_per_s", "{:.2f}"),
            ("generated tokens/s", "tokens_per_s", "{:.1f}"), ("generated tokens", "generated_tokens", "{:.0f}"),
            ("training loop (s)", "train_s", "{:.1f}")]
    print(f"\n{'':30}" + "".join(f"{m.upper():>12}" for m in METHODS) + "".join(f"{m.upper() + '/PPO':>12}" for m in METHODS[1:]))
    for label, key, fmt in rows:
        values = [results[m].get(key) for m in METHODS]
        cells = "".join(f"{fmt.format(v) if v is not None else '-':>12}" for v in values)
        ratios = "".join(f"{ratio(v, values[0]):>12}" for v in values[1:])
        print(f"{label:30}{cells}{ratios}")
    print(f"(the starting model's reward on the same prompts: {results['start_reward']:.4f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model dir, Hub id or offline:NAME (default: a tiny random model)")
    ap.add_argument("--reward-model", help="a reward run dir or its model/ (default: the rule of --reward-function)")
    ap.add_argument("--reward-function", default=DEFAULT_RULE, help="rule reward 'module:function' (default: %(default)s)")
    ap.add_argument("--prompts", help="prompt file (default: the 8 prompts of benchmarks/align_throughput.py)")
    ap.add_argument("--budget", type=int, default=3072, help="generated tokens per method (at most): sets the steps")
    ap.add_argument("--batch", type=int, default=16, help="replies sampled per step (a multiple of --num-generations)")
    ap.add_argument("--num-generations", type=int, default=4, help="GRPO/RLOO: replies per prompt")
    ap.add_argument("--new-tokens", type=int, default=12, help="reply length cap in tokens")
    ap.add_argument("--beta", type=float, default=0.05, help="KL weight (PPO's kl_coef, GRPO's and RLOO's beta)")
    ap.add_argument("--lr", default=DEFAULT_LR, help="learning rate per method (default: %(default)s)")
    ap.add_argument("--trainable-layers", type=int, help="train only the top N blocks (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-prompts", type=int, default=32, help="prompts the KL and final reward are measured on")
    ap.add_argument("--eval-samples", type=int, default=4, help="replies per prompt for the KL and final reward")
    args = ap.parse_args()
    rates = learning_rates(args.lr)
    steps = args.budget // (args.batch * args.new_tokens)
    if steps < 4:
        raise SystemExit(f"--budget {args.budget}: only {steps} steps of {args.batch} x {args.new_tokens} tokens; "
                         "the reward gain needs at least 4")

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    from alignkit.models import build_tiny_model, resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = resolve_model(args.model) if args.model else str(build_tiny_model(work / "tiny"))
        prompts = Path(args.prompts) if args.prompts else work / "prompts.jsonl"
        if not args.prompts:
            prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        reward = args.reward_model or args.reward_function
        print(f"model: {args.model or 'tiny random Llama'} ({n_params(model) / 1e6:.2f}M parameters) on {device}\n"
              f"reward: {reward}; {steps} steps of {args.batch} replies x at most {args.new_tokens} tokens "
              f"(budget {args.budget} tokens) per method; learning rates {rates}", flush=True)
        results: dict = {}
        for method in METHODS:
            t0 = time.perf_counter()
            if method == "ppo":
                results[method] = run_ppo(args, model, prompts, work / method, steps, rates[method])
            else:
                results[method] = run_trl(method, args, model, prompts, work / method, steps, rates[method])
            print(f"{method}: {time.perf_counter() - t0:.1f} s (stage wall time, model loading included)", flush=True)
        measure_kl_and_reward(args, model, prompts, work, results)
    print_table(results)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    with open(out / "online_rl.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model or "tiny", "device": device,
                            "reward": reward, "budget": args.budget, "steps": steps, "batch": args.batch,
                            "num_generations": args.num_generations, "new_tokens": args.new_tokens, "beta": args.beta,
                            "learning_rates": rates, "trainable_layers": args.trainable_layers, "seed": args.seed,
                            **results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
