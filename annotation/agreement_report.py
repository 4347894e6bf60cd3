"""The agreement report: ``agreement.json``, ``report.md`` and a self-contained ``report.html``.

The HTML page has no external resources (plots are inline PNGs, styles inline) and explains every
number for readers who do not know the statistics; ``report.md`` is the same summary for a
terminal or a pull request. :func:`summary_table` is the plain-text table the CLI prints.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path

import numpy as np
from alignkit.annotation.agreement import FLAG_MARGIN, FLAG_MIN_ITEMS
from alignkit.annotation.agreement_measures import landis_koch
from alignkit.plots import figure_png
from alignkit.runstore import atomic_write_text

HEATMAP_MAX_ANNOTATORS = 25   # heatmaps show the annotators with the most ratings
HEATMAP_MIN_SHARED = 5        # pairs sharing fewer items are greyed out in the heatmaps


def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _fmt_ci(ci):
    return "–" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fig_png(fig) -> str:
    return figure_png(fig, dpi=110)

BAND_COLORS = {"poor": "#b91c1c", "slight": "#dc2626", "fair": "#ea580c", "moderate": "#ca8a04",
               "substantial": "#16a34a", "almost perfect": "#15803d", "undefined": "#6b7280"}


def _plots(result) -> dict:
    """Base64 PNGs: ``kappa`` (per question), ``annotators`` (agreement with the majority),
    ``heatmaps`` (question -> pairwise Cohen's kappa); a plot with nothing to show is left out."""
    import matplotlib
    matplotlib.use("Agg", force=False) if matplotlib.get_backend().lower() != "agg" else None
    import matplotlib.pyplot as plt
    plots = {}
    qs = [r for r in result["questions"].values() if r.get("fleiss_kappa") is not None]
    if qs:
        plots["kappa"] = _kappa_plot(plt, qs, (result.get("gate") or {}).get("min_kappa"))
    ann = [a for a in result["annotators"] if a["loo_majority_agreement"] is not None]
    if ann:
        plots["annotators"] = _annotator_plot(plt, ann, result.get("annotator_median_agreement"))
    heat = {}
    for q, r in result["questions"].items():
        pairs = r.get("pairwise_cohen_kappa") or []
        if pairs:
            heat[q] = _pairs_heatmap(plt, q, pairs, r["annotators"])
    plots["heatmaps"] = heat
    return plots


def _kappa_plot(plt, qs, gate_t) -> str:
    """Fleiss' kappa per question with its CI, over the Landis & Koch bands (and the gate line)."""
    fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(qs)))
    names = [r["question"] for r in qs][::-1]
    ks = np.array([r["fleiss_kappa"] for r in qs][::-1])
    lo = np.array([r["ci"][0] if r["ci"][0] is not None else k for r, k in zip(qs[::-1], ks)])
    hi = np.array([r["ci"][1] if r["ci"][1] is not None else k for r, k in zip(qs[::-1], ks)])
    for x0, x1, c in [(-1, 0, "#fde2e2"), (0, .2, "#fee9d6"), (.2, .4, "#fef3c7"),
                      (.4, .6, "#fef9c3"), (.6, .8, "#dcfce7"), (.8, 1, "#bbf7d0")]:
        ax.axvspan(x0, x1, color=c, zorder=0)
    ax.barh(names, ks, color=[BAND_COLORS[landis_koch(k)] for k in ks], height=0.55, zorder=2)
    ax.errorbar(ks, names, xerr=[ks - lo, hi - ks], fmt="none", ecolor="#111827",
                capsize=4, lw=1.2, zorder=3)
    if gate_t is not None:
        ax.axvline(gate_t, color="#1d4ed8", ls="--", lw=1.2, zorder=4,
                   label=f"gate κ ≥ {gate_t:g}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(min(-0.05, float(np.nanmin(lo)) - 0.05), 1.0)
    ax.set_xlabel("Fleiss' κ with 95% bootstrap CI  (bands: Landis & Koch)")
    ax.grid(axis="x", alpha=.3, zorder=1)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _fig_png(fig)


def _annotator_plot(plt, ann, med) -> str:
    """The 40 annotators least in agreement with the majority, with the median and flag lines."""
    ann = sorted(ann, key=lambda a: a["loo_majority_agreement"])[:40]
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.32 * len(ann)))
    ys = [str(a["annotator"]) for a in ann]
    vs = [a["loo_majority_agreement"] for a in ann]
    colors = ["#dc2626" if a["flagged"] else "#2563eb" if a["n_items_compared"] >= FLAG_MIN_ITEMS
              else "#9ca3af" for a in ann]
    ax.barh(ys, vs, color=colors, height=.6)
    if med is not None:
        ax.axvline(med, color="#111827", ls=":", lw=1, label=f"median {med:.2f}")
        ax.axvline(med - FLAG_MARGIN, color="#dc2626", ls="--", lw=1,
                   label=f"flag line {med - FLAG_MARGIN:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    for y, v, a in zip(ys, vs, ann):
        few = " - too few to judge" if a["n_items_compared"] < FLAG_MIN_ITEMS else ""
        ax.text(min(v + 0.01, 0.80), y, f"{v:.2f} (n={a['n_items_compared']}{few})",
                va="center", fontsize=7.5)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("agreement with the majority of the other annotators")
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _fig_png(fig)


def _pairs_heatmap(plt, q, pairs, annotators) -> str:
    """Cohen's kappa of every pair of the HEATMAP_MAX_ANNOTATORS busiest annotators of question ``q``."""
    n_by = {a["annotator"]: a["n_ratings"] for a in annotators}
    names = sorted(n_by, key=lambda a: (-n_by[a], a))[:HEATMAP_MAX_ANNOTATORS]
    names.sort()
    idx = {a: i for i, a in enumerate(names)}
    mat = np.full((len(names), len(names)), np.nan)
    for p in pairs:
        i, j = idx.get(p["annotator_a"]), idx.get(p["annotator_b"])
        if i is None or j is None or p["cohen_kappa"] is None or p["n_items"] < HEATMAP_MIN_SHARED:
            continue
        mat[i, j] = mat[j, i] = p["cohen_kappa"]
    np.fill_diagonal(mat, 1.0)
    sz = 1.6 + 0.42 * len(names)
    fig, ax = plt.subplots(figsize=(sz + 1.2, sz))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#e5e7eb")
    im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=-0.2, vmax=1.0)
    ax.set_xticks(range(len(names)), [str(n) for n in names], rotation=60, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(names)), [str(n) for n in names], fontsize=8)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if i != j and np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(str(q), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cohen's κ")
    return _fig_png(fig)


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f8fafc;color:#0f172a;line-height:1.45}
main{max-width:1060px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.2rem;margin:34px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.sub{color:#475569;font-size:.9rem}
.explain{color:#334155;font-size:.92rem;background:#fff;border-left:4px solid #93c5fd;padding:8px 12px;margin:8px 0 14px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.88rem;box-shadow:0 1px 2px rgba(0,0,0,.05)}
th,td{padding:6px 9px;border-bottom:1px solid #e2e8f0;text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.chip{display:inline-block;border-radius:10px;padding:1px 8px;color:#fff;font-size:.78rem;white-space:nowrap}
.verdict{padding:12px 16px;border-radius:6px;font-weight:600;margin:16px 0}
.pass{background:#dcfce7;color:#14532d;border:1px solid #86efac}.fail{background:#fee2e2;color:#7f1d1d;border:1px solid #fca5a5}
img{max-width:100%;background:#fff;border:1px solid #e2e8f0;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid img{max-width:48%}
.flag{color:#b91c1c;font-weight:600}code{background:#f1f5f9;padding:0 4px;border-radius:3px}
.ans{display:inline-block;background:#f1f5f9;border:1px solid #e2e8f0;border-radius:4px;padding:0 6px;margin:1px 2px;font-size:.8rem;white-space:nowrap}
details{margin:6px 0}summary{cursor:pointer;padding:6px 2px}table.lowest td:first-child{white-space:nowrap}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}.card{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:1.3rem}.card span{color:#64748b;font-size:.8rem}
"""


def _chip(band):
    return f'<span class="chip" style="background:{BAND_COLORS.get(band, "#6b7280")}">{_e(band)}</span>'


def _table_open(attrs: str, headers) -> str:
    return f"<table {attrs}><thead><tr>" + "".join(f"<th>{x}</th>" for x in headers) + "</tr></thead><tbody>"


def _render_html(result, plots) -> str:
    """The report page: what was measured and the gate's verdict first, then a section per
    question a reader asks (how much agreement, who disagrees, which items, what was left out)."""
    parts = (_html_header(result) + _summary_section(result, plots) + _annotator_section(result, plots)
             + _pairs_section(result, plots) + _lowest_section(result) + _policy_section(result)
             + _data_section(result))
    return "\n".join(parts)


def _html_header(result) -> list[str]:
    d = result["data"]
    h = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
         "<meta name='viewport' content='width=device-width,initial-scale=1'>",
         "<title>Annotation agreement report</title><style>", CSS, "</style></head><body><main>",
         "<h1>Annotation agreement report</h1>",
         f"<div class='sub'>Source: <code>{_e(result.get('source', '(in memory)'))}</code> · "
         f"generated {_e(result.get('generated_at', ''))} · {_e(result['settings']['n_bootstrap'])} bootstrap resamples, seed {_e(result['settings']['seed'])}</div>"]
    g = result.get("gate")
    if g:
        if g["passed"]:
            h.append(f"<div class='verdict pass' id='verdict'>Gate PASSED: every checked question has "
                     f"Fleiss' κ ≥ {g['min_kappa']:g}.</div>")
        else:
            items = "".join(f"<li>{_e(f)}</li>" for f in g["failures"])
            h.append(f"<div class='verdict fail' id='verdict'>Gate FAILED (minimum κ "
                     f"{g['min_kappa']:g}):<ul>{items}</ul></div>")
    h.append("<div class='cards'>"
             f"<div class='card'><b>{d['n_items']}</b><span>items</span></div>"
             f"<div class='card'><b>{d['n_annotators']}</b><span>annotators</span></div>"
             f"<div class='card'><b>{d['n_questions']}</b><span>questions</span></div>"
             f"<div class='card'><b>{d['n_rows_used']}</b><span>answers used</span></div></div>")
    return h


def _summary_section(result, plots) -> list[str]:
    h = ["<h2>Summary</h2><div class='explain'><b>κ (kappa)</b> measures how much annotators "
         "agree beyond what chance alone would give: 1 = perfect agreement, 0 = no better than "
         "guessing, below 0 = systematic disagreement. The <b>95% interval</b> shows how much "
         "κ could move with a different sample of items - a wide interval means too few items "
         "to be sure. <b>Raw agreement</b> is the plain share of annotator pairs giving the same "
         "answer (it looks high when one answer dominates; κ corrects for that). For 1–5 ratings, "
         "<b>α ordinal</b> (Krippendorff) also gives partial credit for near misses (4 vs 5 "
         "counts less against agreement than 1 vs 5). For comparison, published preference data "
         "typically reaches κ 0.4–0.6; InstructGPT labelers agreed 72.6% of the time.</div>",
         _table_open("id='summary'", ["Question", "Type", "Items", "Raters / item", "Fleiss' κ", "95% interval",
                                      "Meaning", "Raw agreement", "α ordinal", "Items left out of κ"])]
    for q, r in result["questions"].items():
        if r.get("skipped"):
            h.append(f"<tr><td>{_e(q)}</td><td colspan='9'>skipped: {_e(r['skipped'])}</td></tr>")
            continue
        h.append(f"<tr><td>{_e(q)}</td><td>{_e(r['type'])}</td><td class='num'>{r['n_items']}</td>"
                 f"<td class='num'>{r['n_raters']}</td><td class='num'><b>{_fmt(r['fleiss_kappa'])}</b></td>"
                 f"<td class='num'>{_fmt_ci(r['ci'])}</td><td>{_chip(r['band'])}</td>"
                 f"<td class='num'>{_fmt(r.get('observed_agreement'))}</td>"
                 f"<td class='num'>{_fmt(r.get('krippendorff_alpha_ordinal'))}</td>"
                 f"<td class='num'>{r['n_items_excluded']}</td></tr>")
    h.append("</tbody></table><p class='sub'>Meaning follows Landis &amp; Koch (1977): &lt;0 poor, "
             "0–0.20 slight, 0.21–0.40 fair, 0.41–0.60 moderate, 0.61–0.80 substantial, "
             "0.81–1 almost perfect.</p>")
    if plots.get("kappa"):
        h.append(f"<img id='kappa-plot' alt='Fleiss kappa per question with 95% intervals' "
                 f"src='data:image/png;base64,{plots['kappa']}'>")
    return h


def _annotator_section(result, plots) -> list[str]:
    h = ["<h2>Annotators</h2><div class='explain'>For each answer, we look at what the "
         "<i>other</i> annotators of the same item chose by majority, and count how often this "
         "annotator matched it. Items with fewer than two other annotators, or where the others "
         "are split evenly, are skipped. An annotator far below the rest may have misread the "
         f"guidelines or be answering carelessly: {_e(result['annotator_flag_rule'])} "
         "(shown in red).</div>"]
    if plots.get("annotators"):
        h.append(f"<img id='annotator-plot' alt='Annotator agreement with majority' "
                 f"src='data:image/png;base64,{plots['annotators']}'>")
    h.append(_table_open("id='annotators'", ["Annotator", "Answers", "Items compared", "Matches majority",
                                             "Ties skipped", ""]))
    for a in sorted(result["annotators"], key=lambda a: (a["loo_majority_agreement"] is None,
                                                         a["loo_majority_agreement"] or 0)):
        h.append(f"<tr><td>{_e(a['annotator'])}</td><td class='num'>{a['n_ratings']}</td>"
                 f"<td class='num'>{a['n_items_compared']}</td>"
                 f"<td class='num'>{_fmt(a['loo_majority_agreement'])}</td>"
                 f"<td class='num'>{a['n_ties_excluded']}</td>"
                 f"<td>{'<span class=flag>check this annotator</span>' if a['flagged'] else ''}</td></tr>")
    h.append("</tbody></table>")
    return h


def _pairs_section(result, plots) -> list[str]:
    if not plots.get("heatmaps"):
        return []
    h = ["<h2>Annotator pairs</h2><div class='explain'>Cohen's κ for every pair of "
         "annotators, on the items both answered. A row that is red across the board "
         "points at one annotator who disagrees with everyone; grey means the pair shared "
         f"fewer than {HEATMAP_MIN_SHARED} items (or κ is undefined)."
         + (f" Only the {HEATMAP_MAX_ANNOTATORS} annotators with the most answers are shown; "
            "all pairs are in agreement.json." if len(result["annotators"]) >
            HEATMAP_MAX_ANNOTATORS else "") + "</div><div class='grid'>"]
    for q, png in plots["heatmaps"].items():
        h.append(f"<img class='heatmap' alt='Pairwise Cohen kappa for {_e(q)}' "
                 f"src='data:image/png;base64,{png}'>")
    h.append("</div>")
    return h


def _lowest_section(result) -> list[str]:
    h = ["<h2>Items to adjudicate</h2><div class='explain'>Per question, the items where "
         "annotators agreed least (agreement = share of annotator pairs that gave the same "
         "answer; for ratings, ties are broken by the spread of the scores). These are worth a "
         "second look: the item may be ambiguous, or the guidelines unclear.</div><div id='lowest'>"]
    first = True
    for q, r in result["questions"].items():
        low = r.get("lowest_items") or []
        if not low:
            continue
        h.append(f"<details{' open' if first else ''}><summary><b>{_e(q)}</b> "
                 f"<span class='sub'>({len(low)} items, agreement {low[0]['agreement']:.2f}–"
                 f"{low[-1]['agreement']:.2f})</span></summary>"
                 + _table_open("class='lowest'", ["Item", "Agreement", "Raters", "Answers"]))
        first = False
        for it in low:
            vals = " ".join(f"<span class='ans'>{_e(a)}: <b>{_e(v)}</b></span>"
                            for a, v in it["values"].items())
            h.append(f"<tr><td>{_e(it['item_id'])}</td><td class='num'>{_fmt(it['agreement'], 2)}"
                     f"</td><td class='num'>{it['n_raters']}</td><td>{vals}</td></tr>")
        h.append("</tbody></table></details>")
    h.append("</div>")
    return h


def _policy_section(result) -> list[str]:
    h = ["<h2>Items with an unusual number of annotators</h2><div class='explain' id='policy'>"
         "Fleiss' κ needs every item to have the same number of annotators. We use the most "
         "common number (m). Items that have <i>more</i> than m annotators keep m of them, "
         "picked by a fixed rule (a hash of item and annotator name, so the choice is "
         "repeatable and does not favour any annotator). Items with <i>fewer</i> than m "
         "annotators are left out of κ, and items with only one answer are left out of "
         "everything. Raw agreement, α, the pair table and the annotator table still use every "
         "answer of every item with at least two answers.</div>",
         _table_open("id='exclusions'", ["Question", "m", "Items", "Trimmed to m", "Left out of κ", "Why",
                                         "Raters per item"])]
    for q, r in result["questions"].items():
        if r.get("skipped"):
            continue
        why = "; ".join(f"{x['n_items']}: {x['reason']}" for x in r["exclusions"]) or "none"
        dist = ", ".join(f"{k}×{v}" for k, v in r["raters_per_item"].items())
        h.append(f"<tr><td>{_e(q)}</td><td class='num'>{r['n_raters']}</td>"
                 f"<td class='num'>{r['n_items_total']}</td><td class='num'>{r['n_items_subsampled']}</td>"
                 f"<td class='num'>{r['n_items_excluded']}</td><td>{_e(why)}</td>"
                 f"<td class='sub'>{_e(dist)} <span class='sub'>(raters×items)</span></td></tr>")
    h.append("</tbody></table>")
    return h


def _data_section(result) -> list[str]:
    d = result["data"]
    return [f"<h2>Data</h2><p class='sub'>{d['n_rows']} rows read; {d['n_rows_used']} used; "
            f"{d['n_rows_ignored_status']} ignored because their status was not “submitted”; "
            f"{d['n_rows_ignored_empty_value']} with an empty value; "
            f"{d['n_rows_ignored_duplicate']} duplicates (same annotator, item and question; the "
            f"latest was kept). Full numbers: <code>agreement.json</code>.</p>",
            "</main></body></html>"]


def _md(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _render_md(result) -> str:
    lines = ["# Annotation agreement report", ""]
    if result.get("source"):
        lines += [f"Source: `{result['source']}`", ""]
    g = result.get("gate")
    if g:
        lines += [f"**Gate {'PASSED' if g['passed'] else 'FAILED'}** (minimum Fleiss' κ "
                  f"{g['min_kappa']:g})"] + [f"- {f}" for f in g["failures"]] + [""]
    lines += ["| question | type | items | raters/item | Fleiss' κ | 95% CI | meaning | raw agreement "
              "| α ordinal | left out of κ |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for q, r in result["questions"].items():
        if r.get("skipped"):
            lines.append(f"| {_md(q)} | skipped: {r['skipped']} |||||||||")
            continue
        lines.append(f"| {_md(q)} | {r['type']} | {r['n_items']} | {r['n_raters']} | "
                     f"{_fmt(r['fleiss_kappa'])} | {_fmt_ci(r['ci'])} | {r['band']} | "
                     f"{_fmt(r.get('observed_agreement'))} | "
                     f"{_fmt(r.get('krippendorff_alpha_ordinal'))} | {r['n_items_excluded']} |")
    lines += ["", "κ: agreement beyond chance (1 perfect, 0 chance). Meaning: Landis & Koch (1977). "
              "Raw agreement: share of annotator pairs giving the same answer.", "",
              "## Unequal annotator counts", ""]
    for q, r in result["questions"].items():
        if not r.get("skipped"):
            lines.append(f"- **{_md(q)}**: {r['unequal_counts_policy']}")
    lines += ["", "## Annotators (agreement with the leave-one-out majority)", "",
              f"{result['annotator_flag_rule']}.", "",
              "| annotator | answers | items compared | matches majority | flagged |",
              "|---|---:|---:|---:|---|"]
    for a in result["annotators"]:
        lines.append(f"| {_md(a['annotator'])} | {a['n_ratings']} | {a['n_items_compared']} | "
                     f"{_fmt(a['loo_majority_agreement'])} | {'**yes**' if a['flagged'] else ''} |")
    lines += ["", "## Lowest-agreement items", "", "| item | question | agreement | answers |",
              "|---|---|---:|---|"]
    for it in result["lowest_items"]:
        vals = _md(", ".join(f"{a}: {v}" for a, v in it["values"].items()))
        lines.append(f"| {_md(it['item_id'])} | {_md(it['question'])} | {it['agreement']:.2f} | {vals} |")
    return "\n".join(lines) + "\n"


def write_report(result, out_dir) -> dict:
    """Write agreement.json, report.md and a self-contained report.html into ``out_dir``.
    Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result.setdefault("generated_at", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    clean = _json_clean(result)
    paths = {"json": out / "agreement.json", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["json"], json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(paths["md"], _render_md(clean))
    atomic_write_text(paths["html"], _render_html(clean, _plots(clean)))
    return paths


def summary_table(result) -> str:
    """The per-question summary as a plain-text table (what ``alignkit annotate agreement`` prints)."""
    rows = [("question", "type", "items", "m", "kappa", "95% CI", "meaning", "raw", "alpha_ord")]
    for q, r in result["questions"].items():
        if r.get("skipped"):
            rows.append((q, "skipped", "", "", "", "", "", "", ""))
            continue
        rows.append((q, r["type"], str(r["n_items"]), str(r["n_raters"]), _fmt(r["fleiss_kappa"]),
                     _fmt_ci(r["ci"]), r["band"], _fmt(r.get("observed_agreement")),
                     _fmt(r.get("krippendorff_alpha_ordinal"))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])
