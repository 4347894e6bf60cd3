"""The reward stage with and without the frozen-block feature cache (``cache_frozen_features``),
interleaved A B A B in one run, on the same pairs, model and settings: wall time of the whole
stage (the cache's one-off prefill included), the ratio of medians, and the final held-out
accuracy and loss of each (they must agree: the cache is exact).

    python benchmarks/reward_feature_cache.py                                  # tiny 4-block model
    python benchmarks/reward_feature_cache.py --model offline:smollm2-135m-instruct --pairs 48 \\
        --trainable-layers 10 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pairs(n: int) -> list[dict]:
    topics = ["the sea", "a mountain", "the city at night", "bread", "a bicycle", "rain", "the moon", "a library"]
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        good = f"Here are a few lines about {topic}, kept short and clear as asked, with one concrete detail."
        bad = f"{topic} {topic} {topic}. I do not know what to say about {topic}, sorry, maybe ask again later."
        out.append({"prompt": f"Write two sentences about {topic} (request {i}).", "chosen": good, "rejected": bad})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="backbone (default: a tiny random 4-block Llama built here)")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--trainable-layers", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs (interleaved)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from alignkit.config import from_dict
    from alignkit.models import build_tiny_model
    from alignkit.reward.train import RewardTrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="rm-cache-bench-"))
    model = args.model or str(build_tiny_model(work / "tiny", num_layers=4))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs(args.pairs)))
    times = {"plain": [], "cached": []}
    results = {}
    for rep in range(args.repeats):
        for name in (("plain", "cached") if rep % 2 == 0 else ("cached", "plain")):
            cfg = from_dict(RewardTrainConfig, {
                "model": model, "data": str(data), "output_dir": str(work / f"{name}-{rep}"),
                "trainable_layers": args.trainable_layers, "epochs": args.epochs, "batch_size": args.batch_size,
                "eval_fraction": 0.25, "save_steps": 100000, "eval_steps": 100000, "learning_rate": 1e-4,
                "max_length": 256, "cache_frozen_features": name == "cached", "report_to": []})
            t0 = time.perf_counter()
            manifest = train(cfg)
            times[name].append(time.perf_counter() - t0)
            results[name] = manifest["metrics"]
            print(f"{name:7} run {rep}: {times[name][-1]:.1f} s", flush=True)
    plain, cached = statistics.median(times["plain"]), statistics.median(times["cached"])
    print(f"\nmedian wall time: plain {plain:.1f} s, cached {cached:.1f} s; speed-up {plain / cached:.2f}x")
    for key in ("eval_accuracy_after", "eval_loss_after", "train_loss"):
        a, b = results["plain"].get(key), results["cached"].get(key)
        if a is not None:
            print(f"{key}: plain {a:.6f}, cached {b:.6f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    with open(out / "reward_feature_cache.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": args.model or "tiny-4",
                            "pairs": args.pairs, "trainable_layers": args.trainable_layers, "epochs": args.epochs,
                            "plain_s": times["plain"], "cached_s": times["cached"], "speedup": plain / cached}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
