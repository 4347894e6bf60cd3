"""Rounds of the loop (``alignkit run FILE rounds=N``): where each round lives, the rule that picks
the policy whose replies round k+1 annotates, and the index page's side-by-side view of every
round's held-out evaluation with a plot of the scores over rounds.

Round 1 is the loop as it always was (``<run_dir>/<stage>``); round k >= 2 lives in
``<run_dir>/round<k>/<stage>``, shares round 1's SFT model, and starts from
``<run_dir>/round<k>/chosen_policy.json``: which of round k-1's aligned models generates its
candidates, chosen on the validation prompts (never the test prompts).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from alignkit.config import ConfigError
from alignkit.plots import error_bars, figure_png

CHOICE_RULES = {  # rule -> what it maximises, on round k's validation evaluation
    "lc_win_rate": "length-controlled reward-model win rate over {baseline}",
    "win_rate": "reward-model win rate over {baseline}",
    "oracle_pass_rate": "pass rate by the demo's constraint oracle",
}
CHOSEN_POLICY = "chosen_policy.json"


def round_dir(run: Path, k: int) -> Path:
    """Round 1 keeps the loop's own layout; round k >= 2 gets ``<run>/round<k>``."""
    return run if k == 1 else run / f"round{k}"


def figure(result: dict, name: str, rule: str) -> dict | None:
    """``{"value", "ci"}`` of ``rule`` for model ``name`` in an eval result, or None when it has none
    (the baseline has no win rate; no reward model, no reward win rates; no constraints, no oracle)."""
    m = (result.get("models") or {}).get(name) or {}
    if rule == "oracle_pass_rate":
        d, key = (m.get("oracle") or {}).get("pass"), "rate"
    else:
        d, key = (m.get(rule) or {}).get(result.get("primary_reward")), "win_rate"
    if not d or d.get(key) is None:
        return None
    return {"value": d[key], "ci": d.get("ci")}


def choose_policy(result: dict, rule: str, candidates: dict[str, str]) -> dict:
    """The candidate (name -> model, in stage order) with the highest ``rule`` figure in ``result``
    (a validation evaluation); on a tie the first in stage order. Candidates without the figure
    cannot win; none with it is an error naming the rule."""
    if rule not in CHOICE_RULES:
        raise ConfigError(f"round_choice: expected one of {', '.join(CHOICE_RULES)}, got {rule!r}")
    figures = {name: figure(result, name, rule) for name in candidates}
    scored = [name for name in candidates if figures[name]]
    if not scored:
        raise ConfigError(f"round_choice {rule}: none of {', '.join(candidates)} has this figure in the validation "
                          f"evaluation ({result.get('prompts')}); win rates need the reward stage, the oracle's "
                          "pass rate prompts with checkable constraints")
    chosen = max(scored, key=lambda name: figures[name]["value"])  # max keeps the first of equal ones
    return {"rule": rule, "rule_text": CHOICE_RULES[rule].format(baseline=result.get("baseline")),
            "prompts": result.get("prompts"), "baseline": result.get("baseline"),
            "candidates": {name: {"model": model, **(figures[name] or {"value": None, "ci": None})}
                           for name, model in candidates.items()},
            "chosen": chosen, "model": candidates[chosen]}


# --------------------------------------------------------------------------------------------
# The index page's "Rounds" section


def _interval(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    lo, hi = d.get("ci") or (None, None)
    return f"{d['value']:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{d['value']:.3f}"


def round_results(run: Path, rounds: int, eval_dir: str) -> dict[int, dict]:
    """Round -> its evaluation (``eval.json`` of ``eval_dir``), for the rounds that have one."""
    found = {}
    for k in range(1, rounds + 1):
        path = round_dir(run, k) / eval_dir / "eval.json"
        if path.exists():
            found[k] = json.loads(path.read_text())
    return found


def model_names(results: dict[int, dict]) -> list[str]:
    """Every model any round evaluated, in the order they first appear."""
    return list(dict.fromkeys(name for r in results.values() for name in r.get("models") or {}))


def round_gains(run: Path, results: dict[int, dict], eval_dir: str, confidence: float = 0.95) -> dict:
    """Round k against round 1, per model evaluated in both, paired by prompt: the mean over prompts
    of (the share of the model's round-k replies that pass the oracle) minus (the share of its
    round-1 replies), with its interval; overall and per slice of the test prompts. Both rounds'
    evals use the same prompts and seeds, so the pairing is exact. {} without the oracle."""
    from alignkit.evals.stats import mean_ci

    def read_jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def shares(k: int) -> dict[str, dict[str, float]]:  # model -> prompt id -> share of passing replies
        path = round_dir(run, k) / eval_dir / "generations.jsonl"
        passed: dict[str, dict[str, list[float]]] = {}
        for row in read_jsonl(path) if path.exists() else []:
            for name, reply in row["responses"].items():
                if reply.get("oracle_score") is not None:
                    passed.setdefault(name, {}).setdefault(row["id"], []).append(float(reply["oracle_score"] >= 1.0))
        return {name: {i: sum(v) / len(v) for i, v in per.items()} for name, per in passed.items()}

    prompts = run / "sft" / ("heldout_prompts.jsonl" if eval_dir == "eval" else "validation_prompts.jsonl")
    slices = {p["id"]: p.get("slice") for p in read_jsonl(prompts)} if prompts.exists() else {}
    first, gains = shares(1), {}
    for k in (k for k in results if k > 1):
        later = shares(k)
        for name in (n for n in later if n in first and n != results[k].get("baseline")):
            ids = sorted(set(first[name]) & set(later[name]))
            groups = {"all": ids, **{s: [i for i in ids if slices.get(i) == s]
                                     for s in sorted({slices.get(i) for i in ids} - {None})}}
            gains.setdefault(k, {})[name] = {g: mean_ci([later[name][i] - first[name][i] for i in members], confidence)
                                             for g, members in groups.items() if members}
    return gains


def rounds_section(run: Path, rounds: int, results: dict[int, dict], gains: dict | None = None) -> str:
    """Every round's headline figures side by side (per model: the length-controlled reward-model
    win rate over the baseline, judged by that round's reward model, and the oracle's pass rate,
    the same judge in every round), the policy each round's candidates came from, and a plot.
    ``results``: :func:`round_results`."""
    names = model_names(results)
    head = "".join(f"<th>round {k}: LC win rate vs {html.escape(str(r.get('baseline')))}</th>"
                   f"<th>round {k}: oracle pass rate</th>" for k, r in results.items())
    rows = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
        f"<td>{_interval(figure(r, name, 'lc_win_rate'))}</td><td>{_interval(figure(r, name, 'oracle_pass_rate'))}</td>"
        for r in results.values()) + "</tr>" for name in names)
    table = (f"<table id='rounds'><tr><th>model</th>{head}</tr>{rows}</table>" if results else
             "<p>No round has its evaluation yet.</p>")
    choices = ["<li>round 1: candidates from the SFT model</li>"]
    for k in range(2, rounds + 1):
        path = round_dir(run, k) / CHOSEN_POLICY
        if not path.exists():
            choices.append(f"<li>round {k}: not chosen yet</li>")
            continue
        c = json.loads(path.read_text())
        figures = ", ".join(f"{html.escape(n)} {_interval(f)}" for n, f in c["candidates"].items())
        choices.append(f"<li>round {k}: candidates from round {k - 1}'s <b>{html.escape(c['chosen'])}</b> "
                       f"(<a href='{html.escape(f'round{k}/{CHOSEN_POLICY}')}'>{CHOSEN_POLICY}</a>: highest "
                       f"{html.escape(c['rule_text'])} on the validation prompts: {figures})</li>")
    gain_rows = "".join(
        f"<tr><td>round {k}</td><td>{html.escape(name)}</td><td>{html.escape(group)}</td><td>{g['n']}</td>"
        f"<td>{g['mean']:+.3f}" + (f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" if g["ci"][0] is not None else "")
        + "</td></tr>"
        for k, per_model in (gains or {}).items() for name, per_group in per_model.items()
        for group, g in per_group.items())
    gain_table = (f"<p>Round k against round 1, paired by prompt (the same test prompts and seeds): the oracle's "
                  f"pass share of each model's replies in round k minus in round 1 (95% interval; above 0: round k "
                  f"is better).</p><table id='round-gains'><tr><th>round</th><th>model</th><th>prompts</th><th>n</th>"
                  f"<th>pass share gain over round 1</th></tr>{gain_rows}</table>" if gain_rows else "")
    png = _rounds_png(results) if len(results) > 1 else None
    plot = (f"<p><img id='rounds-plot' alt='scores over rounds' src='data:image/png;base64,{png}' "
            f"style='max-width:100%'></p>" if png else "")
    return (f"<h2>Rounds</h2><p>Each round's held-out evaluation, per model (95% intervals). Win rates are judged "
            f"by that round's reward model, so they compare models within a round; the oracle's pass rate has "
            f"the same judge in every round.</p>{table}{gain_table}<ul>{''.join(choices)}</ul>{plot}")


def _rounds_png(results: dict[int, dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = model_names(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, rule, label in ((axes[0], "lc_win_rate", "LC win rate vs baseline (that round's reward model)"),
                            (axes[1], "oracle_pass_rate", "oracle pass rate")):
        for i, name in enumerate(names):
            points = [(k, f) for k, r in results.items() if (f := figure(r, name, rule))]
            if not points:
                continue
            xs = [k + 0.06 * (i - (len(names) - 1) / 2) for k, _ in points]  # side by side, not on top
            ys = [f["value"] for _, f in points]
            err = error_bars([(f["value"], *(f["ci"] or (None, None))) for _, f in points])
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=name, color=f"C{i}")  # one colour a model
        if rule == "lc_win_rate":
            ax.axhline(0.5, color="k", ls="--", lw=1)
        ax.set_xticks(list(results), [f"round {k}" for k in results])
        ax.set_xlim(min(results) - 0.4, max(results) + 0.4)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return figure_png(fig, dpi=96)
