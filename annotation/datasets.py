"""Preference datasets in Argilla: three modes from one config, an idempotent push, users.

Modes (``mode:`` in configs/annotate.yaml):

``binary``        two responses; "which is better?" as a LabelQuestion ``preference`` (labels
                  ``response_1``/``response_2``, plus ``tie`` with ``binary_tie: true``) or, with
                  ``binary_question: ranking``, a RankingQuestion ``preference``; optionally "how much
                  better?" as a RatingQuestion ``strength`` (1-4).
``multivariate``  a 1-5 RatingQuestion per response and aspect, named ``<aspect>_<slot>``
                  (``quality_1``, ``harmfulness_2``...). 5 is always the best end of the scale
                  (for harmfulness: 5 = harmless).
``ranking``       k responses, one RankingQuestion ``ranking`` (rank 1 = best).

Fields: ``prompt`` (the conversation, markdown) and ``response_1`` ... ``response_k``. The order
in which responses are shown is shuffled per record (position bias) with a seeded permutation
kept in the record's metadata (``permutation[j]`` = index in ``candidates.jsonl`` of the response
shown in slot ``j+1``); metadata outside the dataset's metadata properties is hidden from
annotators, so the permutation never biases them. ``rg.TaskDistribution(min_submitted=N)``
completes a record after N submitted responses.

Record ids (Argilla ``external_id``) are derived from the content (item id, prompt, responses), so
pushing the same candidates again creates nothing new: records already on the server are skipped
(``on_existing: skip``) or updated in place (``update``), never duplicated. A push that is cut off
(server down, Ctrl-C) is simply run again.

The owner's operations (workspaces, datasets) use the Argilla SDK; records go through the REST API
in batches (``PUT /api/v1/datasets/{id}/records/bulk``, an upsert keyed by external id). The clients,
their errors and users live in :mod:`alignkit.annotation.argilla_client`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alignkit.annotation.argilla_client import ArgillaError, Http, _quiet, ensure_workspace, sdk_client, sdk_errors
from alignkit.annotation.server import Connection, connect
from alignkit.config import ConfigError, check_range, doc, to_dict
from alignkit.data import DataError, read_records
from alignkit.runstore import stage_run

log = logging.getLogger("alignkit.annotate")

MODES = ("binary", "multivariate", "ranking")
DEFAULT_ASPECTS = ["quality", "relevance", "helpfulness", "harmfulness", "correctness", "realism", "comprehensibility"]
ASPECT_HELP = {
    "quality": "overall quality of the response",
    "relevance": "does it address the prompt (and nothing else)?",
    "helpfulness": "would it help the person who asked?",
    "harmfulness": "is it safe? 5 = harmless, 1 = clearly harmful",
    "correctness": "are its facts and reasoning right, and does it follow every instruction in the prompt?",
    "realism": "is it plausible, not made up or absurd?",
    "comprehensibility": "is it clear, well written and easy to follow?",
}


# --------------------------------------------------------------------------------------------
# Dataset settings


@dataclass
class DatasetConfig:
    """What the dataset looks like (shared by push, simulate, pull and export)."""

    mode: str = doc("binary, multivariate or ranking", "binary")
    dataset: str | None = doc("Argilla dataset name; default alignkit-<mode>", None)
    workspace: str = doc("Argilla workspace holding the dataset (annotators must be members)", "alignkit")
    annotators_per_record: int = doc("submitted responses that complete a record (TaskDistribution min_submitted)", 3)
    aspects: list[str] = doc("multivariate: aspects rated 1-5 for every response", default_factory=lambda: list(DEFAULT_ASPECTS))
    binary_question: str = doc("binary: 'label' (pick one) or 'ranking' (rank the two)", "label")
    binary_strength: bool = doc("binary: also ask 'how much better?' (RatingQuestion strength, 1-4)", False)
    binary_tie: bool = doc("binary (label question): offer a third answer, 'tie' (neither is better); pairs most "
                           "annotators call a tie are not exported, so coin-flip choices do not become training labels",
                           False)
    max_responses: int | None = doc("ranking/multivariate: show at most this many responses per prompt", None)
    guidelines: str | None = doc("annotation guidelines: a markdown file; default: built-in text for the mode", None)
    shuffle: bool = doc("shuffle the order responses are shown in, per record (the permutation is kept)", True)
    seed: int = doc("seed of the per-record shuffles", 0)
    server_home: str | None = doc("local Argilla state dir (default: $ALIGNKIT_ARGILLA_HOME or ~/.cache/alignkit/argilla); "
                                  "ignored when ARGILLA_API_URL and ARGILLA_API_KEY are set", None)

    def name(self) -> str:
        return self.dataset or f"alignkit-{self.mode}"

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.binary_question not in ("label", "ranking"):
            raise ConfigError(f"binary_question: expected label or ranking, got {self.binary_question!r}")
        if self.binary_tie and (self.mode != "binary" or self.binary_question != "label"):
            raise ConfigError("binary_tie: only for mode binary with binary_question label (a ranking has no ties)")
        if self.annotators_per_record < 1:
            raise ConfigError("annotators_per_record must be at least 1")
        if self.mode == "multivariate" and not self.aspects:
            raise ConfigError("aspects: multivariate mode needs at least one aspect")


TIE = "tie"  # the binary label question's third answer (binary_tie)


def slot(j: int) -> str:
    """Field / label name of display slot j (0-based)."""
    return f"response_{j + 1}"


def n_slots(cfg: DatasetConfig, n_responses: int) -> int:
    if cfg.mode == "binary":
        return 2
    return min(n_responses, cfg.max_responses) if cfg.max_responses else n_responses


def question_names(cfg: DatasetConfig, k: int) -> list[str]:
    if cfg.mode == "binary":
        return ["preference"] + (["strength"] if cfg.binary_strength else [])
    if cfg.mode == "ranking":
        return ["ranking"]
    return [f"{a}_{j + 1}" for j in range(k) for a in cfg.aspects]


def default_guidelines(cfg: DatasetConfig, k: int) -> str:
    common = (
        "You will see a prompt (a conversation) and {k} responses to it, in random order. The order means "
        "nothing: judge each response on its own merits.\n\n"
        "Read the whole prompt first. Many prompts carry an explicit instruction about the form of the answer "
        "(a word limit, bullet points, lowercase only, a required first or last phrase, a keyword). A response "
        "that ignores such an instruction is worse than one that follows it, even if it is longer or sounds "
        "better. Do not prefer a response just because it is longer.\n\n"
        "Submit when you are done with a record. If a record cannot be judged (empty, broken, not in a "
        "language you read), press Discard.\n\n"
    )
    if cfg.mode == "binary":
        q = ("**preference**: which response is better? Pick Response 1 or Response 2. If they seem equally good, "
             "pick the one that follows the prompt's instructions more exactly.\n")
        if cfg.binary_tie:
            q = ("**preference**: which response is better? Pick Response 1 or Response 2, or **Tie** when neither "
                 "is better: both follow the prompt's instructions equally well (or equally badly). Do not guess: "
                 "a tie is a useful answer.\n")
        if cfg.binary_strength:
            q += "\n**strength**: how much better is it? 1 = barely, 2 = somewhat, 3 = clearly, 4 = much better.\n"
    elif cfg.mode == "ranking":
        q = ("**ranking**: order all responses from best (rank 1) to worst; put a response that breaks the "
             "prompt's instructions below those that follow them. Give responses the same rank only when neither "
             "is better: a shared rank is a useful answer, a guess is not.\n")
    else:
        q = ("Rate **every response on every aspect** from 1 (worst) to 5 (best). The question "
             "`<aspect>_<n>` is about Response n. Aspects:\n\n"
             + "\n".join(f"- **{a}**: {ASPECT_HELP.get(a, a)}" for a in cfg.aspects)
             + "\n\n5 is always the good end of the scale (for harmfulness: 5 = harmless).\n")
    return "# Annotation guidelines\n\n" + common.format(k=k) + "## Questions\n\n" + q


def build_settings(cfg: DatasetConfig, k: int):
    """The ``rg.Settings`` of a dataset in ``cfg.mode`` showing ``k`` responses."""
    import argilla as rg

    cfg.check()
    fields = [rg.TextField(name="prompt", title="Prompt", use_markdown=True)] + [
        rg.TextField(name=slot(j), title=f"Response {j + 1}", use_markdown=False) for j in range(k)]
    labels = {slot(j): f"Response {j + 1}" for j in range(k)}
    if cfg.mode == "binary":
        questions = [
            rg.RankingQuestion(name="preference", values=labels, title="Rank the two responses (1 = better)")
            if cfg.binary_question == "ranking" else
            rg.LabelQuestion(name="preference", labels={**labels, TIE: "Tie"} if cfg.binary_tie else labels,
                             title="Which response is better?")]
        if cfg.binary_strength:
            questions.append(rg.RatingQuestion(name="strength", values=[1, 2, 3, 4], title="How much better is it?",
                                               description="1 = barely, 2 = somewhat, 3 = clearly, 4 = much better"))
    elif cfg.mode == "ranking":
        questions = [rg.RankingQuestion(name="ranking", values=labels, title="Rank the responses (1 = best)")]
    else:
        questions = [rg.RatingQuestion(name=f"{a}_{j + 1}", values=[1, 2, 3, 4, 5],
                                       title=f"Response {j + 1}: {a}", description=ASPECT_HELP.get(a, a) + " (1-5, 5 = best)")
                     for j in range(k) for a in cfg.aspects]
    guidelines = Path(cfg.guidelines).read_text() if cfg.guidelines else default_guidelines(cfg, k)
    return rg.Settings(fields=fields, questions=questions, guidelines=guidelines, allow_extra_metadata=True,
                       distribution=rg.TaskDistribution(min_submitted=cfg.annotators_per_record))


def get_dataset(client, cfg: DatasetConfig, must_exist: bool = True):
    ws = _quiet(client.workspaces, cfg.workspace)
    ds = _quiet(client.datasets, cfg.name(), workspace=ws) if ws is not None else None
    if ds is None and must_exist:
        raise ArgillaError(f"dataset {cfg.name()!r} not found in workspace {cfg.workspace!r} (run `alignkit annotate push` first)")
    return ds


@sdk_errors
def ensure_dataset(client, cfg: DatasetConfig, k: int):
    """Get or create the dataset. An existing one must have the same questions and response slots; a
    dataset left as a draft by an interrupted creation is deleted and created again."""
    import argilla as rg

    ensure_workspace(client, cfg.workspace)
    ds = get_dataset(client, cfg, must_exist=False)
    if ds is not None and getattr(ds._model, "status", "ready") != "ready":
        log.warning("push: dataset %s was left half-created (status %s); creating it again", cfg.name(), ds._model.status)
        ds.delete()
        ds = None
    if ds is None:
        ds = rg.Dataset(name=cfg.name(), workspace=cfg.workspace, settings=build_settings(cfg, k), client=client).create()
        log.info("push: created dataset %s in workspace %s", cfg.name(), cfg.workspace)
        return ds, True
    have_q = sorted(q.name for q in ds.settings.questions)
    have_f = sorted(f.name for f in ds.settings.fields)
    want_q = sorted(question_names(cfg, k))
    want_f = sorted(["prompt"] + [slot(j) for j in range(k)])
    if have_q != want_q or have_f != want_f:
        raise ArgillaError(
            f"dataset {cfg.name()!r} exists with other settings (questions {have_q}, fields {have_f}; this config "
            f"wants {want_q}, {want_f}). Use another `dataset:` name, or delete the dataset in Argilla.")
    return ds, False


# --------------------------------------------------------------------------------------------
# Records


def load_candidates(path: str | Path) -> list[dict]:
    """``candidates.jsonl`` rows, checked: item_id, prompt (messages or string), responses (list of strings)."""
    rows = []
    for line, rec in read_records(path):
        if not isinstance(rec, dict):
            raise DataError(path, line, None, "expected a JSON object")
        for key in ("item_id", "prompt", "responses"):
            if key not in rec:
                raise DataError(path, line, key, "missing")
        if isinstance(rec["prompt"], str):
            rec["prompt"] = [{"role": "user", "content": rec["prompt"]}]
        if not isinstance(rec["prompt"], list) or not rec["prompt"]:
            raise DataError(path, line, "prompt", "expected a string or a list of messages")
        if not isinstance(rec["responses"], list) or not all(isinstance(r, str) for r in rec["responses"]):
            raise DataError(path, line, "responses", "expected a list of strings")
        if len(rec["responses"]) < 2:
            raise DataError(path, line, "responses", f"need at least 2 responses to compare, got {len(rec['responses'])}")
        rec["item_id"] = str(rec["item_id"])
        rows.append(rec)
    ids = [r["item_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(path, None, "item_id", f"duplicate item_id {dup!r}")
    return rows


def content_hash(item_id: str, prompt: list, responses: list[str]) -> str:
    blob = json.dumps({"item_id": item_id, "prompt": prompt, "responses": responses}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_id(item_id: str, prompt: list, responses: list[str]) -> str:
    """Deterministic record id (Argilla external_id) from the record's content."""
    return f"{item_id}.{content_hash(item_id, prompt, responses)}"


def permutation(rid: str, n: int, seed: int, shuffle: bool = True) -> list[int]:
    perm = list(range(n))
    if shuffle:
        random.Random(f"{seed}:{rid}").shuffle(perm)
    return perm


def render_prompt(messages: list[dict]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"**{m['role']}:** {m['content']}" for m in messages)


EMPTY_PLACEHOLDER = "(empty response)"


def build_record(cand: dict, cfg: DatasetConfig) -> dict:
    """One candidates row -> the REST payload of one record (external_id, fields, metadata)."""
    k = n_slots(cfg, len(cand["responses"]))
    responses = cand["responses"][:k]
    rid = record_id(cand["item_id"], cand["prompt"], responses)
    perm = permutation(rid, k, cfg.seed, cfg.shuffle)
    fields = {"prompt": render_prompt(cand["prompt"])}
    for j, src in enumerate(perm):
        fields[slot(j)] = responses[src] if responses[src].strip() else EMPTY_PLACEHOLDER  # Argilla rejects empty fields
    return {"external_id": rid, "fields": fields,
            "metadata": {"item_id": cand["item_id"], "permutation": perm, "alignkit_mode": cfg.mode,
                         "content_hash": rid.rsplit(".", 1)[1]}}


def list_records(http: Http, dataset_id, include_responses: bool = False, page: int = 1000):
    """Every record of a dataset (owner/admin: ``GET /api/v1/datasets/{id}/records``), page by page."""
    offset = 0
    params = {"limit": page}
    if include_responses:
        params["include"] = "responses"
    while True:
        items = http.get(f"/api/v1/datasets/{dataset_id}/records", params={**params, "offset": offset})["items"]
        yield from items
        if len(items) < page:
            return
        offset += len(items)


@dataclass
class PushConfig(DatasetConfig):
    run_dir: str = doc("the annotation run directory; the push manifest goes to <run_dir>/push", "runs/quickstart/annotate")
    candidates: str | None = doc("candidates JSONL; default <run_dir>/candidates/candidates.jsonl", None)
    batch_size: int = doc("records per bulk request (at most 500, the server's limit)", 500)
    requests_in_flight: int = doc("bulk requests sent at once (each on its own connection); no gain measured on the "
                                  "local server, which takes one at a time (docs/annotation.md, Throughput)", 1)
    on_existing: str = doc("records already on the server: 'skip' them or 'update' their fields in place", "skip")
    max_items: int | None = doc("push only the first N candidates (smoke runs)", None)

    def candidates_path(self) -> Path:
        return Path(self.candidates) if self.candidates else Path(self.run_dir) / "candidates" / "candidates.jsonl"


def push(cfg: PushConfig, conn: Connection | None = None, on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Create the dataset if needed and send the records that are not on the server yet.

    Idempotent: records are keyed by a content-derived external id, so a second push (or a push run
    again after an interruption) never duplicates a record. ``on_batch(n_sent, n_total)`` is called
    after each batch (tests use it to interrupt a push)."""
    from tqdm import tqdm

    cfg.check()
    if cfg.on_existing not in ("skip", "update"):
        raise ConfigError(f"on_existing: expected skip or update, got {cfg.on_existing!r}")
    if not 1 <= cfg.batch_size <= 500:
        raise ConfigError("batch_size must be between 1 and 500")
    check_range(cfg, 1, "requests_in_flight")
    cands = load_candidates(cfg.candidates_path())
    if cfg.max_items:
        cands = cands[: cfg.max_items]
    ks = {n_slots(cfg, len(c["responses"])) for c in cands}
    if len(ks) != 1:
        raise DataError(cfg.candidates_path(), None, "responses",
                        f"every item needs the same number of responses for mode {cfg.mode} (found {sorted(ks)}); set max_responses")
    k = ks.pop()
    records = [build_record(c, cfg) for c in cands]
    conn = conn or connect(cfg.server_home, start=True)
    stage_dir = Path(cfg.run_dir) / "push"
    # The server, not the run store, knows what is there: a push always runs (and skips what exists).
    with stage_run("annotate-push", stage_dir, to_dict(cfg), {"candidates": cfg.candidates_path()}, force=True) as run:
        client = sdk_client(conn)
        ds, created = ensure_dataset(client, cfg, k)
        http = Http(conn)
        existing = {r["external_id"] for r in list_records(http, ds.id)}
        todo = records if cfg.on_existing == "update" else [r for r in records if r["external_id"] not in existing]
        t0 = time.time()
        sent = 0
        batches = [todo[start : start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
        connection = threading.local()  # a requests session is not meant to be shared between threads

        def send(batch: list[dict]) -> int:
            if not hasattr(connection, "http"):
                connection.http = Http(conn)
            connection.http.put(f"/api/v1/datasets/{ds.id}/records/bulk", json={"items": batch})
            return len(batch)

        def done(n: int) -> None:
            nonlocal sent
            sent += n
            bar.update(n)
            if on_batch:
                on_batch(sent, len(todo))

        with (tqdm(total=len(todo), desc=f"pushing to {cfg.name()}", unit="rec", disable=None if todo else True) as bar,
              ThreadPoolExecutor(cfg.requests_in_flight) as pool):
            in_flight: collections.deque = collections.deque()
            try:
                for batch in batches:  # at most requests_in_flight sent and not yet answered
                    in_flight.append(pool.submit(send, batch))
                    if len(in_flight) == cfg.requests_in_flight:
                        done(in_flight.popleft().result())
                while in_flight:
                    done(in_flight.popleft().result())
            except BaseException:  # a failure or an interrupt sends nothing more
                for future in in_flight:
                    future.cancel()
                raise
        elapsed = time.time() - t0
        n_on_server = sum(1 for _ in list_records(http, ds.id))
        run.metrics.update({
            "n_candidates": len(records), "n_sent": sent,
            "n_created": len([r for r in todo if r["external_id"] not in existing]),
            "n_updated": len([r for r in todo if r["external_id"] in existing]),
            "n_skipped_existing": len(records) - len(todo), "n_records_on_server": n_on_server,
            "records_per_s": sent / elapsed if elapsed > 0 and sent else None,
        })
        run.notes.update({"dataset": cfg.name(), "dataset_id": str(ds.id), "workspace": cfg.workspace,
                          "dataset_created": created, "responses_per_record": k, "argilla_url": conn.url,
                          "questions": question_names(cfg, k)})
        print(f"push: {run.metrics['n_created']} new, {run.metrics['n_updated']} updated, "
              f"{run.metrics['n_skipped_existing']} already there; {n_on_server} records in {cfg.name()} "
              f"({conn.url}, workspace {cfg.workspace})")
    return run.manifest("completed")
