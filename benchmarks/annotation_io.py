"""Annotation I/O benchmark: push and pull records/s (batched vs one at a time) against a real
Argilla, and agreement time on a synthetic 100,000 items x 5 annotators table.

    python benchmarks/annotation_io.py [--records 2000] [--single 200] [--settings 100x1,500x1,500x2,500x4]
                                       [--items 100000] [--annotators 5]

Uses ARGILLA_API_URL + ARGILLA_API_KEY when set, else starts a throwaway local server (its own state
dir, the shared server venv) and stops it at the end. Prints figures and the batched / one-at-a-time
ratios measured in this run (absolute times on shared machines are noisy; ratios less so), what
the push costs on the client side (building and encoding the records), and appends a JSON line to
benchmarks/results/annotation_io.jsonl.
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
RESULTS = Path(__file__).resolve().parent / "results" / "annotation_io.jsonl"
# bulk push settings timed by default: records per request x requests in flight
PUSH_SETTINGS = [(100, 1), (500, 1), (500, 2), (500, 4)]


def candidates(path: Path, n: int, prefix: str) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(40))
            f.write(json.dumps({"item_id": f"{prefix}-{i}", "prompt": f"Prompt {i}: say something.",
                                "responses": [f"A {words}", f"B {words}"]}) + "\n")


def bench_push(conn, tmp: Path, name: str, n: int, batch_size: int, in_flight: int = 1) -> float:
    from alignkit.annotation.datasets import PushConfig, push

    run = tmp / name
    (run / "candidates").mkdir(parents=True)
    candidates(run / "candidates" / "candidates.jsonl", n, name)
    m = push(PushConfig(run_dir=str(run), dataset=name, workspace="bench", batch_size=batch_size,
                        requests_in_flight=in_flight), conn=conn)
    assert m["metrics"]["n_created"] == n and m["metrics"]["n_records_on_server"] == n
    return m["metrics"]["records_per_s"]


def client_side_cost(tmp: Path, n: int) -> dict:
    """What the push does before the server sees a byte: building the records' payloads and
    encoding them as JSON, per record."""
    from alignkit.annotation.datasets import DatasetConfig, build_record, load_candidates

    candidates(tmp / "client.jsonl", n, "client")
    cands = load_candidates(tmp / "client.jsonl")
    t0 = time.perf_counter()
    records = [build_record(c, DatasetConfig(dataset="client")) for c in cands]
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    body = json.dumps({"items": records})
    t_json = time.perf_counter() - t0
    return {"build_records_per_s": n / t_build, "json_records_per_s": n / t_json, "bytes_per_record": len(body) / n}


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
    ap.add_argument("--settings", default=",".join(f"{b}x{f}" for b, f in PUSH_SETTINGS),
                    help="bulk push settings to time, BATCHxIN_FLIGHT (records per request x requests at once)")
    ap.add_argument("--items", type=int, default=100_000, help="items of the synthetic agreement table")
    ap.add_argument("--annotators", type=int, default=5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--skip-server", action="store_true", help="only the agreement benchmark")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")

    record: dict = {"date": time.strftime("%Y-%m-%d"), "records": args.records, "single": args.single}
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
                cost = client_side_cost(tmp, args.records)
                print(f"push  client side: records built at {cost['build_records_per_s']:,.0f}/s, JSON-encoded at "
                      f"{cost['json_records_per_s']:,.0f}/s, {cost['bytes_per_record']:.0f} bytes each")
                single = bench_push(conn, tmp, f"bench-single-{stamp}", args.single, 1)
                print(f"push  one at a time ({args.single} records):                  {single:8.1f} records/s")
                record["push"] = {"one_at_a_time": single, "client": cost, "batched": []}
                for setting in args.settings.split(","):
                    batch_size, in_flight = (int(x) for x in setting.split("x"))
                    rate = bench_push(conn, tmp, f"bench-b{batch_size}-f{in_flight}-{stamp}", args.records, batch_size,
                                      in_flight)
                    record["push"]["batched"].append({"batch_size": batch_size, "in_flight": in_flight, "records_per_s": rate})
                    print(f"push  {batch_size:3d}/request, {in_flight} in flight ({args.records} records): {rate:8.1f} "
                          f"records/s, {rate / single:5.1f}x one at a time")
                stamp_batched = f"bench-b{batch_size}-f{in_flight}-{stamp}"  # the last setting's: pulled below
                client = sdk_client(conn)
                users = [ensure_user(client, f"bench-ann-{i}", workspace="bench")[0] for i in range(3)]
                add_responses(conn, stamp_batched, users)
                add_responses(conn, f"bench-single-{stamp}", users)
                pb, rows_b = bench_pull(conn, tmp, stamp_batched, 1000)
                ps, rows_s = bench_pull(conn, tmp, f"bench-single-{stamp}", 1)
                print(f"pull  pages of 1000 ({args.records} records, {rows_b} rows):  {pb:8.1f} records/s")
                print(f"pull  pages of 1 ({args.single} records, {rows_s} rows):       {ps:8.1f} records/s")
                print(f"pull  ratio paged / one at a time:                   {pb / ps:8.1f}x")
                record["pull"] = {"paged": pb, "one_at_a_time": ps}
            finally:
                if cfg is not None:
                    server.down(cfg)

    r = bench_agreement(args.items, args.annotators, args.bootstrap)
    print(f"agreement {args.items} items x {args.annotators} annotators ({r['rows']} rows, {args.bootstrap} bootstrap): "
          f"{r['agreement_s']:.2f} s (building the rows {r['build_s']:.2f} s); kappa {r['kappa']:.3f} "
          f"CI [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    record["agreement"] = r
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
