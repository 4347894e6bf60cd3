"""Reward model evaluation on held-out preference pairs: ``eval.json`` + a self-contained ``report.html``.

Reads like the stage: load the reward model and the held-out pairs (by default the ones its
training run held out), score every chosen and rejected reply in batches, then compute

* pairwise accuracy (chosen scored above rejected; a tie counts half) with a 95% Wilson interval;
* accuracy and mean reward gap by margin bucket (Llama 2 reports accuracy separately for
  "significantly better" ... "negligibly better" pairs: a good model is most accurate where
  annotators were most certain);
* calibration of p = sigmoid(r_chosen - r_rejected) read as "probability that the model's
  preferred reply is the annotators' choice": expected calibration error over confidence bins
  and a reliability plot;
* correlation of reward with response length (Pearson, Spearman) and how often the model vs the
  annotators prefer the longer reply: a strong length preference is a reward-hacking warning sign;
* reward distributions of chosen and rejected replies;
* per-aspect accuracy when the model has aspect heads and the data carries aspect ratings.

Launch: ``alignkit reward eval --config configs/reward_eval.yaml [KEY=VALUE ...]``.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignkit.config import ConfigError, doc, to_dict
from alignkit.preferences import load_preferences
from alignkit.plots import figure_png
from alignkit.runstore import atomic_write_json, atomic_write_text, read_manifest, stage_run
from alignkit.stats import wilson_interval

log = logging.getLogger("alignkit.reward")

# |Spearman rho| between reward and reply length at or above which the report warns in plain words.
LENGTH_WARN = 0.5
LENGTH_NOTE = 0.3


@dataclass
class RewardEvalConfig:
    model: str = doc("a reward run dir (its model/ is used) or a reward model dir", "runs/quickstart/reward")
    data: str | None = doc("held-out pairs (any format `reward train` reads); default: <reward run>/heldout_pairs.jsonl", None)
    output_dir: str = doc("this evaluation's run directory (eval.json, report.html, manifest.json)", "runs/quickstart/reward_eval")
    max_pairs: int | None = doc("evaluate only the first N pairs (smoke runs)", None)
    batch_size: int = doc("sequences per forward pass", 16)
    max_length: int = doc("token limit; longer conversations are cut from the left (oldest prompt tokens first)", 1024)
    calibration_bins: int = doc("confidence bins for the expected calibration error", 10)
    margin_buckets: int = doc("margin buckets when margins take many values (quantiles); <= 6 distinct values get one bucket each", 4)
    n_examples: int = doc("most confidently wrong pairs shown in the report", 5)
    device: str | None = doc("cpu, cuda, ...; default: CUDA when available", None)

    def __post_init__(self):
        if self.calibration_bins < 1 or self.margin_buckets < 1:
            raise ConfigError("calibration_bins and margin_buckets must be at least 1")


# --------------------------------------------------------------------------------------------
# Metrics (pure numpy: each is checkable by hand)


def pair_correct(gap: np.ndarray) -> np.ndarray:
    """1 where chosen scored higher, 0.5 for a tie, 0 otherwise."""
    return np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0))


def accuracy_summary(gap: np.ndarray) -> dict:
    correct = pair_correct(gap)
    n = len(gap)
    return {"n": n, "accuracy": float(correct.mean()) if n else float("nan"),
            "ci95": wilson_interval(float(correct.sum()), n),  # [None, None] for no pairs
            "mean_reward_gap": float(gap.mean()) if n else float("nan")}


def by_constraint_type(pairs: list[dict], gap: np.ndarray) -> dict:
    """Accuracy per kind of checkable constraint the prompt states (the demo's oracle reads it
    from the prompt's words); pairs whose prompt states none are left out."""
    from alignkit.oracle import find_constraint

    kinds: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        c = pair.get("constraint") or find_constraint(pair["prompt"])
        if isinstance(c, dict) and c.get("type"):
            kinds.setdefault(c["type"], []).append(i)
    return {kind: accuracy_summary(gap[idx]) for kind, idx in sorted(kinds.items())}


def calibration(gap: np.ndarray, n_bins: int = 10) -> dict:
    """Top-label calibration: confidence = sigmoid(|gap|) in [0.5, 1] is the model's probability
    that its preferred reply is the annotators' choice; it is correct when gap > 0.
    ECE = sum over bins of (bin size / n) * |bin accuracy - bin mean confidence|."""
    conf = 1.0 / (1.0 + np.exp(-np.abs(gap)))
    correct = pair_correct(gap)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        if not sel.any():
            continue
        acc, mc = float(correct[sel].mean()), float(conf[sel].mean())
        ece += sel.sum() / len(gap) * abs(acc - mc)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                     "accuracy": acc, "mean_confidence": mc})
    return {"ece": float(ece) if len(gap) else float("nan"), "n_bins": n_bins, "bins": bins,
            "mean_confidence": float(conf.mean()) if len(gap) else float("nan")}


def margin_buckets(margins: np.ndarray, gap: np.ndarray, n_buckets: int = 4) -> list[dict]:
    """Accuracy and mean gap per margin level (each distinct value, or quantile buckets)."""
    values = np.unique(margins)
    if len(values) <= 6:
        groups = [(f"margin = {v:g}", margins == v, float(v), float(v)) for v in values]
    else:
        edges = np.unique(np.quantile(margins, np.linspace(0, 1, n_buckets + 1)))
        groups = []
        for i in range(len(edges) - 1):
            lo, hi = edges[i], edges[i + 1]
            sel = (margins >= lo) & ((margins <= hi) if i == len(edges) - 2 else (margins < hi))
            groups.append((f"{lo:.3g} <= margin {'<=' if i == len(edges) - 2 else '<'} {hi:.3g}", sel, float(lo), float(hi)))
    out = []
    for label, sel, lo, hi in groups:
        if sel.any():
            out.append({"bucket": label, "margin_lo": lo, "margin_hi": hi, **accuracy_summary(gap[sel])})
    return out


def length_analysis(r_chosen, r_rejected, len_chosen, len_rejected) -> dict:
    """Does the reward track reply length? Correlations over all replies, and who prefers the longer one."""
    from scipy import stats

    rewards = np.concatenate([r_chosen, r_rejected])
    lengths = np.concatenate([len_chosen, len_rejected]).astype(float)
    if len(rewards) > 2 and np.ptp(lengths) > 0 and np.ptp(rewards) > 0:
        pearson = float(stats.pearsonr(lengths, rewards)[0])
        spearman = float(stats.spearmanr(lengths, rewards)[0])
    else:
        pearson = spearman = float("nan")
    differ = len_chosen != len_rejected
    chosen_longer = len_chosen > len_rejected
    model_prefers_chosen = r_chosen > r_rejected
    model_longer = float(np.mean(model_prefers_chosen[differ] == chosen_longer[differ])) if differ.any() else float("nan")
    human_longer = float(np.mean(chosen_longer[differ])) if differ.any() else float("nan")
    strength = abs(spearman) if not math.isnan(spearman) else 0.0
    if strength >= LENGTH_WARN:
        level = "warning"
        message = (f"Warning: the reward follows reply length closely (Spearman {spearman:+.2f}). A policy optimised "
                   f"against this model can raise its reward by writing {'longer' if spearman > 0 else 'shorter'} "
                   "replies instead of better ones (reward hacking). Check the training pairs for a length bias, "
                   "or penalise length during PPO.")
    elif strength >= LENGTH_NOTE:
        level = "note"
        message = (f"Note: the reward is moderately correlated with reply length (Spearman {spearman:+.2f}). Watch "
                   "reply lengths during policy optimisation.")
    else:
        level = "ok"
        message = f"The reward is not strongly tied to reply length (Spearman {spearman:+.2f})."
    return {"unit": "characters", "pearson": pearson, "spearman": spearman,
            "pairs_with_different_lengths": int(differ.sum()),
            "model_prefers_longer": model_longer, "annotators_prefer_longer": human_longer,
            "level": level, "message": message}


def distribution(x: np.ndarray) -> dict:
    if not len(x):
        return {}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()),
            "p5": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p95": float(q[4])}


def aspect_accuracy(pred_c: np.ndarray, pred_r: np.ndarray, pairs: list[dict], aspects: list[str]) -> dict:
    """Per aspect: among pairs whose two replies got different ratings on it, how often the
    aspect head orders them the same way (a tie in the predictions counts half)."""
    out = {}
    for k, name in enumerate(aspects):
        diffs, preds = [], []
        for i, p in enumerate(pairs):
            a, b = (p.get("aspects_chosen") or {}).get(name), (p.get("aspects_rejected") or {}).get(name)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a != b:
                diffs.append(np.sign(a - b))
                preds.append(pred_c[i, k] - pred_r[i, k])
        if diffs:
            s = accuracy_summary(np.asarray(preds) * np.asarray(diffs))
            out[name] = {"n": s["n"], "accuracy": s["accuracy"], "ci95": s["ci95"]}
        else:
            out[name] = {"n": 0, "accuracy": None, "ci95": None}
    return out


# --------------------------------------------------------------------------------------------
# The stage


def _resolve(cfg: RewardEvalConfig) -> tuple[Path, Path, dict | None]:
    """(model dir, held-out data, the training run's manifest if there is one)."""
    root = Path(cfg.model)
    model_dir = root / "model" if (root / "model" / "config.json").exists() else root
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{cfg.model}: neither a reward run dir (with model/) nor a reward model dir")
    run_dir = root if model_dir != root else root.parent
    train_manifest = read_manifest(run_dir) if (run_dir / "manifest.json").exists() else None
    if cfg.data:
        data = Path(cfg.data) if Path(cfg.data).exists() else cfg.data
    elif (run_dir / "heldout_pairs.jsonl").exists() and (run_dir / "heldout_pairs.jsonl").stat().st_size > 0:
        data = run_dir / "heldout_pairs.jsonl"
    else:
        raise ConfigError(f"data: not given, and {run_dir / 'heldout_pairs.jsonl'} is missing or empty "
                          "(train with eval_fraction > 0, or name a held-out file)")
    return model_dir, data, train_manifest


def evaluate(cfg: RewardEvalConfig, force: bool = False) -> dict:
    model_dir, data_path, train_manifest = _resolve(cfg)
    prefs = load_preferences(data_path)  # bad input fails before anything is written
    pairs = prefs.pairs[: cfg.max_pairs] if cfg.max_pairs else prefs.pairs

    from alignkit.scoring import RewardScorer

    out = Path(cfg.output_dir)
    with stage_run("reward_eval", out, to_dict(cfg), {"model": model_dir, "data": data_path}, force) as run:
        if run.skipped:
            log.info("reward eval: already completed in %s (use --force to run again)", out)
            return run.previous
        run.clear_for_fresh_start("eval.json", "report.html")  # no stale report outlives a crash below
        scorer = RewardScorer(model_dir, device=cfg.device, batch_size=cfg.batch_size, max_length=cfg.max_length)
        prompts = [p["prompt"] for p in pairs]
        chosen = [p["chosen"][0]["content"] for p in pairs]
        rejected = [p["rejected"][0]["content"] for p in pairs]
        heads_c = np.asarray(scorer.score_all_heads(prompts + prompts, chosen + rejected))
        heads_c, heads_r = heads_c[: len(pairs)], heads_c[len(pairs):]
        r_c, r_r = heads_c[:, 0], heads_r[:, 0]
        gap = r_c - r_r

        result = {"model": str(model_dir), "data": str(data_path), "data_format": prefs.format,
                  "dropped_pairs": prefs.dropped, **accuracy_summary(gap), "ci_method": "wilson",
                  "ties": int((gap == 0).sum())}
        result["n_pairs"] = result.pop("n")
        result["accuracy_ci95"] = result.pop("ci95")
        margins = np.asarray([p.get("margin", math.nan) for p in pairs], dtype=float)
        has_margin = ~np.isnan(margins)
        result["by_margin"] = margin_buckets(margins[has_margin], gap[has_margin], cfg.margin_buckets) if has_margin.any() else []
        result["by_constraint_type"] = by_constraint_type(pairs, gap)
        result["calibration"] = calibration(gap, cfg.calibration_bins)
        len_c = np.asarray([len(c) for c in chosen])
        len_r = np.asarray([len(r) for r in rejected])
        result["length"] = length_analysis(r_c, r_r, len_c, len_r)
        result["rewards"] = {"chosen": distribution(r_c), "rejected": distribution(r_r),
                             "all": distribution(np.concatenate([r_c, r_r]))}
        if scorer.aspects and any("aspects_chosen" in p for p in pairs):
            result["aspects"] = aspect_accuracy(heads_c[:, 1:], heads_r[:, 1:], pairs, scorer.aspects)
        if train_manifest:
            result["training"] = {"manifest_status": train_manifest.get("status"),
                                  "overlength": train_manifest.get("notes", {}).get("overlength"),
                                  "margin": train_manifest.get("notes", {}).get("margin"),
                                  "leakage": train_manifest.get("notes", {}).get("leakage")}
        wrong = np.argsort(gap)[: cfg.n_examples]
        examples = [{"prompt": pairs[i]["prompt"][-1]["content"], "chosen": chosen[i], "rejected": rejected[i],
                     "r_chosen": float(r_c[i]), "r_rejected": float(r_r[i])} for i in wrong if gap[i] < 0]

        atomic_write_json(out / "eval.json", result)
        atomic_write_text(out / "report.html", render_report(result, r_c, r_r, len_c, len_r, examples))
        run.add_output("eval", out / "eval.json")
        run.add_output("report", out / "report.html")
        run.metrics.update({"accuracy": result["accuracy"], "accuracy_ci95": result["accuracy_ci95"],
                            "n_pairs": result["n_pairs"], "ece": result["calibration"]["ece"],
                            "length_spearman": result["length"]["spearman"]})
        ci = result["accuracy_ci95"]
        print(f"reward eval: accuracy {_f(result['accuracy'])} (95% CI {_f(ci[0])}-{_f(ci[1])}) on {len(pairs)} pairs; "
              f"ECE {_f(result['calibration']['ece'])}\n  {result['length']['message']}\n"
              f"  report:   {out / 'report.html'}\n  eval:     {out / 'eval.json'}")
    return run.manifest("completed")


# --------------------------------------------------------------------------------------------
# The report: one HTML file, inline CSS, plots as inline PNG


def _png(fig) -> str:
    return "data:image/png;base64," + figure_png(fig, dpi=110)

def _plots(result, r_c, r_r, len_c, len_r) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    bins = np.histogram_bin_edges(np.concatenate([r_c, r_r]), bins=30)
    ax.hist(r_c, bins=bins, alpha=0.6, label="chosen", color="#2563eb")
    ax.hist(r_r, bins=bins, alpha=0.6, label="rejected", color="#dc2626")
    ax.set_xlabel("reward"), ax.set_ylabel("replies"), ax.legend(), ax.set_title("Reward distributions")
    plots["distributions"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    cal = result["calibration"]["bins"]
    ax.plot([0.5, 1], [0.5, 1], "--", color="#94a3b8", label="perfect calibration")
    if cal:
        ax.plot([b["mean_confidence"] for b in cal], [b["accuracy"] for b in cal], "o-", color="#2563eb", label="model")
        for b in cal:
            ax.annotate(str(b["n"]), (b["mean_confidence"], b["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlim(0.48, 1.02), ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("confidence sigmoid(|r_c - r_r|)"), ax.set_ylabel("accuracy"), ax.legend(loc="lower right")
    ax.set_title("Reliability (points labelled with pair counts)")
    plots["reliability"] = _png(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.scatter(len_c, r_c, s=8, alpha=0.6, label="chosen", color="#2563eb")
    ax.scatter(len_r, r_r, s=8, alpha=0.6, label="rejected", color="#dc2626")
    ax.set_xlabel("reply length (characters)"), ax.set_ylabel("reward"), ax.legend()
    ax.set_title(f"Reward vs length (Spearman {result['length']['spearman']:+.2f})")
    plots["length"] = _png(fig)

    if result["by_margin"]:
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        labels = [b["bucket"] for b in result["by_margin"]]
        accs = [b["accuracy"] for b in result["by_margin"]]
        errs = np.array([[b["accuracy"] - b["ci95"][0], b["ci95"][1] - b["accuracy"]] for b in result["by_margin"]]).T
        # At accuracy 0 or 1 the interval's end can miss it by a rounding error (1 - 1e-16), and
        # matplotlib refuses a negative error bar.
        errs = np.clip(errs, 0.0, None)
        ax.bar(range(len(labels)), accs, yerr=errs, color="#2563eb", capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.axhline(0.5, ls="--", color="#94a3b8"), ax.set_ylim(0, 1.05), ax.set_ylabel("accuracy (95% CI)")
        ax.set_title("Accuracy by annotator margin")
        plots["margin"] = _png(fig)
    return plots


CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f8fafc;color:#0f172a;line-height:1.45}
main{max-width:1000px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.5rem;margin:0 0 4px}h2{font-size:1.15rem;margin:30px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.sub{color:#475569;font-size:.9rem}
.explain{color:#334155;font-size:.9rem;background:#fff;border-left:4px solid #93c5fd;padding:8px 12px;margin:8px 0 14px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}.card{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px;min-width:130px}
.card b{display:block;font-size:1.35rem}.card span{color:#475569;font-size:.8rem}
table{border-collapse:collapse;background:#fff;font-size:.88rem;margin:6px 0}td,th{border:1px solid #e2e8f0;padding:4px 10px;text-align:left}
th{background:#f1f5f9}.num{text-align:right;font-variant-numeric:tabular-nums}
.warning{background:#fef2f2;border:1px solid #fecaca;color:#991b1b;padding:10px 14px;border-radius:6px;font-weight:600}
.note{background:#fffbeb;border:1px solid #fde68a;color:#92400e;padding:10px 14px;border-radius:6px}
.ok{background:#f0fdf4;border:1px solid #bbf7d0;color:#166534;padding:10px 14px;border-radius:6px}
img{max-width:100%;background:#fff;border:1px solid #e2e8f0;border-radius:4px;margin:4px 8px 4px 0}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.82rem;max-height:9em;overflow:auto}
"""


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_report(result: dict, r_c, r_r, len_c, len_r, examples: list[dict]) -> str:
    e = html.escape
    plots = _plots(result, r_c, r_r, len_c, len_r)
    ci = result["accuracy_ci95"]
    cal, length = result["calibration"], result["length"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Reward model evaluation</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>Reward model evaluation</h1>",
        f"<div class='sub'>model <code>{e(result['model'])}</code> &middot; data <code>{e(result['data'])}</code> "
        f"({e(result['data_format'])}, {result['n_pairs']} pairs)</div>",
        "<div class='cards' id='summary'>",
        f"<div class='card'><b>{_f(result['accuracy'])}</b><span>pairwise accuracy</span></div>",
        f"<div class='card'><b>{_f(ci[0])}&ndash;{_f(ci[1])}</b><span>95% CI (Wilson)</span></div>",
        f"<div class='card'><b>{_f(cal['ece'])}</b><span>expected calibration error</span></div>",
        f"<div class='card'><b>{_f(length['spearman'], 2)}</b><span>reward&ndash;length Spearman</span></div>",
        "</div>",
        "<h2>Accuracy</h2>",
        "<div class='explain'>The share of held-out pairs where the reward model scores the annotators' chosen reply "
        "above the rejected one (a tie counts half). 0.5 is chance. The 95% interval is the Wilson score interval: "
        "with few pairs it is wide, and two models whose intervals overlap a lot may not really differ. "
        "Published reward models reach roughly 0.65&ndash;0.75 on human preference data.</div>",
        f"<p>{result['n_pairs']} pairs, {result['ties']} ties; mean reward gap (chosen &minus; rejected) "
        f"{_f(result['mean_reward_gap'])}.</p>",
    ]
    parts += ["<h2>Accuracy by margin</h2>",
              "<div class='explain'>Pairs grouped by how strongly annotators preferred the chosen reply (the data's "
              "<code>margin</code>). Like Llama&nbsp;2's &ldquo;significantly better&rdquo; vs &ldquo;negligibly "
              "better&rdquo; split: accuracy should be highest where annotators were most certain, and near chance "
              "where they barely preferred one reply. The reward gap should grow with the margin.</div>"]
    if result["by_margin"]:
        parts.append("<table><tr><th>bucket</th><th>pairs</th><th>accuracy</th><th>95% CI</th><th>mean reward gap</th></tr>")
        for b in result["by_margin"]:
            parts.append(f"<tr><td>{e(b['bucket'])}</td><td class='num'>{b['n']}</td><td class='num'>{_f(b['accuracy'])}</td>"
                         f"<td class='num'>{_f(b['ci95'][0])}&ndash;{_f(b['ci95'][1])}</td><td class='num'>{_f(b['mean_reward_gap'])}</td></tr>")
        parts.append(f"</table><img alt='accuracy by margin' src='{plots['margin']}'>")
    else:
        parts.append("<p>The data carries no margins, so there are no buckets.</p>")
    if result.get("by_constraint_type"):
        parts += ["<h2>Accuracy by constraint kind</h2>",
                  "<div class='explain'>Pairs grouped by the checkable constraint their prompt states (word limit, "
                  "lowercase, bullets, opening or closing phrase, keyword). A kind near 0.5 is one the reward "
                  "model has not learnt to see: a policy trained against it gets no signal there.</div>",
                  "<table><tr><th>constraint</th><th>pairs</th><th>accuracy</th><th>95% CI</th><th>mean reward gap</th></tr>"]
        for kind, b in result["by_constraint_type"].items():
            parts.append(f"<tr><td>{e(kind)}</td><td class='num'>{b['n']}</td><td class='num'>{_f(b['accuracy'])}</td>"
                         f"<td class='num'>{_f(b['ci95'][0])}&ndash;{_f(b['ci95'][1])}</td>"
                         f"<td class='num'>{_f(b['mean_reward_gap'])}</td></tr>")
        parts.append("</table>")
    parts += ["<h2>Calibration</h2>",
              "<div class='explain'>sigmoid(r<sub>chosen</sub> &minus; r<sub>rejected</sub>) is the model's probability "
              "that the chosen reply is better (the Bradley&ndash;Terry reading of the rewards). Its confidence in its "
              "own pick, sigmoid(|gap|), should match how often that pick is right: points on the diagonal are "
              "calibrated, points below it are over-confident. The expected calibration error (ECE) is the "
              "pair-weighted average distance from the diagonal; 0 is perfect. A model trained with margins is "
              "pushed to wider gaps than the pure Bradley&ndash;Terry reading, so expect some over-confidence.</div>",
              f"<p>ECE {_f(cal['ece'])} over {cal['n_bins']} bins; mean confidence {_f(cal['mean_confidence'])} vs "
              f"accuracy {_f(result['accuracy'])}.</p>",
              f"<img alt='reliability diagram' src='{plots['reliability']}'>",
              "<h2>Reward and length</h2>",
              "<div class='explain'>If longer replies get higher rewards regardless of content, a policy trained "
              "against this model will learn to ramble (a classic form of reward hacking). Compare how often the model "
              "prefers the longer reply with how often the annotators did.</div>",
              f"<div id='length-verdict' class='{e(length['level'])}'>{e(length['message'])}</div>",
              f"<p>Pearson {_f(length['pearson'], 2)}, Spearman {_f(length['spearman'], 2)} over all replies. Of "
              f"{length['pairs_with_different_lengths']} pairs whose replies differ in length, the model prefers the "
              f"longer one in {_f(length['model_prefers_longer'])} of them, the annotators in "
              f"{_f(length['annotators_prefer_longer'])}.</p>",
              f"<img alt='reward against length' src='{plots['length']}'>",
              "<h2>Reward distributions</h2>",
              "<div class='explain'>Rewards have no absolute scale: only differences matter. The two histograms "
              "should be shifted apart; a huge spread or a far-off mean can destabilise PPO (whiten or centre the "
              "rewards there).</div>",
              "<table><tr><th></th><th>mean</th><th>std</th><th>p5</th><th>median</th><th>p95</th></tr>"]
    for name in ("chosen", "rejected", "all"):
        d = result["rewards"][name]
        parts.append(f"<tr><td>{name}</td>" + "".join(f"<td class='num'>{_f(d.get(k))}</td>" for k in
                                                       ("mean", "std", "p5", "median", "p95")) + "</tr>")
    parts.append(f"</table><img alt='reward histograms' src='{plots['distributions']}'>")
    if result.get("aspects"):
        parts += ["<h2>Aspects</h2>",
                  "<div class='explain'>For each rated aspect, among pairs whose two replies got different ratings, "
                  "how often the aspect head orders them the same way as the annotators.</div>",
                  "<table><tr><th>aspect</th><th>pairs</th><th>accuracy</th><th>95% CI</th></tr>"]
        for name, a in result["aspects"].items():
            ci_a = a["ci95"] or [None, None]
            parts.append(f"<tr><td>{e(name)}</td><td class='num'>{a['n']}</td><td class='num'>{_f(a['accuracy'])}</td>"
                         f"<td class='num'>{_f(ci_a[0])}&ndash;{_f(ci_a[1])}</td></tr>")
        parts.append("</table>")
    parts += ["<h2>Most confidently wrong pairs</h2>",
              "<div class='explain'>Held-out pairs where the model most strongly prefers the rejected reply: read a "
              "few to tell model errors from label noise.</div>"]
    if examples:
        parts.append("<table id='wrong'><tr><th>prompt (last turn)</th><th>chosen</th><th>rejected</th><th>r chosen</th><th>r rejected</th></tr>")
        for x in examples:
            parts.append(f"<tr><td><pre>{e(x['prompt'][:600])}</pre></td><td><pre>{e(x['chosen'][:600])}</pre></td>"
                         f"<td><pre>{e(x['rejected'][:600])}</pre></td><td class='num'>{_f(x['r_chosen'])}</td>"
                         f"<td class='num'>{_f(x['r_rejected'])}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>None: every pair is ordered correctly.</p>")
    training = result.get("training")
    if training:
        parts += ["<h2>Training run</h2>",
                  f"<pre>{e(json.dumps(training, indent=1, default=str)[:3000])}</pre>"]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
