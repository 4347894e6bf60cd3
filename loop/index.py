"""The loop's index page (``<run>/index.html``) and its terminal summary of the held-out evaluation
(with several rounds, every round's: :mod:`alignkit.loop.rounds`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from alignkit.loop.rounds import round_gains, round_results, rounds_section
from alignkit.runstore import atomic_write_json, atomic_write_text, read_manifest

REPORTS = [  # (stage dir, file, what it is)
    ("sft", "manifest.json", "SFT manifest: loss before/after, held-out leakage check"),
    ("annotate/export", "agreement/report.html", "Annotator agreement (Fleiss' kappa) and the export gate"),
    ("annotate/export", "manifest.json", "Export manifest: pairs, drops per reason"),
    ("reward_eval", "report.html", "Reward model: held-out accuracy, calibration, length correlation"),
    ("dpo", "manifest.json", "DPO manifest: implicit-reward accuracy before/after"),
    ("ppo", "manifest.json", "PPO manifest and metrics.jsonl: reward, KL, entropy per step"),
    ("grpo", "manifest.json", "GRPO manifest and log_history.jsonl: reward, KL per step"),
    ("rloo", "manifest.json", "RLOO manifest and log_history.jsonl: reward, KL per step"),
    ("eval", "report.html", "Held-out (test) evaluation: reward, win rates, oracle, diversity"),
    ("eval_validation", "report.html", "Validation evaluation (evaluate_on=validation, and each round before the "
                                       "last): the same figures, for choosing settings and the next round's policy"),
]


HEADLINES = {
    "sft": ["eval_loss_before", "eval_loss_after"],
    "annotate/export": ["n_pairs", "fleiss_kappa"],
    "reward_eval": ["accuracy", "ece", "length_spearman"],
    "dpo": ["eval_reward_accuracy_before", "eval_reward_accuracy_after"],
    "ppo": ["score_first", "score_last", "kl_last"],
    "grpo": ["reward_first", "reward_last", "kl_last"],
    "rloo": ["reward_first", "reward_last", "kl_last"],
}


def _headline(stage: str, m: dict) -> str:
    metrics, parts = m.get("metrics") or {}, []
    for key in HEADLINES.get(stage, []):
        value = metrics.get(key)
        if isinstance(value, dict):  # per question, e.g. fleiss_kappa
            value = next((v for v in value.values() if isinstance(v, (int, float))), None)
        if isinstance(value, (int, float)):
            parts.append(f"{key} = {value:.3g}")
    return ", ".join(parts)


def write_index(run: Path, timings: dict[str, float] | None = None, eval_dir: str = "eval", rounds: int = 1) -> Path:
    """``<run>/index.html``: each stage's status, headline figures and a link to its report; with
    ``rounds`` > 1 every round's stages too (``round<k>/...``), and the rounds side by side."""
    rows = []
    for k in range(1, rounds + 1):
        prefix = "" if k == 1 else f"round{k}/"
        for stage, file, what in REPORTS:
            if k > 1 and stage == "sft":  # one SFT model serves every round
                continue
            m = read_manifest(run / prefix / stage)
            target = run / prefix / stage / file
            status = m.get("status", "?") if m else "not run"
            link = (f'<a href="{html.escape(f"{prefix}{stage}/{file}")}">{html.escape(what)}</a>' if target.exists()
                    else html.escape(what))
            rows.append(f"<tr><td>{html.escape(prefix + stage)}</td><td class='{html.escape(status)}'>{html.escape(status)}"
                        f"</td><td>{link}</td><td>{html.escape(_headline(stage, m or {}))}</td></tr>")
    title = "Held-out (test) evaluation" if eval_dir == "eval" else "Validation evaluation"
    results = round_results(run, rounds, eval_dir)
    summary = "".join(
        f"<h2>{title}{'' if rounds == 1 else f', round {k}'}</h2><pre>{html.escape(eval_summary(result))}</pre>"
        for k, result in results.items())
    if rounds > 1:
        gains = round_gains(run, results, eval_dir)
        if eval_dir == "eval":  # the figures for machines: rounds.json beside the index
            atomic_write_json(run / "rounds.json", {"eval": eval_dir, "gains_over_round_1": gains})
        summary = rounds_section(run, rounds, results, gains) + summary
    times = "".join(f"<li>{html.escape(k)}: {v:.0f} s</li>" for k, v in (timings or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>alignkit run {html.escape(run.name)}</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4em .6em;text-align:left}}
.completed{{color:#137333}}.failed{{color:#b3261e}}.running{{color:#b06000}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
</head><body><h1>alignkit run: {html.escape(run.name)}</h1>
<p>Every stage of the loop, its status and its report. Stages are skipped when already completed;
run the same command again to resume an interrupted run.</p>
<table><tr><th>stage</th><th>status</th><th>report</th><th>headline</th></tr>{''.join(rows)}</table>
{summary}{f'<h2>This invocation</h2><ul>{times}</ul>' if times else ''}</body></html>"""
    out = run / "index.html"
    atomic_write_text(out, page)
    return out


def eval_summary(result: dict) -> str:
    """One line per model: reward, win rates against the baseline, the oracle's pass rate and
    paired win rate (95% CIs), then whether each model beats the baseline: its win rate's whole
    confidence interval above 0.5."""
    def interval(d: dict | None, key: str) -> str:
        if not d or d.get(key) is None:
            return "-"
        lo, hi = d.get("ci") or (None, None)
        return f"{d[key]:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{d[key]:.3f}"

    source, base = result.get("primary_reward"), result.get("baseline")
    lines = [f"{'model':8} {'reward':24} {'win rate vs ' + str(base):24} {'length-controlled':24} "
             f"{'oracle pass rate':24} {'oracle win rate vs ' + str(base):24}"]
    verdicts = []
    for name, m in (result.get("models") or {}).items():
        reward = (m.get("reward") or {}).get(source)
        win = (m.get("win_rate") or {}).get(source)
        lc = (m.get("lc_win_rate") or {}).get(source)
        oracle = m.get("oracle") or {}
        lines.append(f"{name:8} {interval(reward, 'mean'):24} {interval(win, 'win_rate'):24} "
                     f"{interval(lc, 'win_rate'):24} {interval(oracle.get('pass'), 'rate'):24} "
                     f"{interval(oracle.get('win_rate'), 'win_rate'):24}")
        if name in ("base", base):
            continue
        judged = [(what, beats(d)) for what, d in (("the reward model", win), ("the oracle", oracle.get("win_rate"))) if d]
        if judged:
            verdicts.append(f"{name} vs {base}: " + "; ".join(f"by {what}: {v}" for what, v in judged))
    return "\n".join(lines + ([""] + verdicts if verdicts else []) + _slice_lines(result, interval)
                     + _forgetting_lines(result))


def _forgetting_lines(result: dict) -> list[str]:
    """Each model's general-text perplexity and its change against the model the loop started from."""
    f = result.get("forgetting")
    if not f:
        return []
    lines = ["", f"forgetting: perplexity on {f['texts']} general texts vs {f['reference']} "
                 f"(flagged above +{f['threshold']:.0%} with the paired interval above 0)"]
    for name, m in f["models"].items():
        flag = "  FLAGGED: general ability lost" if m["flagged"] else ""
        lines.append(f"{name:10} {m['perplexity']:8.2f}  {m['change']:+7.1%}{flag}")
    return lines


def _slice_lines(result: dict, interval) -> list[str]:
    """Per slice of the prompts (e.g. demo vs held-out phrasings): each model's oracle pass rate,
    its paired gain over the baseline, and its length-controlled win rate."""
    slices, source, base = result.get("slices") or {}, result.get("primary_reward"), result.get("baseline")
    if not slices:
        return []
    lines = ["", f"{'slice':22} {'model':8} {'oracle pass rate':24} {'pass gain vs ' + str(base):26} "
                 f"{'length-controlled':24}"]
    for label, part in slices.items():
        for name, m in part["models"].items():
            oracle = m.get("oracle") or {}
            lc = (m.get("lc_win_rate") or {}).get(source)
            gain = oracle.get("pass_gain")
            gain_text = "-" if not gain or gain.get("mean") is None else (
                f"{gain['mean']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}]" if gain["ci"][0] is not None
                else f"{gain['mean']:+.3f}")
            lines.append(f"{label + ' (' + str(part['n_prompts']) + ')':22} {name:8} "
                         f"{interval(oracle.get('pass'), 'rate'):24} {gain_text:26} {interval(lc, 'win_rate'):24}")
    return lines


def beats(win: dict) -> str:
    """'beats' when the win rate's confidence interval lies above 0.5, 'loses' when below, else 'no
    clear difference'."""
    lo, hi = win.get("ci") or (None, None)
    if lo is None:
        return "no data"
    return "beats (CI above 0.5)" if lo > 0.5 else "loses (CI below 0.5)" if hi < 0.5 else "no clear difference (CI spans 0.5)"
