"""Alignment throughput: DPO pairs/s, PPO samples/s and where PPO's time goes, batched generation.

Everything runs in this process, one after the other, on the same model, so the ratios compare
like with like on a noisy machine:

  generation   the same prompts, greedy, three ways: one prompt at a time (no padding), one
               RIGHT-padded batch, one LEFT-padded batch (what PPO does). Prints tokens/s, the
               speed-up of the left-padded batch over one-by-one, and how many rows of each batch
               reproduce the one-by-one output (right padding puts pad tokens between the prompt
               and the reply, so the model continues after padding: wrong replies, not only slow).
  dpo          the `alignkit align dpo` stage for --steps optimiser steps: pairs/s.
  ppo          the `alignkit align ppo` stage (rule reward) for --steps PPO steps: samples/s and
               the share of step time spent generating (OpenRLHF reports ~80% on GPUs).

On CUDA it also prints model FLOPs utilisation: DPO counts 6 x params x tokens for the policy's
forward + backward and 2 x params x tokens for the reference's forward; PPO counts generation
(2 x params per token), the rollout forwards (policy, reference, value: 3 x 2 x params per token)
and the updates (ppo_epochs x 2 models x 6 x params per token), over the GPU's peak bf16 FLOP/s.

  python benchmarks/align_throughput.py                         # tiny model (CPU-friendly)
  python benchmarks/align_throughput.py --model offline:smollm2-135m-instruct --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import peak_flops  # noqa: E402  (benchmarks/common.py)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


def bench_ppo(model_dir: str, work: Path, steps: int, batch: int, new_tokens: int, params: int) -> dict:
    from alignkit.rlhf.ppo import PPOConfig, read_metrics, train

    from alignkit.config import from_dict

    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    cfg = from_dict(PPOConfig, {
        "model": model_dir, "reward_model": None, "reward_function": "alignkit.rlhf.rule_rewards:brevity",
        "prompts": str(prompts), "output_dir": str(work / "ppo"), "total_steps": steps + 1, "save_steps": 10_000,
        "rollout_batch_size": batch, "mini_batch_size": max(1, batch // 2), "ppo_epochs": 2,
        "max_new_tokens": new_tokens, "learning_rate": 1e-6, "tensorboard": False})
    train(cfg, force=True)
    rows = read_metrics(work / "ppo")[1:]  # the first step pays for warm-up
    step_s = sum(r["time/step_s"] for r in rows) / len(rows)
    out = {"steps": len(rows), "batch": batch, "max_new_tokens": new_tokens, "samples_per_s": batch / step_s,
           "generation_share": sum(r["time/generation_share"] for r in rows) / len(rows),
           "mean_response_tokens": sum(r["response_length"] for r in rows) / len(rows)}
    peak = peak_flops()
    if peak:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_tokens = sum(len(tok(p)["input_ids"]) for p in PROMPTS) / len(PROMPTS) + 10
        seq = prompt_tokens + out["mean_response_tokens"]
        flops = batch * params * (2 * out["mean_response_tokens"] + 3 * 2 * seq + cfg.ppo_epochs * 2 * 6 * seq)
        out["mfu"] = flops / step_s / peak
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model dir, Hub id or offline:NAME (default: a tiny random model)")
    ap.add_argument("--steps", type=int, default=8, help="DPO optimiser steps and PPO steps to time")
    ap.add_argument("--batch", type=int, default=8, help="pairs per DPO step, prompts per PPO step and generation batch")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per reply")
    ap.add_argument("--only", choices=["generation", "dpo", "ppo"], action="append", help="run only these parts")
    args = ap.parse_args()

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
            p = results["ppo"] = bench_ppo(model_dir, work, args.steps, args.batch, args.new_tokens, params)
            print(f"ppo: {p['samples_per_s']:.2f} samples/s ({p['steps']} steps of {p['batch']} prompts, "
                  f"mean reply {p['mean_response_tokens']:.1f} tokens); generation {p['generation_share']:.0%} of step time"
                  + (f", MFU {p['mfu']:.1%}" if "mfu" in p else ""))
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
