"""Simulated annotators: a pool of noisy, biased judges who annotate through Argilla like people do.

    alignkit annotate simulate --config configs/annotate.yaml [KEY=VALUE ...]

As in AlpacaFarm, each simulated annotator is a judge plus its own imperfections:

* a **judge** scores every response in [0, 1]. The default, ``oracle``, is the demo's rule oracle
  (``alignkit.oracle``): it finds the verifiable constraint stated in the prompt ("Answer in at
  most 25 words.") and scores how well a response obeys it. Any ``module:function`` taking
  ``(prompt_text, response_text)`` and returning a float in [0, 1] (or a dict aspect -> float for
  multivariate ratings) can replace it, e.g. a reward model wrapped in a function.
* **flip_prob**: binary - the choice is flipped with this probability; ranking - each adjacent
  pair of the ranking is swapped with this probability; multivariate - a rating is replaced by a
  uniformly random one with this probability.
* **rating_noise**: standard deviation of Gaussian noise added to 1-5 ratings (and 1-4 strengths).
* **position_bias**: added to the perceived score of the first response shown (decreasing
  linearly to 0 for the last one): annotators who favour what they read first.
* **length_bias**: added in proportion to length (``length_bias * min(words / 100, 1)``):
  annotators who favour long answers.
* **tie_threshold** (binary with ``binary_tie``): when the two perceived scores differ by less than
  this, the annotator answers ``tie`` instead of picking one (flip noise then picks a response
  at random with probability ``flip_prob``). In a ranking, neighbours (after any flip) whose
  perceived scores differ by less than this share a rank.

Each annotator is a real Argilla user (``<user_prefix>1``, ``<user_prefix>2``, ...) created by the
owner and added to the workspace; it reads its API key the way an owner can
(``GET /api/v1/users/{id}``), lists its records with ``POST /api/v1/me/datasets/{id}/records/search``
and submits its answers with ``POST /api/v1/me/responses/bulk``, up to 100 a request: the
endpoints the web UI uses (the last one in its bulk view). A response the server refuses fails the
command after the others are stored. A record the annotator already answered is skipped, so running
simulate again is harmless. Every decision is seeded by (seed, annotator, record), so the same
config gives the same answers.

``<run_dir>/simulate/submissions.jsonl`` keeps what each annotator submitted and what its noise-free
self would have submitted (for studying the noise; annotators never see it).
"""

from __future__ import annotations

import importlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alignkit.annotation.argilla_client import ArgillaError, Http, ensure_user, sdk_client, user_api_key
from alignkit.annotation.datasets import TIE, DatasetConfig, get_dataset, slot
from alignkit.annotation.server import Connection, connect
from alignkit.config import ConfigError, doc, to_dict
from alignkit.runstore import stage_run, write_jsonl

log = logging.getLogger("alignkit.annotate.simulate")

NOISE_KEYS = ("flip_prob", "rating_noise", "position_bias", "length_bias", "tie_threshold")


@dataclass
class SimulateConfig(DatasetConfig):
    run_dir: str = doc("the annotation run directory; the manifest goes to <run_dir>/simulate", "runs/quickstart/annotate")
    annotators: int = doc("number of simulated annotators (users <user_prefix>1..N)", 3)
    user_prefix: str = doc("username prefix of the simulated annotators", "sim-annotator-")
    judge: str = doc("'oracle' (the demo's constraint oracle) or 'module:function' (prompt, response) -> float in [0,1] "
                     "or dict aspect -> float", "oracle")
    flip_prob: float = doc("probability of flipping a choice / swapping adjacent ranks / a random rating", 0.0)
    rating_noise: float = doc("std of Gaussian noise on 1-5 ratings", 0.0)
    position_bias: float = doc("score bonus of the first response shown (linearly less for later ones)", 0.0)
    length_bias: float = doc("score bonus per 100 words of response (capped at 100 words)", 0.0)
    tie_threshold: float = doc("binary_tie: answer 'tie' when the perceived scores differ by less than this; "
                               "ranking: give neighbours that differ by less than this the same rank", 0.01)
    pool: list[dict] = doc("per-annotator overrides, e.g. [{flip_prob: 0.3}, {length_bias: 0.2}] "
                           "(entry i applies to annotator i+1)", default_factory=list)
    max_records: int | None = doc("each annotator answers at most N records (None: all it is shown)", None)


@dataclass
class Annotator:
    username: str
    flip_prob: float = 0.0
    rating_noise: float = 0.0
    position_bias: float = 0.0
    length_bias: float = 0.0
    tie_threshold: float = 0.0


def build_pool(cfg: SimulateConfig) -> list[Annotator]:
    if len(cfg.pool) > cfg.annotators:
        raise ConfigError(f"pool has {len(cfg.pool)} entries for {cfg.annotators} annotators")
    pool = []
    for i in range(cfg.annotators):
        over = dict(cfg.pool[i]) if i < len(cfg.pool) else {}
        unknown = set(over) - set(NOISE_KEYS)
        if unknown:
            raise ConfigError(f"pool[{i}]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(NOISE_KEYS)}")
        params = {k: float(over.get(k, getattr(cfg, k))) for k in NOISE_KEYS}
        if not 0.0 <= params["flip_prob"] <= 1.0:
            raise ConfigError(f"annotator {i + 1}: flip_prob must be in [0, 1]")
        pool.append(Annotator(username=f"{cfg.user_prefix}{i + 1}", **params))
    return pool


def oracle_judge(prompt: str, response: str) -> float:
    """The demo's constraint oracle: how well ``response`` obeys the constraint the prompt states
    (0.5 for every response when the prompt states none: no opinion)."""
    from alignkit.oracle import constraint_score, find_constraint

    constraint = find_constraint(prompt)
    if constraint is None:
        return 0.5
    if response.strip() == "(empty response)":
        response = ""
    return constraint_score(response, constraint)


def load_judge(spec: str) -> Callable[[str, str], float | dict]:
    if spec == "oracle":
        return oracle_judge
    if ":" not in spec:
        raise ConfigError(f"judge: expected 'oracle' or 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ConfigError(f"judge: {spec!r} is not a function")
    return fn


def _words(text: str) -> int:
    return len(text.split())


def _aspect_scores(score, aspects) -> dict:
    if isinstance(score, dict):
        overall = sum(score.values()) / len(score) if score else 0.5
        return {a: float(score.get(a, overall)) for a in aspects}
    return {a: float(score) for a in aspects}


def decide(annot: Annotator, cfg: DatasetConfig, prompt: str, texts: list[str], scores: list,
           rng: random.Random | None) -> dict:
    """The values an annotator submits for one record (``rng=None``: its noise-free self).

    ``texts`` are the responses in display order; ``scores`` the judge's scores for them."""
    k = len(texts)
    aspects = cfg.aspects if cfg.mode == "multivariate" else ["overall"]
    per_aspect = [_aspect_scores(s, aspects) for s in scores]
    bias = [annot.position_bias * ((k - 1 - j) / (k - 1) if k > 1 else 1.0)
            + annot.length_bias * min(_words(t) / 100.0, 1.0) for j, t in enumerate(texts)]
    noisy = rng is not None
    if cfg.mode == "multivariate":
        values = {}
        for j in range(k):
            for a in aspects:
                x = 1 + 4 * min(max(per_aspect[j][a] + bias[j], 0.0), 1.0)
                if noisy and annot.rating_noise:
                    x += rng.gauss(0.0, annot.rating_noise)
                r = int(min(max(round(x), 1), 5))
                if noisy and annot.flip_prob and rng.random() < annot.flip_prob:
                    r = rng.randint(1, 5)
                values[f"{a}_{j + 1}"] = r
        return values
    overall = [sum(p.values()) / len(p) for p in per_aspect]
    u = [overall[j] + bias[j] for j in range(k)]
    order = sorted(range(k), key=lambda j: (-u[j], j))  # best first; ties -> the one shown first
    if noisy and annot.flip_prob:
        for i in range(k - 1):
            if rng.random() < annot.flip_prob:
                order[i], order[i + 1] = order[i + 1], order[i]
    if cfg.mode == "ranking" or cfg.binary_question == "ranking":
        q = "ranking" if cfg.mode == "ranking" else "preference"
        rank, ranks = 1, {}
        for pos, j in enumerate(order):  # neighbours that look equally good share a rank
            if pos and abs(u[order[pos - 1]] - u[j]) >= annot.tie_threshold:
                rank += 1
            ranks[j] = rank
        values = {q: [{"value": slot(j), "rank": ranks[j]} for j in order]}
    elif cfg.binary_tie and abs(u[0] - u[1]) < annot.tie_threshold:
        tie = not (noisy and annot.flip_prob and rng.random() < annot.flip_prob)
        values = {"preference": TIE if tie else slot(rng.randrange(2))}
    else:
        values = {"preference": slot(order[0])}
    if cfg.mode == "binary" and cfg.binary_strength:
        x = 1 + 3 * min(abs(u[0] - u[1]), 1.0)
        if noisy and annot.rating_noise:
            x += rng.gauss(0.0, annot.rating_noise)
        values["strength"] = int(min(max(round(x), 1), 4))
    return values


def annotator_records(http: Http, dataset_id, page: int = 200) -> list[dict]:
    """Records shown to the current user, with its own responses (the UI's search endpoint)."""
    body = {"sort": [{"scope": {"entity": "record", "property": "inserted_at"}, "order": "asc"},
                     {"scope": {"entity": "record", "property": "id"}, "order": "asc"}]}
    out, offset = [], 0
    while True:
        items = http.post(f"/api/v1/me/datasets/{dataset_id}/records/search",
                          params={"include": "responses", "offset": offset, "limit": page}, json=body)["items"]
        out.extend(it["record"] for it in items)
        if len(items) < page:
            return out
        offset += len(items)


BULK = 100  # the server's limit on responses per bulk request


def submit(http: Http, answers: list[tuple[str, dict]]) -> list[str | None]:
    """Submit ``(record_id, values)`` responses as the current user, up to BULK per request (the
    endpoint the UI's bulk view uses; far fewer round trips than one request per response). Returns
    the server's error for each answer, None where it was stored."""
    errors: list[str | None] = []
    for i in range(0, len(answers), BULK):
        items = [{"record_id": str(rid), "status": "submitted", "values": {q: {"value": v} for q, v in values.items()}}
                 for rid, values in answers[i:i + BULK]]
        for item in http.post("/api/v1/me/responses/bulk", retry=False, json={"items": items})["items"]:
            errors.append((item.get("error") or {}).get("detail") if item.get("item") is None else None)
    return errors


def simulate(cfg: SimulateConfig, conn: Connection | None = None) -> dict:
    cfg.check()
    pool = build_pool(cfg)
    judge = load_judge(cfg.judge)
    conn = conn or connect(cfg.server_home, start=False)
    owner_http = Http(conn)
    client = sdk_client(conn)
    ds = get_dataset(client, cfg)
    stage_dir = Path(cfg.run_dir) / "simulate"
    with stage_run("annotate-simulate", stage_dir, to_dict(cfg), {}, force=True) as run:
        log_rows, per_user, refused, t0 = [], {}, [], time.time()
        score_cache: dict[tuple[str, str], float | dict] = {}
        for annot in pool:
            user, _ = ensure_user(client, annot.username, role="annotator", workspace=cfg.workspace)
            http = Http(Connection(conn.url, user_api_key(owner_http, user.id)))
            me = http.get("/api/v1/me")["id"]
            records = annotator_records(http, ds.id)
            answers, rows, skipped = _answer(cfg, annot, records, me, judge, score_cache)
            errors = submit(http, answers)
            refused.extend((annot.username, row["record"], err) for row, err in zip(rows, errors) if err)
            log_rows.extend(row for row, err in zip(rows, errors) if not err)
            done = sum(1 for err in errors if not err)
            per_user[annot.username] = {"submitted": done, "already_answered": skipped, "shown": len(records),
                                        **{k: getattr(annot, k) for k in NOISE_KEYS}}
            log.info("simulate: %s submitted %d responses (%d already answered)", annot.username, done, skipped)
        path = stage_dir / "submissions.jsonl"
        previous = path.read_text().splitlines() if path.exists() else []
        write_jsonl(path, [json.loads(x) for x in previous if x.strip()] + log_rows)
        run.add_output("submissions", path)
        if refused:
            user, record, err = refused[0]
            raise ArgillaError(f"simulate: the server refused {len(refused)} responses (the others are stored), "
                               f"e.g. {user} on record {record}: {err}")
        elapsed = time.time() - t0
        n = sum(u["submitted"] for u in per_user.values())
        run.metrics.update({"n_submitted": n, "annotators": per_user,
                            "responses_per_s": n / elapsed if elapsed > 0 and n else None})
        run.notes.update({"dataset": cfg.name(), "workspace": cfg.workspace, "judge": cfg.judge})
        print(f"simulate: {len(pool)} annotators submitted {n} responses to {cfg.name()}")
    return run.manifest("completed")


def _answer(cfg: SimulateConfig, annot: Annotator, records: list[dict], me: str, judge, score_cache: dict):
    """What ``annot`` answers to the ``records`` it is shown (user id ``me``): (answers as
    ``(record id, values)``, log rows with the noise-free answers, records already answered)."""
    skipped = 0
    answers, rows = [], []
    for rec in records:
        if cfg.max_records is not None and len(answers) >= cfg.max_records:
            break
        if any(r.get("user_id") == me for r in rec.get("responses") or []):
            skipped += 1  # answered by a previous, interrupted run
            continue
        k = sum(1 for f in rec["fields"] if f.startswith("response_"))
        texts = [rec["fields"][slot(j)] for j in range(k)]
        prompt = rec["fields"]["prompt"]
        scores = []
        for t in texts:
            if (prompt, t) not in score_cache:
                score_cache[(prompt, t)] = judge(prompt, t)
            scores.append(score_cache[(prompt, t)])
        rng = random.Random(f"{cfg.seed}:{annot.username}:{rec['external_id']}")
        values = decide(annot, cfg, prompt, texts, scores, rng)
        answers.append((rec["id"], values))
        rows.append({"annotator": annot.username, "record": rec["external_id"], "values": values,
                     "noise_free": decide(annot, cfg, prompt, texts, scores, None)})
    return answers, rows, skipped
