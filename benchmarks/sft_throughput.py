"""SFT packing: packed against padded batches, through the SFT stage, on data of real lengths.

Both runs are ``alignkit sft`` with the same model, data, batch size, steps and length limit, one
with ``packing=true`` (TRL's best-fit-decreasing packing: the examples of a batch are laid end to
end in one row, padding-free, with position ids restarting at each example) and one without
(each batch padded to its longest example). Each runs in a fresh process, interleaved A B, B A,
..., and the script prints the medians of training tokens/s (real tokens, not padding) and the
ratio packed / padded, and appends a JSON line to ``benchmarks/results/sft_throughput.jsonl``.

Whether packing pays depends on the attention kernel: with a variable-length kernel (flash
attention) each example attends only within itself; with a dense one (sdpa or eager, all that
runs on CPU) the packed row gets a block-diagonal mask over its whole length, so attention costs
grow with the square of the row. docs/foundation.md gives the figures measured here.

Data: alpaca_libre from ``../shared/data`` when it is there (lengths from a few tokens to
hundreds), else the shipped demo instructions (short, similar lengths).

  python benchmarks/sft_throughput.py                                         # tiny model
  python benchmarks/sft_throughput.py --model offline:smollm2-135m-instruct --pairs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_overhead import SHARED, alignkit_stage, write_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sft_throughput.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name or dir (default: a tiny model built here)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved A/B pairs (medians over them)")
    args = ap.parse_args()

    from alignkit.models import build_tiny_model, resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="sft_packing_"))
    model_path = resolve_model(args.model) if args.model else str(build_tiny_model(tmp / "tiny", hidden_size=128))
    # packing fits several examples in a row: give it enough of them for every step
    n_rows = 4 * args.steps * args.batch_size
    data = tmp / "sft.jsonl"
    write_data("sft", data, n_rows)
    print(f"model {args.model or 'tiny (built here)'}; {args.steps} steps x batch {args.batch_size}; max_length "
          f"{args.max_length}; data from {'alpaca_libre' if SHARED.exists() else 'the demo'}")
    runs: dict[str, list[dict]] = {"padded": [], "packed": []}
    for i in range(args.pairs):
        for name in (["padded", "packed"] if i % 2 == 0 else ["packed", "padded"]):
            r = alignkit_stage("sft", model_path, str(data), tmp / f"{name}-{i}", args, packing=name == "packed")
            r["tps"] = r["tokens"] / r["train_s"]
            runs[name].append(r)
            print(f"  {name:6} pair {i}: {r['tps']:8.0f} tokens/s ({int(r['tokens'])} tokens in {r['train_s']:.1f} s)", flush=True)
    med = {name: statistics.median(r["tps"] for r in rs) for name, rs in runs.items()}
    ratio = med["packed"] / med["padded"]
    print(f"medians: padded {med['padded']:.0f} tokens/s, packed {med['packed']:.0f} tokens/s; packed / padded {ratio:.2f}x")
    import torch

    record = {"date": time.strftime("%Y-%m-%d"), "model": args.model or "tiny", "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "pairs": args.pairs,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "data": "alpaca_libre" if SHARED.exists() else "demo", "tokens_per_s": med,
              "packed_over_padded": ratio, "runs": runs}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
