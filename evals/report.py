"""``report.html`` of an eval run: one self-contained file (inline CSS, plots as inline PNG).

Sections: headline table, plots (reward distributions, win rates with intervals, reward vs
length, oracle pass rates), the human evaluations when there are any (:mod:`alignkit.evals.human`),
sample generations side by side, and what each number means. Every piece of model or prompt text
is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path

from alignkit.plots import error_bars, figure_png
from alignkit.runstore import atomic_write_text

CSS = """
.bad{color:#b00020}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.samples td{max-width:360px}.samples pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.85em;font-family:ui-monospace,monospace}
.meta{color:#666;font-size:.85em}.plots img{max-width:100%;border:1px solid #eee;margin:6px 0;display:block}
.note{background:#f8f8f0;border-left:3px solid #cc9;padding:6px 10px;font-size:.9em}
dt{font-weight:600;margin-top:.6em}dd{margin-left:1.2em}
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return _esc(x)


def _ci(c: dict | None, key: str = "mean", digits: int = 3) -> str:
    if not c or c.get(key) is None:
        return "–"
    lo, hi = c.get("ci", [None, None])
    if lo is None:
        return _fmt(c[key], digits)
    return f"{_fmt(c[key], digits)} <span class=meta>[{_fmt(lo, digits)}, {_fmt(hi, digits)}]</span>"


def _png(fig) -> str:
    return figure_png(fig, dpi=96)

def _plots(result: dict, rows: list[dict]) -> list[tuple[str, str]]:
    """(alt text, base64 PNG) per plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result["models"])
    sources = list(result["reward_sources"])
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    plots = []
    rng = np.random.default_rng(0)

    for src in sources:  # reward distributions
        fig, ax = plt.subplots(figsize=(7, 3.2))
        data = [[r["responses"][n]["rewards"][src] for r in rows] for n in names]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names)
        for i, vals in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=10, alpha=0.5, color=colors[names[i - 1]])
        ax.set_ylabel(f"reward ({src})")
        ax.set_title(f"Reward per reply ({src}); box = quartiles, dots = replies")
        plots.append((f"reward distribution {src}", _png(fig)))

    bars = []  # (label, value, lo, hi)
    for n in names:
        m = result["models"][n]
        for src in sources:
            if "win_rate" in m:
                w, lc = m["win_rate"][src], m["lc_win_rate"][src]
                bars.append((f"{n}: {src}", w["win_rate"], *w["ci"]))
                bars.append((f"{n}: {src}, length-controlled", lc["win_rate"], *lc["ci"]))
        if "oracle" in m and "win_rate" in m["oracle"]:
            o = m["oracle"]["win_rate"]
            bars.append((f"{n}: oracle", o["win_rate"], *o["ci"]))
    if bars:
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(bars) + 1.2))
        y = np.arange(len(bars))[::-1]
        vals = np.array([b[1] for b in bars], dtype=float)
        err = error_bars([(b[1], b[2], b[3]) for b in bars])
        ax.barh(y, vals, xerr=err, capsize=4, color=["#8fb3d9" if "length" not in b[0] else "#d9b38f" for b in bars])
        ax.set_yticks(y, [b[0] for b in bars])
        ax.axvline(0.5, color="k", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"win rate vs {result['baseline']} (ties count half), {int(result['confidence'] * 100)}% interval")
        ax.set_title("Win rates against the baseline")
        plots.append(("win rates", _png(fig)))

    if sources:  # reward vs length
        src = result["primary_reward"]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for n in names:
            xs = [r["responses"][n]["n_words"] for r in rows]
            ys = [r["responses"][n]["rewards"][src] for r in rows]
            ax.scatter(xs, ys, s=14, alpha=0.6, label=n, color=colors[n])
        ax.set_xlabel("reply length (words)")
        ax.set_ylabel(f"reward ({src})")
        ax.set_title("Reward vs length: a slope here is what length control removes")
        ax.legend(fontsize=8)
        plots.append(("reward vs length", _png(fig)))

    if result.get("oracle_prompts"):
        fig, ax = plt.subplots(figsize=(7, 3))
        ps = [result["models"][n]["oracle"]["pass"] for n in names]
        vals = np.array([p["rate"] for p in ps], dtype=float)
        err = error_bars([(p["rate"], *p["ci"]) for p in ps])
        ax.bar(range(len(names)), vals, yerr=err, capsize=4, color=[colors[n] for n in names])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0, 1)
        ax.set_ylabel("constraint pass rate")
        ax.set_title(f"Oracle: replies that satisfy the prompt's constraint ({result['oracle_prompts']} prompts)")
        plots.append(("oracle pass rate", _png(fig)))
    return plots


def _summary_table(result: dict) -> str:
    sources = list(result["reward_sources"])
    head = ["model"]
    for s in sources:
        head += [f"reward ({s})", f"win rate ({s})", f"LC win rate ({s})"]
    head += ["KL to " + result["kl_reference"], "tokens", "words", "stopped at EOS", "distinct-1", "distinct-2"]
    if result.get("oracle_prompts"):
        head += ["oracle score", "oracle pass rate", "oracle win rate"]
    out = ["<table id=summary><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for name, m in result["models"].items():
        cells = [f"<th>{_esc(name)}{' (baseline)' if name == result['baseline'] else ''}</th>"]
        for s in sources:
            cells.append(f"<td class=num>{_ci(m['reward'][s])}</td>")
            cells.append(f"<td class=num>{_ci(m.get('win_rate', {}).get(s), 'win_rate')}</td>")
            cells.append(f"<td class=num>{_ci(m.get('lc_win_rate', {}).get(s), 'win_rate')}</td>")
        cells.append(f"<td class=num>{_ci(m['kl'])}</td>")
        cells.append(f"<td class=num>{_ci(m['length']['tokens'], digits=1)}</td>")
        cells.append(f"<td class=num>{_ci(m['length']['words'], digits=1)}</td>")
        cells.append(f"<td class=num>{_fmt(m['length']['finished_fraction'], 2)}</td>")
        cells.append(f"<td class=num>{_fmt(m['diversity']['distinct_1'])}</td>")
        cells.append(f"<td class=num>{_fmt(m['diversity']['distinct_2'])}</td>")
        if result.get("oracle_prompts"):
            o = m["oracle"]
            cells.append(f"<td class=num>{_ci(o['score'])}</td>")
            cells.append(f"<td class=num>{_ci(o['pass'], 'rate')}</td>")
            cells.append(f"<td class=num>{_ci(o.get('win_rate'), 'win_rate')}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _groups_table(result: dict, key: str) -> str:
    """Per slice (or constraint type): each model's oracle pass rate, its paired pass gain over the
    baseline and its length-controlled win rate by the primary reward."""
    groups, source = result.get(key) or {}, result.get("primary_reward")
    if not groups:
        return ""
    label = "slice" if key == "slices" else "constraint type"
    out = [f"<table id={_esc(key)}><thead><tr><th>{label}</th><th>prompts</th><th>model</th><th>oracle pass rate</th>"
           f"<th>pass gain vs {_esc(result['baseline'])}</th><th>LC win rate ({_esc(source or '-')})</th></tr></thead><tbody>"]
    for name, part in groups.items():
        for model, m in part["models"].items():
            o = m.get("oracle") or {}
            out.append(f"<tr><th>{_esc(name)}</th><td class=num>{part['n_prompts']}</td><td>{_esc(model)}</td>"
                       f"<td class=num>{_ci(o.get('pass'), 'rate')}</td><td class=num>{_ci(o.get('pass_gain'))}</td>"
                       f"<td class=num>{_ci((m.get('lc_win_rate') or {}).get(source), 'win_rate')}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _aspects_table(result: dict) -> str:
    a = result.get("aspects")
    if not a:
        return ""
    names = list(next(iter(a["models"].values())))
    weights = a.get("weights")
    out = [f"<p class=meta>Each head of the multi-aspect reward model, mean over prompts ({_esc(a['scale'])}). "
           + (f"The reward above combines them with the weights {_esc(weights)}." if weights else
              "The reward above is the reward head alone.") + "</p>",
           "<table id=aspects><thead><tr><th>model</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names)
           + "</tr></thead><tbody>"]
    for model, per in a["models"].items():
        out.append(f"<tr><th>{_esc(model)}</th>" + "".join(f"<td class=num>{_ci(per[n])}</td>" for n in names) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _forgetting_table(result: dict) -> str:
    f = result.get("forgetting")
    if not f:
        return ""
    out = [f"<p class=meta>Perplexity on {f['texts']} general texts ({f['tokens']} tokens) that no stage trains on, "
           f"against <b>{_esc(f['reference'])}</b>; a model is flagged when its perplexity rose by more than "
           f"{f['threshold']:.0%} and the paired per-text difference's interval lies above 0.</p>",
           "<table id=forgetting><thead><tr><th>model</th><th>perplexity</th><th>change</th>"
           "<th>per-token NLL difference (nats)</th><th>forgetting</th></tr></thead><tbody>"]
    for name, m in f["models"].items():
        flag = "<b class=bad>flagged</b>" if m["flagged"] else ("reference" if name == f["reference"] else "no")
        out.append(f"<tr><th>{_esc(name)}</th><td class=num>{_fmt(m['perplexity'], 2)}</td>"
                   f"<td class=num>{m['change']:+.1%}</td><td class=num>{_ci(m['nll_diff'])}</td><td>{flag}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _samples_table(result: dict, rows: list[dict], n: int) -> str:
    names = list(result["models"])
    head = "<tr><th>prompt</th>" + "".join(f"<th>{_esc(m)}</th>" for m in names) + "</tr>"
    body = []
    for r in [r for r in rows if r.get("sample", 0) == 0][:n]:
        prompt = "\n".join(f"[{m['role']}] {m['content']}" if m["role"] != "user" else m["content"] for m in r["prompt"])
        extra = ""
        if r.get("constraint"):
            extra += f"<div class=meta>constraint: {_esc(r['constraint'])}</div>"
        if r.get("reference"):
            extra += f"<div class=meta>reference:</div><pre>{_esc(r['reference'])}</pre>"
        cells = [f"<td><pre>{_esc(prompt)}</pre>{extra}</td>"]
        for m in names:
            resp = r["responses"][m]
            meta = [f"{_esc(k)} {_fmt(v)}" for k, v in resp["rewards"].items()]
            if "oracle_score" in resp:
                meta.append(f"oracle {_fmt(resp['oracle_score'], 2)}")
            meta.append(f"{resp['n_tokens']} tok{'' if resp['finished'] else ', cut'}")
            cells.append(f"<td><pre>{_esc(resp['text']) or '<i>(empty)</i>'}</pre><div class=meta>{' · '.join(meta)}</div></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class=samples id=samples><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


EXPLAIN = """
<dl>
<dt>Reward</dt><dd>Mean score of the model's replies under each reward source, with a Student-t interval over prompts.
Reward-model scores are only comparable with each other, not across reward models.</dd>
<dt>Forgetting</dt><dd>Each model's perplexity on general text that no stage trained on (computed with the
evaluate metric in alignkit/evals/perplexity_metric.py), its change against the reference model, and the mean per-text
difference in negative log-likelihood per token with a Student-t interval over texts. A rise means the model lost some
of its general language ability while it learnt the task.</dd>
<dt>Win rate</dt><dd>Share of prompts where the model's reply scores higher than the baseline's reply to the same prompt
(with several replies per prompt: the mean score of its replies); a tie counts half and identical replies always tie. The interval is the Wilson interval of the chance of winning a prompt that is not a tie, scaled by the share of such prompts.</dd>
<dt>Length-controlled (LC) win rate</dt><dd>Reward models often prefer longer replies. Per prompt, the reward difference
<i>d</i> is regressed on the length difference <i>l</i> (in words): <i>d ≈ a + b·l</i>. The LC win rate is the win rate of
<i>d − b·l</i>, the difference with the length effect removed. A model whose win rate drops a lot under length control
is winning by writing more, not by writing better.</dd>
<dt>KL to the reference</dt><dd>Mean over prompts of Σ<sub>t</sub> [log p<sub>model</sub>(y<sub>t</sub>) − log p<sub>ref</sub>(y<sub>t</sub>)]
over the tokens of the model's own reply: how far it has moved from the reference, in nats per reply. Unbiased only for
replies sampled at temperature 1 without top-p/top-k (see the estimator note in eval.json).</dd>
<dt>Distinct-1/2</dt><dd>Distinct words (word pairs) over all words (word pairs) in all of a model's replies: low values
mean repetitive or collapsed outputs.</dd>
<dt>Oracle</dt><dd>For prompts that state a checkable constraint ("answer in at most 25 words", "start with …"),
<code>alignkit.oracle.constraint_score</code> in [0, 1]; pass = score 1. The oracle win rate compares the scores with the
baseline's per prompt. It does not depend on any learned model, so it cannot be gamed the way a reward model can.</dd>
</dl>
<p class=meta>Details: docs/evaluation.md. Per-reply numbers: generations.jsonl. All numbers: eval.json.</p>
"""


def _human_section(human: list[dict]) -> str:
    """One row per human A/B evaluation (alignkit.evals.human): the annotators' win rate of B over A
    next to the eval's automatic win rates on the same replies."""
    out = ["<p class=meta>Annotators saw each prompt with the two models' first replies in a shuffled order, "
           "never the models' names, and picked the better one or a tie. Win rate of B over A from each "
           "prompt's majority answer (a tie counts half; prompts without a majority are left out); Fleiss' "
           "kappa of the annotators' answers.</p>",
           "<table id=human><thead><tr><th>B vs A</th><th>human win rate</th><th>wins / ties / losses</th>"
           "<th>no majority</th><th>annotators</th><th>Fleiss' kappa</th><th>automatic win rates, same replies</th>"
           "</tr></thead><tbody>"]
    for h in human:
        auto = " · ".join(f"{_esc(src)} {_ci(w, 'win_rate')}" for src, w in h["automatic"].items()) or "–"
        k = h["agreement"]
        out.append(f"<tr><th>{_esc(h['b'])} vs {_esc(h['a'])}</th><td class=num>{_ci(h, 'win_rate')}</td>"
                   f"<td class=num>{h['wins']} / {h['ties']} / {h['losses']}</td><td class=num>{h['n_no_majority']}</td>"
                   f"<td class=num>{h['n_annotators']} {_esc(h['annotators'])}</td>"
                   f"<td class=num>{_ci(k, 'fleiss_kappa')} <span class=meta>{_esc(k.get('band') or '')}</span></td>"
                   f"<td>{auto}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render(result: dict, rows: list[dict], samples: int = 12, human: list[dict] | None = None) -> str:
    plots = _plots(result, rows)
    g = result["generation"]
    k = result.get("samples_per_prompt", 1)
    gen = ("sampled" if g["do_sample"] else "greedy") + f", max {g['max_new_tokens']} new tokens, seed {g['seed']}"
    if k > 1:
        gen += f", {k} replies per prompt (per-prompt numbers are their means)"
    if g["do_sample"]:
        gen += f", temperature {g['temperature']}, top-p {g['top_p']}, top-k {g['top_k']}"
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>alignkit eval</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>alignkit evaluation</h1>",
        (f"<p class=meta>{result['n_prompts']} prompts from {_esc(result['prompts'])}; baseline <b>{_esc(result['baseline'])}</b>; "
         f"KL reference <b>{_esc(result['kl_reference'])}</b>; generation: {_esc(gen)}; "
         f"rewards: {_esc(', '.join(f'{k} = {v}' for k, v in result['reward_sources'].items()) or 'none')}; "
         f"intervals: {int(result['confidence'] * 100)}%.</p>"),
        "<h2>Summary</h2>", _summary_table(result),
        *(["<h2>By slice</h2><p class=meta>The prompts' own slices, e.g. the demo test set's phrasings seen in "
           "training (demo_phrasing) and phrasings no training or validation prompt uses (heldout_phrasing). "
           "Pass gain: per prompt, the model's share of passing replies minus the baseline's, averaged.</p>",
           _groups_table(result, "slices")] if result.get("slices") else []),
        *(["<h2>By constraint type</h2>", _groups_table(result, "by_constraint_type")]
          if result.get("by_constraint_type") else []),
        *(["<h2>Reward model aspects</h2>", _aspects_table(result)] if result.get("aspects") else []),
        *(["<h2>Forgetting (general text)</h2>", _forgetting_table(result)] if result.get("forgetting") else []),
        *(["<h2>Human evaluation</h2>", _human_section(human)] if human else []),
        "<h2>Plots</h2><div class=plots>",
        *[f"<img alt='{_esc(alt)}' src='data:image/png;base64,{b64}'>" for alt, b64 in plots],
        "</div>",
        (f"<h2>Sample generations</h2><p class=meta>The first {min(samples, result['n_prompts'])} prompts"
         f"{', first reply of each' if k > 1 else ''}; every reply is in generations.jsonl.</p>"),
        _samples_table(result, rows, samples),
        "<h2>What the numbers mean</h2>", EXPLAIN,
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(result: dict, rows: list[dict], path: str | Path, samples: int = 12,
                 human: list[dict] | None = None) -> Path:
    path = Path(path)
    atomic_write_text(path, render(result, rows, samples, human))
    return path
