"""Annotation I/O benchmark: push and pull records/s (batched vs one at a time) against a real
Argilla, and agreement time on a synthetic 100,000 items x 5 annotators table.

    python benchmarks/annotation_io.py [--records 2000] [--single 200] [--items 100000] [--annotators 5]

Uses ARGILLA_API_URL + ARGILLA_API_KEY when set, else starts a throwaway local server (its own state
dir, the shared server venv) and stops it at the end. Prints figures and the batched / one-at-a-time
ratios measured in this run (absolute times on shared machines are noisy; ratios less so).
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


def candidates(path: Path, n: int, prefix: str) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(40))
            f.write(json.dumps({"item_id": f"{prefix}-{i}", "prompt": f"Prompt {i}: say something.",
                                "responses": [f"A {words}", f"B {words}"]}) + "\n")


def bench_push(conn, tmp: Path, name: str, n: int, batch_size: int) -> float:
    from alignkit.annotation.datasets import PushConfig, push

    run = tmp / name
    (run / "candidates").mkdir(parents=True)
    candidates(run / "candidates" / "candidates.jsonl", n, name)
    m = push(PushConfig(run_dir=str(run), dataset=name, workspace="bench", batch_size=batch_size), conn=conn)
    assert m["metrics"]["n_created"] == n
    return m["metrics"]["records_per_s"]


def add_responses(conn, dataset: str, users: list) -> int:
    """Give every record of ``dataset`` a submitted answer from each user (one bulk upsert per 500 records,
    the owner writing responses on the users' behalf: fast set-up for the pull benchmark)."""
    from alignkit.annotation.argilla_client import Http, sdk_client
    from alignkit.annotation.datasets import DatasetConfig, get_dataset, list_records

    http = Http(conn)
    ds = get_dataset(sdk_client(conn), DatasetConfig(dataset=dataset, workspace="bench"))
    recs = list(list_records(http, ds.id))
    rng = random.Random(1)
    for s in range(0, len(recs), 500):
        items = [{"id": r["id"], "responses": [{"user_id": str(u.id), "status": "submitted",
                                                "values": {"preference": {"value": rng.choice(["response_1", "response_2"])}}}
                                               for u in users]} for r in recs[s : s + 500]]
        http.put(f"/api/v1/datasets/{ds.id}/records/bulk", json={"items": items})
    return len(recs) * len(users)


def bench_pull(conn, tmp: Path, dataset: str, page: int) -> tuple[float, int]:
    from alignkit.annotation.pull import PullConfig, pull

    out = tmp / f"pull-{dataset}-{page}"
    t0 = time.perf_counter()
    m = pull(PullConfig(run_dir=str(out), dataset=dataset, workspace="bench", page_size=page), conn=conn)
    dt = time.perf_counter() - t0
    return m["metrics"]["n_records"] / dt, m["metrics"]["n_rows_appended"]


def bench_agreement(n_items: int, n_ann: int, n_boot: int) -> dict:
    import numpy as np
    from alignkit.annotation.agreement import compute_agreement

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, n_items)
    flip = rng.random((n_items, n_ann)) < 0.2
    vals = np.where(flip, 1 - truth[:, None], truth[:, None])
    labels = np.array(["response_1", "response_2"])
    t0 = time.perf_counter()
    rows = [{"item_id": f"item-{i}", "annotator": f"ann-{a}", "question": "preference", "value": labels[vals[i, a]],
             "status": "submitted"} for i in range(n_items) for a in range(n_ann)]
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = compute_agreement(rows, n_bootstrap=n_boot, seed=0)
    t_agree = time.perf_counter() - t0
    q = res["questions"]["preference"]
    return {"rows": len(rows), "build_s": t_build, "agreement_s": t_agree, "kappa": q["fleiss_kappa"], "ci": q["ci"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000, help="records pushed / pulled in batches")
    ap.add_argument("--single", type=int, default=200, help="records pushed / pulled one at a time")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--items", type=int, default=100_000, help="items of the synthetic agreement table")
    ap.add_argument("--annotators", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--skip-server", action="store_true", help="only the agreement benchmark")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")

    if not args.skip_server:
        from alignkit.annotation import server
        from alignkit.annotation.argilla_client import ensure_user, sdk_client

        cfg = None
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            conn = server.named_server()  # ARGILLA_API_URL + ARGILLA_API_KEY, else a throwaway local server
            if conn is None:
                venv = Path(os.environ.get("ALIGNKIT_ARGILLA_VENV", "~/.cache/alignkit/argilla-venv")).expanduser()
                cfg = server.ServerConfig(home=tmp / "home", venv=venv, port=0, search_port=0, redis_port=0)
                t0 = time.perf_counter()
                conn = server.up(cfg)
                print(f"local Argilla server up in {time.perf_counter() - t0:.1f} s")
            try:
                stamp = str(int(time.time()))
                batched = bench_push(conn, tmp, f"bench-batched-{stamp}", args.records, args.batch_size)
                single = bench_push(conn, tmp, f"bench-single-{stamp}", args.single, 1)
                print(f"push  batched ({args.batch_size}/request, {args.records} records): {batched:8.1f} records/s")
                print(f"push  one at a time ({args.single} records):            {single:8.1f} records/s")
                print(f"push  ratio batched / one at a time:                 {batched / single:8.1f}x")
                client = sdk_client(conn)
                users = [ensure_user(client, f"bench-ann-{i}", workspace="bench")[0] for i in range(3)]
                add_responses(conn, f"bench-batched-{stamp}", users)
                add_responses(conn, f"bench-single-{stamp}", users)
                pb, rows_b = bench_pull(conn, tmp, f"bench-batched-{stamp}", 1000)
                ps, rows_s = bench_pull(conn, tmp, f"bench-single-{stamp}", 1)
                print(f"pull  pages of 1000 ({args.records} records, {rows_b} rows):  {pb:8.1f} records/s")
                print(f"pull  pages of 1 ({args.single} records, {rows_s} rows):       {ps:8.1f} records/s")
                print(f"pull  ratio paged / one at a time:                   {pb / ps:8.1f}x")
            finally:
                if cfg is not None:
                    server.down(cfg)

    r = bench_agreement(args.items, args.annotators, args.bootstrap)
    print(f"agreement {args.items} items x {args.annotators} annotators ({r['rows']} rows, {args.bootstrap} bootstrap): "
          f"{r['agreement_s']:.2f} s (building the rows {r['build_s']:.2f} s); kappa {r['kappa']:.3f} "
          f"CI [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
