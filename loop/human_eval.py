"""``alignkit eval``'s wiring, and its human evaluation: ``alignkit eval --human-eval A,B``.

The human evaluation joins two stages, which is why it lives above them (as ``alignkit chat`` does
in :mod:`alignkit.loop.chat`): the eval's replies and statistics (:mod:`alignkit.evals.human`) and
the annotation stage's Argilla machinery, unchanged. From a completed eval run it

1. writes one candidate per prompt, A's and B's first replies, to
   ``<eval_dir>/human/<A>_vs_<B>/candidates/candidates.jsonl`` (prompts where both wrote the same
   reply are ties, not asked);
2. pushes them as a binary dataset with ties (``alignkit annotate push``: idempotent, the order of
   the two replies shuffled per record and the permutation kept where annotators cannot see it;
   the dataset is named from the replies' content, never from the models);
3. lets the simulated pool answer (``--annotators simulated``, ``alignkit annotate simulate``) or
   waits for people (``human``: until every record is complete the command says how far they are
   and exits 10, as ``alignkit run`` does, and reports nothing);
4. pulls the answers (``alignkit annotate pull``), maps each back through its record's permutation
   (:func:`alignkit.annotation.export.annotator_scores`, as the export does), and writes
   ``human_eval.json`` (B's human win rate over A with its interval, wins, ties, losses, records
   without a majority, Fleiss' kappa by :func:`alignkit.annotation.agreement.compute_agreement`) and
   ``report.html`` again with a "Human evaluation" section.

Annotation settings (workspace, annotators per record, seed, server, the simulated pool) come from
``--annotate-config`` (configs/annotate.yaml); the question itself is fixed (:data:`FIXED`).
docs/evaluation.md, "Human evaluation", says what every field means.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path

from alignkit.config import ConfigError, merge, parse_overrides, read_yaml
from alignkit.evals.human import (RESULT, HumanEvalError, ab_candidates, automatic_win_rates, dataset_name, generations_hash,
                                  majority, pair_dir, read_eval, summarise, write_report)
from alignkit.runstore import atomic_write_json, write_jsonl

log = logging.getLogger("alignkit.eval.human")

DEFAULT_ANNOTATE_CONFIG = "configs/annotate.yaml"
# what a human evaluation fixes, whatever the annotate config says: "which reply is better, or a
# tie?", both replies shown in a shuffled order, the built-in guidelines, this pair's own files
FIXED = {"mode": "binary", "binary_question": "label", "binary_tie": True, "binary_strength": False, "shuffle": True,
         "guidelines": None, "candidates": None, "max_items": None, "output_dir": None, "statuses": ["submitted"]}
OUTCOME = {1.0: "b", 0.0: "a", 0.5: "tie", None: None}


def annotation_configs(annotate_config: str | None, run_dir: Path, dataset: str) -> dict:
    """push, simulate and pull configs: the annotate config's ``common`` and verb sections (as
    ``alignkit annotate`` reads them), this pair's run dir and dataset, and :data:`FIXED` on top."""
    from alignkit.annotation.cli import check_sections, verb_config

    raw = read_yaml(annotate_config) if annotate_config else {}
    check_sections(raw, str(annotate_config))
    common = {**(raw.get("common") or {}), "run_dir": str(run_dir), "dataset": dataset}
    configs = {}
    for verb in ("push", "simulate", "pull"):
        cfg = verb_config(verb, common, raw.get(verb) or {}, f"{annotate_config}: {verb}")
        configs[verb] = dataclasses.replace(cfg, **{k: v for k, v in FIXED.items() if hasattr(cfg, k)})
    return configs


def record_votes(records: dict[str, dict], rows: list[dict]) -> dict[str, list[float]]:
    """record id -> each annotator's answer mapped back to the candidates through the record's
    permutation: 1 B is better, 0 A is better, 0.5 a tie."""
    from alignkit.annotation.export import ExportConfig, annotator_scores

    binary = ExportConfig(mode="binary", binary_tie=True)
    answers: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        answers[r["record_id"]][r["annotator"]][r["question"]] = r["value"]
    votes = {}
    for rid, rec in records.items():
        scored = [annotator_scores(binary, a, rec["permutation"]) for a in answers[rid].values()]
        votes[rid] = [0.5 if s[0] == s[1] else float(s[1] > s[0]) for s, _, _ in filter(None, scored)]
    return votes


def collect(verbs: dict, candidates: list[dict], annotators: str, conn) -> tuple[dict[str, dict], list[dict]]:
    """Push the candidates, let the simulated pool answer (``annotators: simulated``), pull: (this
    pair's records as pulled, by record id; their latest submitted answers)."""
    from alignkit.annotation.datasets import build_record, push
    from alignkit.annotation.pull import latest, pull, read_table
    from alignkit.annotation.simulate import simulate

    push(verbs["push"], conn)
    if annotators == "simulated":
        simulate(verbs["simulate"], conn)
    pull(verbs["pull"], conn)
    ours = {build_record(c, verbs["push"])["external_id"] for c in candidates}
    pulled = verbs["pull"].out_dir()
    records = {r["record_id"]: r for r in map(json.loads, (pulled / "records.jsonl").read_text().splitlines())
               if r["record_id"] in ours}
    answers = [r for r in latest(read_table(pulled / "annotations.jsonl")).values()
               if r["record_id"] in records and r.get("status", "submitted") == "submitted"]
    return records, answers


def human_eval(eval_dir: str | Path, a: str, b: str, annotators: str = "simulated",
               annotate_config: str | None = DEFAULT_ANNOTATE_CONFIG, conn=None) -> dict | None:
    """B's human win rate over A on the eval's replies (``human_eval.json``), or None while human
    annotators have records left (nothing is reported then)."""
    from alignkit.annotation.agreement import compute_agreement
    from alignkit.annotation.server import connect
    from alignkit.annotation.simulate import build_pool

    if annotators not in ("simulated", "human"):
        raise ConfigError(f"annotators: expected simulated or human, got {annotators!r}")
    result, rows = read_eval(eval_dir, a, b)
    candidates, identical = ab_candidates(rows, a, b)
    if not candidates:
        raise HumanEvalError(f"{a} and {b} wrote the same reply to every prompt: nothing to ask annotators")
    run_dir = pair_dir(eval_dir, a, b)
    write_jsonl(run_dir / "candidates" / "candidates.jsonl", candidates)
    verbs = annotation_configs(annotate_config, run_dir, dataset_name(candidates))
    conn = conn or connect(verbs["push"].server_home, start=True)
    records, answers = collect(verbs, candidates, annotators, conn)
    done = sum(r["status"] == "completed" for r in records.values())
    if done < len(candidates):
        if annotators == "human":
            print(f"eval: human evaluation of {b} vs {a}: waiting for annotators: {done} of {len(candidates)} records "
                  f"completed.\n  Annotators answer dataset {verbs['push'].name()!r} in workspace "
                  f"{verbs['push'].workspace!r} at {conn.url}; run the same command again to continue from here.")
            return None
        log.warning("eval: the simulated annotators completed %d of %d records", done, len(candidates))

    votes = record_votes(records, answers)
    who, pool = {r["annotator"] for r in answers}, {s.username for s in build_pool(verbs["simulate"])}
    agreement = compute_agreement([r for r in answers if r["question"] == "preference"],
                                  seed=verbs["push"].seed)["questions"].get("preference", {})
    human = {
        "a": a, "b": b, "annotators": "simulated" if who <= pool else "human" if not who & pool else "simulated and human",
        **summarise([majority(v) for v in votes.values() if v], len(identical), result["confidence"]),
        "n_prompts": len(candidates) + len(identical), "n_records": len(candidates), "n_records_completed": done,
        "n_unanswered": sum(1 for v in votes.values() if not v), "n_answers": len(answers), "n_annotators": len(who),
        "agreement": {"question": "preference",
                      **{k: agreement.get(k) for k in ("fleiss_kappa", "ci", "band", "n_items", "n_raters")}},
        "automatic": automatic_win_rates(result, rows, a, b),
        "dataset": verbs["push"].name(), "workspace": verbs["push"].workspace, "argilla_url": conn.url,
        "generations": generations_hash(eval_dir), "identical_replies": identical,
        "records": [{"record_id": rid, "item_id": records[rid]["item_id"], "status": records[rid]["status"],
                     "votes": {"a": v.count(0.0), "b": v.count(1.0), "tie": v.count(0.5)},
                     "outcome": OUTCOME[majority(v)]} for rid, v in sorted(votes.items())],
    }
    atomic_write_json(run_dir / RESULT, human)
    report = write_report(eval_dir)
    print(f"eval: human win rate of {b} over {a}: {_fmt(human['win_rate'])} [{_fmt(human['ci'][0])}, "
          f"{_fmt(human['ci'][1])}] ({human['wins']} wins, {human['ties']} ties, {human['losses']} losses, "
          f"{human['n_no_majority']} without a majority; {len(who)} {human['annotators']} annotators, Fleiss' kappa "
          f"{_fmt(human['agreement']['fleiss_kappa'])})\n  {run_dir / RESULT}\n  {report}")
    return human


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------------------------
# CLI: `alignkit eval` (evals/cli.py) plus --human-eval


def eval_output_dir(config: str | None, overrides: list[str]) -> str:
    """The eval run the config and overrides name (its ``output_dir``), as ``alignkit eval`` reads them."""
    from alignkit.evals.evaluate import EvalConfig

    data = merge(read_yaml(config) if config else {}, parse_overrides(overrides))
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{config or 'config'}: unknown key(s) {', '.join(unknown)}")
    return str(data.get("output_dir") or fields["output_dir"].default)


def _human(args) -> int:
    if args.force:
        raise ConfigError("--force reruns the automatic eval; --human-eval reads a completed one "
                          "(and pushing again never duplicates a record): drop --force")
    names = [x.strip() for x in args.human_eval.split(",") if x.strip()]
    if len(names) != 2:
        raise ConfigError(f"--human-eval {args.human_eval!r}: expected two model names A,B (B's win rate over A)")
    annotate = args.annotate_config or (DEFAULT_ANNOTATE_CONFIG if Path(DEFAULT_ANNOTATE_CONFIG).exists() else None)
    if human_eval(eval_output_dir(args.config, args.overrides), *names, annotators=args.annotators or "simulated",
                  annotate_config=annotate) is None:
        from alignkit.loop.run import WAITING_FOR_ANNOTATORS

        return WAITING_FOR_ANNOTATORS
    return 0


def configure_cli(p) -> None:
    from alignkit.evals.cli import configure_eval_cli

    configure_eval_cli(p)
    p.description += (" With --human-eval A,B it evaluates nothing itself: annotators in Argilla (simulated, or people) "
                      "compare A's and B's replies of the completed eval run blind, and B's human win rate over A, "
                      "its interval and Fleiss' kappa join report.html (docs/evaluation.md, 'Human evaluation').")
    g = p.add_argument_group("human evaluation")
    g.add_argument("--human-eval", metavar="A,B", help="two models of the eval run: push blind pairs of their "
                   "replies to Argilla, collect the answers, write human/A_vs_B/human_eval.json and report.html")
    g.add_argument("--annotators", choices=("simulated", "human"),
                   help="with --human-eval: 'simulated' (default: the annotate config's simulated pool answers at "
                        "once) or 'human' (exit 10 until people have completed every record; run it again)")
    g.add_argument("--annotate-config", metavar="FILE",
                   help=f"with --human-eval: annotation settings (common: workspace, annotators_per_record, seed, "
                        f"server_home; simulate: the pool); default {DEFAULT_ANNOTATE_CONFIG}")
    p.epilog += ("\n\nexit codes: 0 done, 1 Argilla or its server, 2 bad config or data, "
                 "10 --human-eval with human annotators: waiting for them")
    automatic = p.get_default("func")

    def dispatch(args) -> int:
        if args.human_eval:
            return _human(args)
        if args.annotators or args.annotate_config:
            raise ConfigError("--annotators and --annotate-config go with --human-eval A,B")
        return automatic(args)

    p.set_defaults(func=dispatch)
