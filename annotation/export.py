"""Export: consensus of the pulled annotations -> preference pairs, behind an agreement gate.

    alignkit annotate export --config configs/annotate.yaml [KEY=VALUE ...]

Reads ``<run_dir>/pull/annotations.jsonl`` + ``records.jsonl`` (from ``pull``) and the candidates
(``<run_dir>/candidates/candidates.jsonl``), writes ``<run_dir>/export/``:

``pairs.jsonl``     ``{prompt, chosen, rejected, margin, item_id, record_id, mode, agreement,
                    n_annotators, chosen_index, rejected_index[, constraint, aspects_chosen,
                    aspects_rejected]}``: readable by ``alignkit.data.load_preferences`` (reward, DPO).
``agreement/``      the agreement report (agreement.json, report.md, report.html) the gate used.
``manifest.json``   counts of pairs and of drops per reason, the gate's verdict.

How consensus is reached (answers are mapped back to candidate indices through each record's
stored permutation first; only the latest submitted answer per annotator counts):

* every annotator gives each candidate a score: binary - 1 for the chosen response, 0 for the
  other (0.5 for both on a ``tie`` answer); ranking - minus its rank; multivariate - the weighted mean of its aspect ratings
  (``aspect_weights``, default 1 each);
* the consensus score of a candidate is the mean over annotators; for every pair of candidates
  the one with the higher consensus is ``chosen`` (binary: the majority vote);
* ``margin`` = consensus gap, normalised to [0, 1] and times ``margin_scale``: binary - (votes for
  - votes against) / annotators (or the mean signed ``strength`` / 4 when asked); ranking - mean
  rank gap / (k - 1); multivariate - score gap / 4;
* per-pair agreement = the share of annotators whose own scores order the pair the same way (a
  ``tie`` answer agrees with no direction: a pair two of three annotators call a tie has agreement
  1/3 and is dropped as ``low_item_agreement``; one all call a tie is dropped as ``tie``).

Drops, counted per reason in the manifest: ``too_few_annotations`` (fewer than
``min_annotations`` annotators answered the record), ``low_item_agreement`` (agreement below
``min_item_agreement``), ``tie`` (equal consensus; ``tie_policy: random`` keeps it instead, in a
seeded random direction with margin 0), ``identical_responses``, ``unknown_item`` /
``candidate_changed`` (the record does not match the candidates file any more).

The gate (``alignkit.annotation.gate``): Fleiss' kappa (``alignkit.annotation.agreement``) of every
question in ``gate_questions`` must reach ``min_kappa``, or nothing is exported (GateError: the command
exits with code 3). Questions
available to the gate: the raw ones (``preference``, ``strength``, ``ranking``), per aspect
pooled over responses (multivariate: ``quality``... - the unit is item x response), and pairwise
preferences derived from each annotator's answers (``ranking_pairwise``, ``overall_pairwise``:
the unit is item x pair of display slots, value first/second/tie). ``gate_questions: auto`` gates binary on
``preference``, ranking on ``ranking_pairwise`` and multivariate on ``overall_pairwise``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from alignkit.annotation.datasets import TIE, DatasetConfig, content_hash, load_candidates, n_slots
from alignkit.annotation.gate import apply_gate, raise_if_failed
from alignkit.annotation.pull import latest, read_table
from alignkit.config import ConfigError, doc, to_dict
from alignkit.data import read_records
from alignkit.runstore import stage_run, write_jsonl

log = logging.getLogger("alignkit.annotate.export")

DROP_REASONS = ("too_few_annotations", "low_item_agreement", "tie", "identical_responses", "unknown_item",
                "candidate_changed")


@dataclass
class ExportConfig(DatasetConfig):
    run_dir: str = doc("the annotation run directory; outputs go to <run_dir>/export", "runs/quickstart/annotate")
    pull_dir: str | None = doc("pulled annotations (annotations.jsonl + records.jsonl); default <run_dir>/pull", None)
    candidates: str | None = doc("candidates JSONL; default <run_dir>/candidates/candidates.jsonl", None)
    output_dir: str | None = doc("default <run_dir>/export", None)
    min_kappa: float | None = doc("global gate: Fleiss' kappa of every gated question must be >= this (None: no gate)", 0.4)
    gate_questions: list[str] = doc("questions the gate checks; [auto] = preference (binary), ranking_pairwise "
                                    "(ranking), overall_pairwise (multivariate)", default_factory=lambda: ["auto"])
    min_item_agreement: float = doc("per pair: share of annotators agreeing with the consensus direction", 0.6)
    min_annotations: int | None = doc("annotators needed per record (default: annotators_per_record)", None)
    tie_policy: str = doc("pairs with equal consensus: 'drop' or 'random' (seeded direction, margin 0)", "drop")
    aspect_weights: dict = doc("multivariate: weight per aspect in the score (missing aspects weigh 1; 0 ignores one)",
                               default_factory=dict)
    margin_scale: float = doc("multiplies every margin (normalised to [0, 1])", 1.0)
    bootstrap: int = doc("bootstrap resamples for the kappa confidence intervals", 1000)

    def paths(self) -> tuple[Path, Path, Path]:
        run = Path(self.run_dir)
        return (Path(self.pull_dir) if self.pull_dir else run / "pull",
                Path(self.candidates) if self.candidates else run / "candidates" / "candidates.jsonl",
                Path(self.output_dir) if self.output_dir else run / "export")


# --------------------------------------------------------------------------------------------
# Per-annotator scores of each candidate


def annotator_scores(cfg: ExportConfig, answers: dict[str, object], perm: list[int]) -> tuple[dict[int, float], dict, float | None] | None:
    """One annotator's answers to one record -> (score per candidate index, aspect ratings per
    candidate index, strength). None when the answers are incomplete."""
    k = len(perm)
    idx = {f"response_{j + 1}": perm[j] for j in range(k)}  # display slot -> candidate index
    aspects: dict = {}
    strength = None
    if cfg.mode == "multivariate":
        weights = {a: float(cfg.aspect_weights.get(a, 1.0)) for a in cfg.aspects}
        total = sum(abs(w) for w in weights.values()) or 1.0
        scores = {}
        for j in range(k):
            ratings = {a: answers.get(f"{a}_{j + 1}") for a in cfg.aspects}
            if any(not isinstance(v, (int, float)) for v in ratings.values()):
                return None
            aspects[perm[j]] = ratings
            scores[perm[j]] = sum(weights[a] * ratings[a] for a in cfg.aspects) / total
        return scores, aspects, None
    q = "ranking" if cfg.mode == "ranking" else "preference"
    value = answers.get(q)
    if isinstance(value, list):  # slots best first; an inner list holds slots that share a rank
        groups = [g if isinstance(g, list) else [g] for g in value]
        if sorted(s for g in groups for s in g) != sorted(idx):
            return None
        scores = {idx[s]: -float(r) for r, g in enumerate(groups) for s in g}
    elif isinstance(value, str) and value in idx:
        scores = {c: (1.0 if s == value else 0.0) for s, c in idx.items()}
    elif value == TIE and cfg.binary_tie:  # neither is better: an equal score, a vote for no direction
        scores = {c: 0.5 for c in idx.values()}
    else:
        return None
    if cfg.mode == "binary" and isinstance(answers.get("strength"), (int, float)):
        strength = float(answers["strength"])
    return scores, aspects, strength


def _sign(x: float) -> int:
    return (x > 1e-9) - (x < -1e-9)


# --------------------------------------------------------------------------------------------
# Agreement table for the gate


def gate_table(cfg: ExportConfig, rows: list[dict], records: dict[str, dict]) -> list[dict]:
    """Long-format rows the gate's agreement is computed on (raw + pooled + derived questions)."""
    out = []
    by_record: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        by_record[(r["record_id"], r["annotator"])][r["question"]] = r["value"]
        if cfg.mode != "multivariate":
            out.append({"item_id": r["item_id"], "annotator": r["annotator"], "question": r["question"], "value": r["value"]})
        else:
            aspect, _, j = r["question"].rpartition("_")
            if aspect in cfg.aspects:  # pooled over responses: the unit is (item, response)
                out.append({"item_id": f"{r['item_id']}#{j}", "annotator": r["annotator"], "question": aspect,
                            "value": r["value"]})
    if cfg.mode == "binary":
        return out
    derived = "ranking_pairwise" if cfg.mode == "ranking" else "overall_pairwise"
    for (rid, annotator), answers in by_record.items():
        rec = records.get(rid)
        if not rec or not rec.get("permutation"):
            continue
        got = annotator_scores(cfg, answers, rec["permutation"])
        if got is None:
            continue
        scores, perm = got[0], rec["permutation"]
        for i, j in itertools.combinations(range(len(perm)), 2):  # pairs of display slots
            s = _sign(scores[perm[i]] - scores[perm[j]])
            out.append({"item_id": f"{rec['item_id']}#{i + 1}-{j + 1}", "annotator": annotator, "question": derived,
                        "value": {1: "first", -1: "second", 0: "tie"}[s]})
    return out


def auto_gate_questions(cfg: ExportConfig) -> list[str]:
    if cfg.gate_questions and cfg.gate_questions != ["auto"]:
        return list(cfg.gate_questions)
    return {"binary": ["preference"], "ranking": ["ranking_pairwise"], "multivariate": ["overall_pairwise"]}[cfg.mode]


# --------------------------------------------------------------------------------------------
# The stage


def export(cfg: ExportConfig, force: bool = False) -> dict:
    cfg.check()
    if cfg.tie_policy not in ("drop", "random"):
        raise ConfigError(f"tie_policy: expected drop or random, got {cfg.tie_policy!r}")
    pull_dir, cand_path, out = cfg.paths()
    table, records_path = pull_dir / "annotations.jsonl", pull_dir / "records.jsonl"
    for p in (table, records_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: not found (run `alignkit annotate pull` first)")
    min_ann = cfg.min_annotations or cfg.annotators_per_record
    inputs = {"annotations": table, "records": records_path, "candidates": cand_path}
    with stage_run("annotate-export", out, to_dict(cfg), inputs, force) as run:
        if run.skipped:
            log.info("export: already completed in %s with the same inputs (use --force to redo)", out)
            return run.previous
        previous = out / "pairs.jsonl"
        if previous.exists():  # kept, but under a name no stage reads: this export may fail its gate
            previous.replace(out / "pairs.previous.jsonl")
        rows = [r for r in latest(read_table(table)).values() if r.get("status", "submitted") == "submitted"]
        records = {r["record_id"]: r for _, r in read_records(records_path)} if records_path.stat().st_size else {}
        candidates = {c["item_id"]: c for c in load_candidates(cand_path)}
        gated = auto_gate_questions(cfg)
        kappas = _check_gate(cfg, run, gate_table(cfg, rows, records), gated, table, out)
        answers: dict[str, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        for r in rows:
            answers[r["record_id"]][r["annotator"]][r["question"]] = r["value"]
        dropped = {k: 0 for k in DROP_REASONS}
        pairs = [pair for rid in sorted(answers)
                 for pair in _record_pairs(cfg, rid, records.get(rid), candidates, answers[rid], min_ann, dropped)]
        path = out / "pairs.jsonl"
        write_jsonl(path, pairs)
        run.add_output("pairs", path)
        run.metrics.update({"n_records_annotated": len(answers), "n_records_on_server": len(records),
                            "n_pairs": len(pairs), "dropped": dropped,
                            "mean_margin": sum(p["margin"] for p in pairs) / len(pairs) if pairs else None})
        run.notes.update({"gate_questions": gated, "min_annotations": min_ann, "tie_policy": cfg.tie_policy})
        print(f"export: {len(pairs)} preference pairs -> {path}; dropped: "
              + (", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none")
              + (f"; gate passed ({', '.join(f'{q} kappa {kappas[q]:.3f}' for q in gated)})" if cfg.min_kappa is not None else ""))
    return run.manifest("completed")


def _check_gate(cfg: ExportConfig, run, gate_rows: list[dict], gated: list[str], table: Path, out: Path) -> dict:
    """The global gate: agreement of ``gate_rows``, its report in ``out/agreement``, GateError when
    it fails (nothing is exported then). Returns Fleiss' kappa per question."""
    from alignkit.annotation.agreement import compute_agreement
    from alignkit.annotation.agreement_report import write_report

    result = compute_agreement(gate_rows, n_bootstrap=cfg.bootstrap, seed=cfg.seed)
    result["source"] = str(table)
    kappas = {q: r.get("fleiss_kappa") for q, r in result["questions"].items()}
    run.metrics["fleiss_kappa"] = kappas
    if cfg.min_kappa is not None:
        run.metrics["gate"] = apply_gate(result, cfg.min_kappa, gated)
    report = write_report(result, out / "agreement")
    run.add_output("agreement_report", report["html"])
    if cfg.min_kappa is not None:
        raise_if_failed(result["gate"], f"Nothing exported. Report: {report['html']}")
    return kappas


def _record_pairs(cfg: ExportConfig, rid: str, rec: dict | None, candidates: dict, answers: dict[str, dict],
                  min_ann: int, dropped: dict) -> list[dict]:
    """The preference pairs of one record from its annotators' ``answers``; what is left out is
    counted in ``dropped`` by reason."""
    cand = candidates.get(rec["item_id"]) if rec else None
    if rec is None or cand is None or not rec.get("permutation"):
        dropped["unknown_item"] += 1
        return []
    perm = rec["permutation"]
    k = len(perm)
    responses = cand["responses"][: n_slots(cfg, len(cand["responses"]))]
    if len(responses) != k or content_hash(cand["item_id"], cand["prompt"], responses) != rec.get("content_hash"):
        dropped["candidate_changed"] += 1
        return []
    per_ann = [s for s in (annotator_scores(cfg, a, perm) for a in answers.values()) if s is not None]
    if len(per_ann) < min_ann:
        dropped["too_few_annotations"] += 1
        return []
    n = len(per_ann)
    mean = {c: sum(s[0][c] for s in per_ann) / n for c in range(k)}
    pairs = []
    for a, b in itertools.combinations(range(k), 2):
        direction = _sign(mean[a] - mean[b])
        votes = [_sign(s[0][a] - s[0][b]) for s in per_ann]
        if direction == 0:
            if cfg.tie_policy == "drop":
                dropped["tie"] += 1
                continue
            direction = random.Random(f"{cfg.seed}:{rid}:{a}-{b}").choice([1, -1])
            agree, margin = sum(v == direction for v in votes) / n, 0.0
        else:
            agree = sum(v == direction for v in votes) / n
            margin = _margin(cfg, abs(mean[a] - mean[b]), votes, per_ann, k)
            if agree < cfg.min_item_agreement:
                dropped["low_item_agreement"] += 1
                continue
        ch, rj = (a, b) if direction > 0 else (b, a)
        if responses[ch].strip() == responses[rj].strip():
            dropped["identical_responses"] += 1
            continue
        pair = {"prompt": cand["prompt"], "chosen": responses[ch], "rejected": responses[rj],
                "margin": round(margin * cfg.margin_scale, 6), "item_id": cand["item_id"], "record_id": rid,
                "mode": cfg.mode, "agreement": round(agree, 6), "n_annotators": n,
                "chosen_index": ch, "rejected_index": rj}
        if "constraint" in cand:
            pair["constraint"] = cand["constraint"]
        if cfg.mode == "multivariate":
            pair["aspects_chosen"] = {x: round(sum(s[1][ch][x] for s in per_ann) / n, 4) for x in cfg.aspects}
            pair["aspects_rejected"] = {x: round(sum(s[1][rj][x] for s in per_ann) / n, 4) for x in cfg.aspects}
        pairs.append(pair)
    return pairs


def _margin(cfg: ExportConfig, gap: float, votes: list[int], per_ann: list, k: int) -> float:
    """The consensus gap of a pair normalised to [0, 1] (see the module docstring)."""
    if cfg.mode == "binary":
        strengths = [s[2] for s in per_ann]
        if all(x is not None for x in strengths):
            gap = abs(sum(v * x for v, x in zip(votes, strengths)) / len(per_ann)) / 4.0
    elif cfg.mode == "ranking":
        gap = gap / (k - 1)
    else:
        gap = gap / 4.0
    return gap
