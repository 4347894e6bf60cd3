"""The sweep's self-contained HTML report: validation and training curves of every point
overlaid, a table of final and best values per point and per setting, and the winner."""

from __future__ import annotations

import html
from pathlib import Path

from alignkit.plots import figure_png
from alignkit.runstore import atomic_write_text

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}th,td{border:1px solid #ccc;padding:4px 8px}
td.num{text-align:right;font-variant-numeric:tabular-nums}.meta{color:#555}.win{background:#e8f5e9}
img{max-width:100%;border:1px solid #eee}"""


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else html.escape(str(x))


def _curves_png(result: dict, key: str, ylabel: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(p["point"], p[key]) for p in result["points"] if p[key]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, points in series:
        steps, values = zip(*points)
        winner = result["winner"] and name == result["winner"]["point"]
        ax.plot(steps, values, marker="o" if key == "curve" else None, markersize=3,
                linewidth=2.5 if winner else 1.2, label=name + (" (winner)" if winner else ""))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_png(fig, dpi=110)


def render(result: dict) -> str:
    metric, goal, winner = result["metric"], result["goal"], result["winner"]
    rows = []
    for p in result["points"]:
        cls = " class=win" if winner and p["point"] == winner["point"] else ""
        rows.append(f"<tr{cls}><th>{html.escape(p['point'])}</th><td>{_fmt(p['status'])}</td>"
                    f"<td class=num>{_fmt(p['final'])}</td><td class=num>{_fmt(p['final_step'])}</td>"
                    f"<td class=num>{_fmt(p['best'])}</td><td class=num>{_fmt(p['best_step'])}</td></tr>")
    settings = "".join(
        f"<tr><th>{html.escape(', '.join(f'{k}={v}' for k, v in s['values'].items()))}</th><td class=num>{s['n']}</td>"
        f"<td class=num>{_fmt(s['mean'])}</td><td class=num>{_fmt(s['sd'])}</td></tr>" for s in result["settings"])
    plots = [(f"validation {metric}", _curves_png(result, "curve", metric)),
             ("training loss", _curves_png(result, "train_loss", "training loss"))]
    verdict = (f"<p><b>Winner: {html.escape(winner['point'])}</b> (lowest" if goal == "min" else
               f"<p><b>Winner: {html.escape(winner['point'])}</b> (highest") if winner else "<p>No point finished.</p>"
    if winner:
        verdict += (f" final validation {html.escape(metric)}, mean {_fmt(winner['mean'])}): "
                    f"{html.escape(result['certainty'])}. Its whole config is in winner.yaml.</p>")
    return "\n".join([
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>alignkit sweep</title>",
        f"<style>{CSS}</style></head><body><h1>alignkit sweep: {html.escape(result['stage'])}</h1>",
        f"<p class=meta>{len(result['points'])} runs over "
        f"{html.escape(', '.join(f'{k} in {v}' for k, v in result['grid'].items()))}"
        f"{'; seeds ' + html.escape(str(result['seeds'])) if result['seeds'] else ''}; chosen by the final "
        f"validation {html.escape(metric)} ({goal}).</p>",
        verdict,
        "<h2>Curves</h2>",
        *[f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{png}'><figcaption class=meta>"
          f"{html.escape(alt)} of every run (the winner drawn thicker).</figcaption></figure>" for alt, png in plots if png],
        "<p class=meta>Training loss still falling while the validation curve rises: over-fitting. Both still falling "
        "at the end: under-trained, more steps would help.</p>",
        "<h2>Runs</h2><table id=points><thead><tr><th>point</th><th>status</th>"
        f"<th>final {html.escape(metric)}</th><th>at step</th><th>best</th><th>at step</th></tr></thead><tbody>",
        *rows, "</tbody></table>",
        "<h2>Settings (over seeds)</h2><table id=settings><thead><tr><th>setting</th><th>finished runs</th>"
        f"<th>mean final {html.escape(metric)}</th><th>sd</th></tr></thead><tbody>{settings}</tbody></table>",
        "</body></html>",
    ])


def write_report(result: dict, path: Path) -> Path:
    atomic_write_text(path, render(result))
    return path
