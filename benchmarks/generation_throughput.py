"""Generation throughput: left-padded batches vs one prompt at a time (``alignkit.generation``).

Two workloads, each measured both ways in this process, one after the other, so the ratio
compares like with like on a noisy machine:

  eval-style       greedy, one reply per prompt (what ``alignkit eval`` does)
  candidate-style  k sampled replies per prompt (what candidate generation for annotation does):
                   batched = ``num_return_sequences=k`` over batches of prompts;
                   one at a time = one call per (prompt, sample)

and, for the candidate-style batches, the prompt read once and its cache repeated k times
(``alignkit.generation.generate_sharing_prompts``, what alignkit does) against transformers' own
expansion, which encodes each prompt k times. Both draw the same replies.

Throughput is useful tokens per second: generated tokens up to and including EOS, never the
padding that finished rows keep producing while the rest of their batch runs. On CUDA it also
prints model FLOPs utilisation: 2 x parameters x (real prompt + generated tokens) per second over
the GPU's peak bf16 FLOP/s (forward passes only; attention FLOPs are left out, so it is a floor).

Then data parallelism: the candidate stage (``alignkit annotate generate``) run as one process and
as ``--processes`` processes under torchrun, interleaved (1, N, 1, N, ...; ``--repeats`` pairs),
on the same cores (on CPU one process gets all ``--cores`` threads, N processes one share each; on
GPUs torchrun gives each process its own GPU). It prints
the median wall times (process start and model load included: what a user waits for), the
speed-up, and checks that both wrote the same candidates file. Every run appends a line to
benchmarks/results/generation_throughput.jsonl.

  python benchmarks/generation_throughput.py                                   # tiny model
  python benchmarks/generation_throughput.py --model offline:smollm2-135m-instruct --prompts 8 --max-new-tokens 24
  python benchmarks/generation_throughput.py --model offline:smollm2-135m-instruct --only-processes --prompts 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import peak_flops  # noqa: E402  (benchmarks/common.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(model, tok, prompts, n_params: int, prompt_read_per_reply: bool = False, **kwargs) -> dict:
    from alignkit.generation import generate

    t0 = time.perf_counter()
    out = generate(model, tok, prompts, **kwargs)
    wall = time.perf_counter() - t0
    k = 1 if prompt_read_per_reply else kwargs.get("num_return_sequences", 1)
    prompt_tokens = sum(len(p) for p in out.prompt_ids[::k])  # prompt tokens the model actually read
    tokens = out.generated_tokens
    row = {"replies": len(out.texts), "generated_tokens": tokens, "seconds": round(out.seconds, 3),
           "tokens_per_s": tokens / out.seconds, "wall_s": round(wall, 3), "finished": sum(out.finished)}
    peak = peak_flops()
    if peak:
        row["mfu"] = 2 * n_params * (prompt_tokens + tokens) / out.seconds / peak
    return row


@contextlib.contextmanager
def prompts_expanded_by_transformers():
    """Route ``alignkit.generation.generate`` through plain ``model.generate`` (each prompt encoded k times)."""
    import alignkit.generation as gen

    shared = gen.generate_sharing_prompts
    gen.generate_sharing_prompts = lambda model, ids, mask, config: model.generate(
        input_ids=ids, attention_mask=mask, generation_config=config)
    try:
        yield
    finally:
        gen.generate_sharing_prompts = shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir, offline:NAME or Hub id (default: a tiny random model)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts from the demo set")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per batch in batched mode")
    ap.add_argument("--k", type=int, default=4, help="sampled replies per prompt, candidate-style")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared, oversubscribed CPU 1 is often steadier)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--processes", type=int, default=2, help="processes for the data-parallel comparison (0: skip it)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved (1 process, N processes) pairs")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared out among the processes")
    ap.add_argument("--only-processes", action="store_true", help="run only the data-parallel comparison")
    args = ap.parse_args()

    import torch

    from alignkit.models import build_tiny_model, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    model_name = args.model
    if model_name is None:
        tmp = tempfile.TemporaryDirectory()
        model_name = str(build_tiny_model(Path(tmp.name) / "tiny"))
    model_name = resolve_model(model_name)  # offline:NAME fetched once, here, not in every timed run
    figures, ratios = {}, {}
    if not args.only_processes:
        figures, ratios = single_process(args, model_name)
    if args.processes > 1:
        figures["data_parallel"] = data_parallel(args, model_name)
        ratios["processes_over_one"] = figures["data_parallel"]["speedup"]
    import torch

    line = {"model": args.model or "tiny", "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "figures": figures, "ratios": ratios, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results = Path(__file__).resolve().parent / "results" / "generation_throughput.jsonl"
    results.parent.mkdir(exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(line, indent=2))
    if tmp:
        tmp.cleanup()


def single_process(args, model_name: str) -> tuple[dict, dict]:
    """Batched vs one at a time, and the prompt read once vs k times, in this process."""
    import torch

    from alignkit.data import DEMO_DATA, load_prompts
    from alignkit.generation import generate, load_policy

    model, tok = load_policy(model_name, device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [p["prompt"] for p in load_prompts(DEMO_DATA)[: args.prompts]]
    device = next(model.parameters()).device
    print(f"model {args.model or 'tiny (random, 2 layers, hidden 64)'}: {n_params / 1e6:.2f}M parameters on {device} "
          f"({next(model.parameters()).dtype}), torch threads {torch.get_num_threads()}")
    print(f"{len(prompts)} prompts, max {args.max_new_tokens} new tokens, batch {args.batch_size}, k {args.k}")
    for bs in (args.batch_size, 1):  # warm-up: the first call at a new batch shape pays one-off costs
        generate(model, tok, prompts[:bs], max_new_tokens=4, batch_size=bs)

    common = dict(max_new_tokens=args.max_new_tokens, seed=0)
    figures: dict = {}
    figures["eval_batched"] = measure(model, tok, prompts, n_params, batch_size=args.batch_size, **common)
    figures["eval_one_at_a_time"] = measure(model, tok, prompts, n_params, batch_size=1, **common)
    sample = dict(do_sample=True, temperature=1.0, **common)
    figures["candidates_batched"] = measure(model, tok, prompts, n_params, batch_size=max(1, args.batch_size // args.k),
                                            num_return_sequences=args.k, **sample)
    with prompts_expanded_by_transformers():
        figures["candidates_batched_prompt_read_k_times"] = measure(
            model, tok, prompts, n_params, prompt_read_per_reply=True, batch_size=max(1, args.batch_size // args.k),
            num_return_sequences=args.k, **sample)
    repeated = [p for p in prompts for _ in range(args.k)]
    figures["candidates_one_at_a_time"] = measure(model, tok, repeated, n_params, batch_size=1, **sample)

    print(f"\n{'workload':<40}{'replies':>8}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}" + ("   MFU" if peak_flops() else ""))
    for name, r in figures.items():
        line = f"{name:<40}{r['replies']:>8}{r['generated_tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.1f}"
        if "mfu" in r:
            line += f"  {100 * r['mfu']:.2f}%"
        print(line)
    ratios = {
        "eval_batched_over_one_at_a_time": figures["eval_batched"]["tokens_per_s"] / figures["eval_one_at_a_time"]["tokens_per_s"],
        "candidates_batched_over_one_at_a_time": figures["candidates_batched"]["tokens_per_s"]
        / figures["candidates_one_at_a_time"]["tokens_per_s"],
        "candidates_prompt_read_once_over_k_times": figures["candidates_batched"]["tokens_per_s"]
        / figures["candidates_batched_prompt_read_k_times"]["tokens_per_s"],
    }
    print(f"\nbatched / one-at-a-time tokens/s: eval-style {ratios['eval_batched_over_one_at_a_time']:.2f}x, "
          f"candidate-style {ratios['candidates_batched_over_one_at_a_time']:.2f}x")
    print(f"candidate-style batches, prompt read once / read k times: {ratios['candidates_prompt_read_once_over_k_times']:.2f}x")
    return figures, ratios


def data_parallel(args, model_name: str) -> dict:
    """The candidate stage as 1 process and as N (torchrun), interleaved; same output checked."""
    import statistics
    import subprocess

    from alignkit.data import DEMO_DATA, load_prompts

    n = args.processes
    work = Path(tempfile.mkdtemp(prefix="dp_bench_"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in load_prompts(DEMO_DATA)[: args.prompts]))
    root = Path(__file__).resolve().parent.parent
    walls: dict[int, list[float]] = {1: [], n: []}
    outputs = {}
    for rep in range(args.repeats):
        for procs in (1, n):
            run_dir = work / f"p{procs}-{rep}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   "-m", "alignkit.cli", "annotate", "generate", f"run_dir={run_dir}", f"model={model_name}",
                   f"prompts={prompts}", f"k={args.k}", f"max_new_tokens={args.max_new_tokens}",
                   f"batch_size={max(1, args.batch_size // args.k)}"]
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(max(1, args.cores // procs))}
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            walls[procs].append(time.perf_counter() - t0)
            outputs[procs] = (run_dir / "candidates" / "candidates.jsonl").read_text()
    one, many = statistics.median(walls[1]), statistics.median(walls[n])
    same = outputs[1] == outputs[n]
    shutil.rmtree(work, ignore_errors=True)
    print(f"\ncandidate stage, {args.prompts} prompts x k {args.k}, {args.cores} cores: 1 process {one:.1f} s, "
          f"{n} processes {many:.1f} s (medians of {args.repeats}, interleaved) -> {one / many:.2f}x; "
          f"same candidates file: {same}")
    return {"processes": n, "cores": args.cores, "prompts": args.prompts, "k": args.k, "wall_s_one": walls[1],
            "wall_s_many": walls[n], "speedup": one / many, "same_output": same}


if __name__ == "__main__":
    main()
