"""Pull annotations from Argilla as a long-format table, incrementally.

    alignkit annotate pull --config configs/annotate.yaml [KEY=VALUE ...]

Writes ``<run_dir>/pull/``:

``annotations.jsonl``  one row per record x annotator x question:
                       ``item_id, annotator, question, value, status, updated_at`` (+ ``record_id``,
                       the Argilla external id). ``value``: a label (``response_2``), a rating (4),
                       or for ranking questions the slots from best to worst
                       (``["response_2", "response_1", "response_3"]``). Slots are display
                       positions; ``records.jsonl`` maps them back to the candidates.
``annotations.csv``    the same rows (``format: csv`` or ``both``); lists are JSON in the cell.
``records.jsonl``      every record: external id, item id, permutation, status (rewritten each pull).
``manifest.json``      counts, last ``updated_at`` seen.

Incremental and resumable: the key set (record, annotator, question) -> (updated_at, value) is
rebuilt from ``annotations.jsonl`` at the start of each pull, and only responses that are new or
changed since are appended. A pull cut off half-way leaves whole lines behind (a torn last line
is trimmed); running it again appends the rest. A changed answer is appended as a new row with a
later ``updated_at``: readers keep the latest row per key (``alignkit.annotation.agreement`` does, and so
does ``export``).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.annotation.argilla_client import Http, sdk_client, user_names
from alignkit.annotation.datasets import DatasetConfig, get_dataset, list_records
from alignkit.annotation.server import Connection, connect
from alignkit.config import ConfigError, doc, to_dict
from alignkit.runstore import stage_run, write_jsonl

log = logging.getLogger("alignkit.annotate.pull")

COLUMNS = ("item_id", "annotator", "question", "value", "status", "updated_at", "record_id")


@dataclass
class PullConfig(DatasetConfig):
    run_dir: str = doc("the annotation run directory; outputs go to <run_dir>/pull", "runs/quickstart/annotate")
    output_dir: str | None = doc("default <run_dir>/pull", None)
    format: str = doc("jsonl, csv or both (JSONL is always written: it is the resume state)", "jsonl")
    statuses: list[str] = doc("response statuses to pull: submitted, draft, discarded", default_factory=lambda: ["submitted"])
    page_size: int = doc("records per request (at most 1000)", 1000)

    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.run_dir) / "pull"


def response_value(value):
    """An Argilla answer -> a table value. A rank list becomes its slots ordered best first; slots
    that share a rank (Argilla accepts equal ranks) stay together as one inner list, a tie:
    ``[{"value": "response_1", "rank": 1}, {"value": "response_2", "rank": 1}]`` ->
    ``[["response_1", "response_2"]]``. Unranked slots tie last."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "rank" in v for v in value):
        ordered = sorted(value, key=lambda v: (v["rank"] if v["rank"] is not None else 1e9, v["value"]))
        groups = [[v["value"] for v in group] for _, group in itertools.groupby(ordered, key=lambda v: v["rank"])]
        return [group[0] if len(group) == 1 else group for group in groups]
    return value


def _key(row: dict) -> tuple:
    return (row["record_id"], row["annotator"], row["question"])


def read_table(path: Path) -> list[dict]:
    """Rows of annotations.jsonl; a torn last line (an interrupted pull) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def latest(rows: list[dict]) -> dict[tuple, dict]:
    """The latest row per (record, annotator, question)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        k = _key(r)
        if k not in out or str(r.get("updated_at") or "") >= str(out[k].get("updated_at") or ""):
            out[k] = r
    return out


def pull(cfg: PullConfig, conn: Connection | None = None) -> dict:
    if cfg.format not in ("jsonl", "csv", "both"):
        raise ConfigError(f"format: expected jsonl, csv or both, got {cfg.format!r}")
    conn = conn or connect(cfg.server_home, start=False)
    client = sdk_client(conn)
    ds = get_dataset(client, cfg)
    http = Http(conn)
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    table = out / "annotations.jsonl"
    with stage_run("annotate-pull", out, to_dict(cfg), {}, force=True) as run:
        t0 = time.time()
        known = latest(read_table(table))
        names = user_names(http)
        records, new_rows, n_responses = [], [], 0
        for rec in list_records(http, ds.id, include_responses=True, page=min(cfg.page_size, 1000)):
            meta = rec.get("metadata") or {}
            item_id = meta.get("item_id", rec["external_id"])
            records.append({"record_id": rec["external_id"], "argilla_id": rec["id"], "item_id": item_id,
                            "permutation": meta.get("permutation"), "mode": meta.get("alignkit_mode"),
                            "content_hash": meta.get("content_hash"), "status": rec.get("status"),
                            "n_responses": len(rec.get("responses") or [])})
            for resp in rec.get("responses") or []:
                n_responses += 1
                if resp["status"] not in cfg.statuses:
                    continue
                annotator = names.get(resp["user_id"], resp["user_id"])
                for question, answer in (resp.get("values") or {}).items():
                    row = {"item_id": item_id, "annotator": annotator, "question": question,
                           "value": response_value(answer.get("value")), "status": resp["status"],
                           "updated_at": resp["updated_at"], "record_id": rec["external_id"]}
                    old = known.get(_key(row))
                    if old and old.get("updated_at") == row["updated_at"] and old.get("value") == row["value"] \
                            and old.get("status") == row["status"]:
                        continue
                    known[_key(row)] = row
                    new_rows.append(row)
        with open(table, "a", encoding="utf-8") as f:  # append whole lines, then make them durable
            for row in new_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_jsonl(out / "records.jsonl", records)
        if cfg.format in ("csv", "both"):
            _append_csv(out / "annotations.csv", new_rows)
            run.add_output("annotations_csv", out / "annotations.csv")
        run.add_output("annotations", table)
        run.add_output("records", out / "records.jsonl")
        elapsed = time.time() - t0
        last = max((r["updated_at"] for r in known.values()), default=None)
        run.metrics.update({
            "n_records": len(records), "n_records_completed": sum(r["status"] == "completed" for r in records),
            "n_responses_on_server": n_responses, "n_rows_appended": len(new_rows), "n_rows_total_latest": len(known),
            "n_annotators": len({r["annotator"] for r in known.values()}), "last_updated_at": last,
            "seconds": round(elapsed, 3),
        })
        run.notes.update({"dataset": cfg.name(), "dataset_id": str(ds.id), "workspace": cfg.workspace})
        print(f"pull: {len(new_rows)} new/changed rows appended to {table} ({len(records)} records, "
              f"{run.metrics['n_records_completed']} completed)")
    return run.manifest("completed")


def _append_csv(path: Path, rows: list[dict]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "value": json.dumps(r["value"]) if isinstance(r["value"], (list, dict)) else r["value"]})
        f.flush()
        os.fsync(f.fileno())
