"""Human evaluation of two models' eval replies: the eval stage's side of it.

``alignkit eval --human-eval A,B`` (wired in :mod:`alignkit.loop.human_eval`, since it joins this
stage with the annotation stage's Argilla datasets) shows annotators blind A/B pairs of the two
models' first replies to each eval prompt. This module holds what needs only the eval's run
directory and statistics:

* :func:`ab_candidates` -- the pairs as annotation candidates (``item_id, prompt, responses``,
  ``responses[0]`` from A and ``[1]`` from B; the shuffle of the annotation push hides which is
  which), and the prompts where both models wrote the same reply (a tie, not asked);
* :func:`majority` and :func:`summarise` -- each record's majority answer and the human win rate
  of B over A with its tie-aware interval (:func:`alignkit.evals.stats.tie_aware_interval`);
* :func:`automatic_win_rates` -- the eval's scores on exactly those replies, for comparison;
* :func:`load_results` and :func:`write_report` -- ``report.html`` again, with a "Human
  evaluation" section for every ``human/<A>_vs_<B>/human_eval.json`` made from these generations.

What every field means: docs/evaluation.md, "Human evaluation".
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.evals import stats
from alignkit.runstore import hash_path, read_manifest

HUMAN_DIR = "human"
RESULT = "human_eval.json"


class HumanEvalError(AlignkitError):
    """The eval run or the two model names do not allow a human evaluation (exit 2)."""


def pair_dir(eval_dir: str | Path, a: str, b: str) -> Path:
    return Path(eval_dir) / HUMAN_DIR / f"{a}_vs_{b}"


def read_eval(eval_dir: str | Path, a: str, b: str) -> tuple[dict, list[dict]]:
    """(eval.json, generations.jsonl rows) of a completed eval run holding models ``a`` and ``b``."""
    eval_dir = Path(eval_dir)
    manifest = read_manifest(eval_dir)
    if not manifest or manifest.get("status") != "completed" or not (eval_dir / "generations.jsonl").exists():
        raise HumanEvalError(f"{eval_dir}: no completed eval run there (run `alignkit eval --config ...` first, "
                             f"or name the eval's output_dir)")
    result = json.loads((eval_dir / "eval.json").read_text())
    models = list(result["models"])
    if len(models) < 2:
        raise HumanEvalError(f"{eval_dir}: the eval has one model ({models[0]}); a human evaluation compares two")
    unknown = [m for m in (a, b) if m not in models]
    if unknown:
        raise HumanEvalError(f"model(s) {', '.join(map(repr, unknown))} not in the eval ({', '.join(models)})")
    if a == b:
        raise HumanEvalError(f"--human-eval names {a!r} twice; name two different models")
    rows = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines() if line.strip()]
    return result, rows


def first_replies(rows: list[dict]) -> list[dict]:
    """Each prompt's first reply (``sample`` 0) of every model: the replies annotators judge."""
    return [r for r in rows if r.get("sample", 0) == 0]


def ab_candidates(rows: list[dict], a: str, b: str) -> tuple[list[dict], list[str]]:
    """(annotation candidates, ids of the prompts where A and B wrote the same reply)."""
    candidates, identical = [], []
    for r in first_replies(rows):
        replies = [r["responses"][a]["text"], r["responses"][b]["text"]]
        if replies[0].strip() == replies[1].strip():
            identical.append(str(r["id"]))
        else:
            candidates.append({"item_id": str(r["id"]), "prompt": r["prompt"], "responses": replies})
    return candidates, identical


def dataset_name(candidates: list[dict]) -> str:
    """The Argilla dataset's name: from the pairs' content, never from the model names (annotators
    see it). The same replies give the same name (a re-run adds nothing); new replies, a new dataset."""
    blob = json.dumps([[c["item_id"], c["responses"]] for c in candidates], ensure_ascii=False)
    return "human-eval-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def majority(votes: list[float]) -> float | None:
    """The answer more than half the annotators gave (1: B better, 0: A better, 0.5: a tie), or None."""
    if not votes:
        return None
    answer, count = Counter(votes).most_common(1)[0]
    return answer if count * 2 > len(votes) else None


def summarise(outcomes: list[float | None], identical: int, confidence: float) -> dict:
    """Win rate of B over A from each record's majority (``None``: no majority, left out), the
    prompts with identical replies counting as ties."""
    decided = [o for o in outcomes if o is not None]
    wins, losses = decided.count(1.0), decided.count(0.0)
    ties = decided.count(0.5) + identical
    n = wins + ties + losses
    return {"win_rate": (wins + ties / 2) / n if n else None,
            "ci": stats.tie_aware_interval(wins, ties, losses, confidence), "confidence": confidence,
            "wins": wins, "ties": ties, "losses": losses, "n": n,
            "n_no_majority": len(outcomes) - len(decided), "n_identical": identical}


def automatic_win_rates(result: dict, rows: list[dict], a: str, b: str) -> dict:
    """The eval's own win rate of B over A on the replies the annotators judged, per reward source
    (and the oracle on the prompts it scores); identical replies tie, as in the eval."""
    firsts = first_replies(rows)
    out = {}
    for src in result.get("reward_sources") or {}:
        pairs = [(r["responses"][b], r["responses"][a]) for r in firsts]
        out[src] = stats.win_rate([rb["rewards"][src] if rb["text"] != ra["text"] else ra["rewards"][src]
                                   for rb, ra in pairs], [ra["rewards"][src] for _, ra in pairs], result["confidence"])
    scored = [r for r in firsts if "oracle_score" in r["responses"][a]]
    if scored:
        out["oracle"] = stats.win_rate([r["responses"][b]["oracle_score"] for r in scored],
                                       [r["responses"][a]["oracle_score"] for r in scored], result["confidence"])
    return out


def generations_hash(eval_dir: str | Path) -> str:
    return hash_path(Path(eval_dir) / "generations.jsonl")


def load_results(eval_dir: str | Path) -> list[dict]:
    """Every ``human/*/human_eval.json`` made from the eval's current generations (results from
    replies an eval run has since replaced are left out of the report)."""
    root = Path(eval_dir) / HUMAN_DIR
    current = generations_hash(eval_dir) if (Path(eval_dir) / "generations.jsonl").exists() else None
    found = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{RESULT}"))] if root.is_dir() else []
    return [h for h in found if h.get("generations") == current]


def write_report(eval_dir: str | Path) -> Path:
    """``report.html`` rendered again from eval.json, generations.jsonl and the human results."""
    from alignkit.evals.report import write_report as render_to

    eval_dir = Path(eval_dir)
    result = json.loads((eval_dir / "eval.json").read_text())
    rows = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines() if line.strip()]
    samples = ((read_manifest(eval_dir) or {}).get("config") or {}).get("report_samples", 12)
    return render_to(result, rows, eval_dir / "report.html", samples=samples, human=load_results(eval_dir))
