"""Alignment throughput: DPO pairs/s, PPO samples/s and where PPO's time goes, batched generation.

Everything runs on the same model, one after the other, so the ratios compare like with like on a
noisy machine:

  generation   the same prompts, greedy, three ways: one prompt at a time (no padding), one
               RIGHT-padded batch, one LEFT-padded batch (what PPO does). Prints tokens/s, the
               speed-up of the left-padded batch over one-by-one, and how many rows of each batch
               reproduce the one-by-one output (right padding puts pad tokens between the prompt
               and the reply, so the model continues after padding: wrong replies, not only slow).
  dpo          the `alignkit align dpo` stage for --steps optimiser steps: pairs/s.
  ppo          the `alignkit align ppo` stage (rule reward) for --steps PPO steps, each run in a
               fresh process: samples/s, the share of step time spent generating (OpenRLHF reports
               ~80% on GPUs) and the seconds per step of each phase (generation, reward, frozen
               features, old log-probs, reference log-probs, values, advantages, update). With
               --baseline REV the same runs of the code at git revision REV (a worktree) alternate
               with this tree's, A B, B A, ...: the time per step outside generation, and the
               largest difference in the per-step metrics (same seeds: an optimisation must not
               change what PPO computes).

On CUDA it also prints model FLOPs utilisation: DPO counts 6 x params x tokens for the policy's
forward + backward and 2 x params x tokens for the reference's forward; PPO counts generation
(2 x params per token), the rollout forwards (policy, reference, value: 3 x 2 x params per token)
and the updates (ppo_epochs x 2 models x 6 x params per token), over the GPU's peak bf16 FLOP/s.

  python benchmarks/align_throughput.py                         # tiny model (CPU-friendly)
  python benchmarks/align_throughput.py --model offline:smollm2-135m-instruct --steps 3
  python benchmarks/align_throughput.py --only ppo --pairs 3 --baseline a3deb70   # A/B against older code

Appends a JSON line to benchmarks/results/align_throughput.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import peak_flops  # noqa: E402  (benchmarks/common.py)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).resolve().parent / "results" / "align_throughput.jsonl"

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a short poem about the sea.",
           "Answer in one word.", "Summarise the text below.", "Translate the sentence into French.",
           "Explain photosynthesis in simple terms for a child.", "Count to ten."]




def n_params(model_dir: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_generation(model_dir: str, batch: int, new_tokens: int, repeats: int = 3) -> dict:
    import torch

    from alignkit.generation import encode_prompt, left_pad
    from alignkit.models import load_tokenizer, match_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(model_dir)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    match_tokenizer(model, tok)
    model.to(device).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(batch)]
    ids = [encode_prompt(tok, p)[-256:] for p in prompts]  # as PPO encodes its prompts
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
              eos_token_id=None, top_k=None, top_p=None, temperature=None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    @torch.no_grad()
    def one_by_one():
        return [model.generate(input_ids=torch.tensor([s], device=device), **kw)[0, len(s):].tolist() for s in ids]

    @torch.no_grad()
    def batched(side: str):
        if side == "left":
            q, m = left_pad(ids, tok.pad_token_id)
        else:
            width = max(len(s) for s in ids)
            q = torch.full((len(ids), width), tok.pad_token_id)
            m = torch.zeros((len(ids), width), dtype=torch.long)
            for i, s in enumerate(ids):
                q[i, : len(s)], m[i, : len(s)] = torch.tensor(s), 1
        out = model.generate(input_ids=q.to(device), attention_mask=m.to(device), **kw)
        return out[:, q.shape[1]:].tolist()

    # interleaved repeats, best time of each: the machine's noise hits all three alike
    fns = {"single": one_by_one, "right": lambda: batched("right"), "left": lambda: batched("left")}
    best, outs = {k: float("inf") for k in fns}, {}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            outs[k], t = timed(f)
            best[k] = min(best[k], t)
    ref, right, left = outs["single"], outs["right"], outs["left"]
    t_single, t_right, t_left = best["single"], best["right"], best["left"]
    tokens = batch * new_tokens
    return {
        "batch": batch, "new_tokens": new_tokens,
        "one_by_one_tokens_per_s": tokens / t_single, "right_padded_tokens_per_s": tokens / t_right,
        "left_padded_tokens_per_s": tokens / t_left, "left_vs_one_by_one_speedup": t_single / t_left,
        "right_vs_left_time_ratio": t_right / t_left,
        "rows_matching_one_by_one": {"left_padded": sum(a == b for a, b in zip(left, ref)) / batch,
                                     "right_padded": sum(a == b for a, b in zip(right, ref)) / batch},
    }


def write_pairs(path: Path, n: int) -> None:
    rng = random.Random(0)
    rows = [{"prompt": f"{rng.choice(PROMPTS)} ({i})", "chosen": " ".join(str(rng.randrange(100)) for _ in range(8)),
             "rejected": " ".join(rng.choice(["Good.", "Bad.", "Yes.", "No.", "Maybe."]) for _ in range(8))}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def bench_dpo(model_dir: str, work: Path, steps: int, batch: int, params: int) -> dict:
    from alignkit.rlhf.dpo import DPOStageConfig, train

    from alignkit.config import from_dict

    pairs = work / "pairs.jsonl"
    write_pairs(pairs, batch * (steps + 2) + 8)
    cfg = from_dict(DPOStageConfig, {
        "model": model_dir, "data": str(pairs), "output_dir": str(work / "dpo"), "eval_fraction": 0.05,
        "max_steps": steps, "batch_size": batch, "learning_rate": 1e-6, "eval_steps": 10_000, "save_steps": 10_000,
        "logging_steps": 10_000, "max_length": 256})
    m = train(cfg, force=True)["metrics"]
    pairs_per_s = m["train_pairs_per_second"]
    out = {"steps": steps, "batch": batch, "pairs_per_s": pairs_per_s}
    peak = peak_flops()
    if peak:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = [json.loads(x) for x in pairs.read_text().splitlines()]
        mean_tokens = sum(len(tok(r["prompt"] + r["chosen"])["input_ids"]) + len(tok(r["prompt"] + r["rejected"])["input_ids"])
                          for r in rows) / len(rows)  # both sequences of a pair (chat-template tokens not counted)
        out["mfu"] = (6 + 2) * params * mean_tokens * pairs_per_s / peak
    return out


PHASES = ["generation", "reward", "frozen_features", "old_logprobs", "ref_logprobs", "values", "advantages", "update"]
SAME_METRICS = ("score", "kl", "entropy", "pg_loss", "vf_loss", "response_length")


def ppo_child(tree: str, config: dict) -> None:
    """Run the PPO stage of the alignkit source tree ``tree`` (this checkout, or a git worktree of
    an older revision: its packages are mapped as pyproject.toml maps them)."""
    import importlib.util

    root = Path(tree)
    sys.path.insert(0, str(root))
    import alignkit

    for sub in ("sft", "reward", "rlhf", "annotation", "evals", "loop"):
        spec = importlib.util.spec_from_file_location(f"alignkit.{sub}", root / sub / "__init__.py",
                                                      submodule_search_locations=[str(root / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"alignkit.{sub}"] = module
        spec.loader.exec_module(module)
        setattr(alignkit, sub, module)
    assert Path(alignkit.__file__).resolve().is_relative_to(root.resolve())
    from alignkit.config import from_dict
    from alignkit.rlhf.ppo import PPOConfig, train

    train(from_dict(PPOConfig, config), force=True)


def ppo_run(tree: Path, config: dict) -> dict:
    """One PPO run in a fresh process; the per-step means of its metrics, the first step (warm-up) left out."""
    subprocess.run([sys.executable, __file__, "--ppo-child", str(tree), json.dumps(config)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()][1:]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
    mean["time/generation_s"] = sum(r["time/step_s"] * r["time/generation_share"] for r in rows) / len(rows)
    mean["time/other_s"] = mean["time/step_s"] - mean["time/generation_s"]
    return {"mean": mean, "rows": rows}


def bench_ppo(model_dir: str, work: Path, steps: int, batch: int, new_tokens: int, params: int, pairs: int,
              baseline: Path | None) -> dict:
    """PPO (rule reward) for ``steps`` timed steps, in fresh processes; with ``baseline`` (a source
    tree), interleaved A B, B A, ... against it at the same settings."""
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    trees = {"this tree": Path(__file__).resolve().parent.parent, **({"baseline": baseline} if baseline else {})}
    runs = {name: [] for name in trees}
    for i in range(pairs):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            config = {"model": model_dir, "reward_model": None, "reward_function": "alignkit.rlhf.rule_rewards:brevity",
                      "prompts": str(prompts), "output_dir": str(work / f"ppo-{name.replace(' ', '-')}-{i}"),
                      "total_steps": steps + 1, "save_steps": 10_000, "rollout_batch_size": batch,
                      "mini_batch_size": max(1, batch // 2), "ppo_epochs": 2, "max_new_tokens": new_tokens,
                      "learning_rate": 1e-6, "report_to": ["none"]}
            runs[name].append(ppo_run(trees[name], config))

    def median(name, key):
        return statistics.median(r["mean"][key] for r in runs[name] if key in r["mean"])

    this = runs["this tree"]
    out = {"steps": steps, "batch": batch, "max_new_tokens": new_tokens, "pairs": pairs,
           "step_s": median("this tree", "time/step_s"), "samples_per_s": batch / median("this tree", "time/step_s"),
           "generation_share": median("this tree", "time/generation_share"),
           "mean_response_tokens": median("this tree", "response_length"),
           "phases_s": {p: median("this tree", f"time/{p}_s") for p in PHASES if f"time/{p}_s" in this[0]["mean"]}}
    if baseline:
        out["baseline"] = {k: median("baseline", f"time/{k}_s") for k in ("step", "generation", "other")}
        out["other_ratio"] = median("this tree", "time/other_s") / out["baseline"]["other"]
        # same seeds, same settings: the two trees must train the same (float noise aside)
        out["max_metric_difference"] = {k: max(abs(a[k] - b[k]) for x, y in zip(this, runs["baseline"])
                                               for a, b in zip(x["rows"], y["rows"])) for k in SAME_METRICS}
    peak = peak_flops()
    if peak:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_tokens = sum(len(tok(p)["input_ids"]) for p in PROMPTS) / len(PROMPTS) + 10
        seq = prompt_tokens + out["mean_response_tokens"]
        flops = batch * params * (2 * out["mean_response_tokens"] + 3 * 2 * seq + 2 * 2 * 6 * seq)
        out["mfu"] = flops / out["step_s"] / peak
    return out


def worktree_at(rev: str, work: Path) -> Path:
    """A detached git worktree of this repository at ``rev`` (removed again by :func:`main`)."""
    root = Path(__file__).resolve().parent.parent
    tree = work / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    return tree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model dir, Hub id or offline:NAME (default: a tiny random model)")
    ap.add_argument("--steps", type=int, default=8, help="DPO optimiser steps and PPO steps to time")
    ap.add_argument("--batch", type=int, default=8, help="pairs per DPO step, prompts per PPO step and generation batch")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per reply")
    ap.add_argument("--only", choices=["generation", "dpo", "ppo"], action="append", help="run only these parts")
    ap.add_argument("--pairs", type=int, default=1, help="PPO runs (with --baseline: interleaved pairs); medians over them")
    ap.add_argument("--baseline", metavar="REV", help="also run PPO from this git revision, interleaved, and compare "
                                                      "the time of the phases other than generation")
    ap.add_argument("--ppo-child", nargs=2, metavar=("TREE", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ppo_child:
        ppo_child(args.ppo_child[0], json.loads(args.ppo_child[1]))
        return 0

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    from alignkit.models import build_tiny_model, resolve_model

    parts = args.only or ["generation", "dpo", "ppo"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = resolve_model(args.model) if args.model else str(build_tiny_model(work / "tiny"))
        params = n_params(model_dir)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        print(f"model: {args.model or 'tiny random Llama'} ({params / 1e6:.2f}M parameters) on {device}")
        results = {}
        if "generation" in parts:
            g = results["generation"] = bench_generation(model_dir, args.batch, args.new_tokens)
            print(f"generation, {g['batch']} prompts x {g['new_tokens']} tokens (greedy):\n"
                  f"  one by one       {g['one_by_one_tokens_per_s']:9.1f} tokens/s\n"
                  f"  right-padded     {g['right_padded_tokens_per_s']:9.1f} tokens/s  "
                  f"(rows equal to one-by-one: {g['rows_matching_one_by_one']['right_padded']:.0%})\n"
                  f"  left-padded      {g['left_padded_tokens_per_s']:9.1f} tokens/s  "
                  f"(rows equal to one-by-one: {g['rows_matching_one_by_one']['left_padded']:.0%})\n"
                  f"  left-padded batch vs one by one: {g['left_vs_one_by_one_speedup']:.2f}x faster; "
                  f"right-padded batch time / left-padded batch time: {g['right_vs_left_time_ratio']:.2f}")
        if "dpo" in parts:
            d = results["dpo"] = bench_dpo(model_dir, work, args.steps, args.batch, params)
            print(f"dpo: {d['pairs_per_s']:.2f} pairs/s ({d['steps']} steps of {d['batch']} pairs)"
                  + (f", MFU {d['mfu']:.1%}" if "mfu" in d else ""))
        if "ppo" in parts:
            baseline = worktree_at(args.baseline, work) if args.baseline else None
            try:
                p = results["ppo"] = bench_ppo(model_dir, work, args.steps, args.batch, args.new_tokens, params,
                                               args.pairs, baseline)
            finally:
                if baseline:
                    subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], check=False)
            print(f"ppo: {p['samples_per_s']:.2f} samples/s ({p['steps']} steps of {p['batch']} prompts, "
                  f"mean reply {p['mean_response_tokens']:.1f} tokens); generation {p['generation_share']:.0%} of step time"
                  + (f", MFU {p['mfu']:.1%}" if "mfu" in p else ""))
            print("ppo: seconds per step by phase (medians of the runs' means):")
            for phase, seconds in p["phases_s"].items():
                print(f"  {phase:16} {seconds:8.3f} s  {seconds / p['step_s']:6.1%}")
            if baseline:
                b = p["baseline"]
                print(f"ppo: baseline {args.baseline}: step {b['step']:.3f} s, generation {b['generation']:.3f} s, "
                      f"the rest {b['other']:.3f} s; this tree's rest / baseline's: {p['other_ratio']:.2f}x\n"
                      f"ppo: largest per-step metric difference from the baseline: "
                      + ", ".join(f"{k} {v:.2g}" for k, v in p["max_metric_difference"].items()))
        print(json.dumps(results, indent=2))
        record = {"date": time.strftime("%Y-%m-%d"), "model": args.model or "tiny", "device": device,
                  "baseline": args.baseline, **results}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
