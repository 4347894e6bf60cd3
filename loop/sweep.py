"""``alignkit sweep FILE``: A/B tests of settings, chosen on validation data.

A sweep takes one training stage (SFT, reward or DPO), its base config, and a grid of values for
one or more keys (``learning_rate: [5.0e-5, 1.0e-4]``); every combination, with each seed asked
for, is an ordinary stage run in ``<output_dir>/points/<point>/`` (so it is skipped when done and
resumed from its last checkpoint when interrupted). The sweep then reads each point's validation
curve (``log_history.jsonl``), names the winner by the validation metric (the final evaluation,
lower eval loss or higher reward accuracy) and how sure that is, and writes ``sweep.json``,
``report.html`` (the curves overlaid, a table of final and best values) and ``winner.yaml``, the
winner's whole config, which reproduces its run.

Points run one after another, or ``parallel`` side by side (on several GPUs, one each).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignkit.config import ConfigError, doc, load_config, merge, read_yaml
from alignkit.runstore import atomic_write_json, atomic_write_text, read_manifest

log = logging.getLogger("alignkit.sweep")

# stage -> (command, default validation metric, "min" or "max")
STAGES = {"sft": (["sft"], "eval_loss", "min"), "reward": (["reward", "train"], "eval_accuracy", "max"),
          "dpo": (["align", "dpo"], "eval_loss", "min")}


@dataclass
class SweepConfig:
    stage: str = doc(f"the stage to sweep: {', '.join(STAGES)}", "sft")
    config: str | None = doc("the stage's base YAML config (e.g. configs/sft.yaml); null: the stage's defaults", None)
    base: dict = doc("keys set for every point on top of config, as in the stage's YAML (e.g. {max_steps: 30})",
                     default_factory=dict)
    grid: dict = doc("key -> list of values; every combination is one point (nested keys with dots: lora.r)",
                     default_factory=dict)
    seeds: list | None = doc("run every point once per seed (the stage's seed key); the winner is the best mean, and "
                             "the report says whether the difference stands out from the seeds' spread", None)
    metric: str | None = doc("the validation metric deciding the winner, as the trainer logs it (eval_loss, "
                             "eval_accuracy, ...); default: eval_loss for sft and dpo, eval_accuracy for reward", None)
    goal: str | None = doc("min or max of metric; default: max for accuracies, min otherwise", None)
    parallel: int = doc("points run side by side (one GPU each when there are GPUs); 1: one after another", 1)
    output_dir: str = doc("the sweep's directory: points/, sweep.json, report.html, winner.yaml", "runs/sweep")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"sweep: stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        if not self.grid or not all(isinstance(v, list) and v for v in self.grid.values()):
            raise ConfigError("sweep: grid must map each key to a non-empty list of values, "
                              "e.g. grid: {learning_rate: [5.0e-5, 1.0e-4]}")
        if "output_dir" in self.grid or "output_dir" in self.base:
            raise ConfigError("sweep: output_dir is the sweep's own; every point gets points/<point>/")
        self.metric = self.metric or STAGES[self.stage][1]
        self.goal = self.goal or ("max" if "accura" in self.metric else "min")
        if self.goal not in ("min", "max"):
            raise ConfigError(f"sweep: goal {self.goal!r}: expected min or max")
        if self.parallel < 1:
            raise ConfigError("sweep: parallel must be >= 1")


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def points(cfg: SweepConfig) -> list[dict]:
    """Every point: ``{"name", "values" (dotted key -> value), "seed"}``, in grid order."""
    keys = list(cfg.grid)
    out = []
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        label = ",".join(f"{k}={v}" for k, v in values.items()).replace("/", "_").replace(" ", "")
        for seed in cfg.seeds or [None]:
            out.append({"name": label + (f",seed={seed}" if seed is not None else ""), "values": values, "seed": seed})
    return out


def point_config(cfg: SweepConfig, point: dict, output_dir: str) -> dict:
    """The whole stage config of a point: the base file, ``base``, the point's values and seed."""
    data = read_yaml(cfg.config) if cfg.config else {}
    extra = dict(point["values"], **({"seed": point["seed"]} if point["seed"] is not None else {}))
    return merge(merge(data, cfg.base), _nested({**extra, "output_dir": output_dir}))


def _check_points(cfg: SweepConfig, configs: dict[str, dict]) -> None:
    """Every point's config is valid for the stage before anything runs (a typo fails in seconds)."""
    import importlib

    module, cls = {"sft": ("alignkit.sft.train", "SFTStageConfig"), "reward": ("alignkit.reward.train", "RewardTrainConfig"),
                   "dpo": ("alignkit.rlhf.dpo", "DPOStageConfig")}[cfg.stage]
    config_cls = getattr(importlib.import_module(module), cls)
    from alignkit.config import from_dict

    for name, data in configs.items():
        from_dict(config_cls, data, f"sweep point {name}")


def run(cfg: SweepConfig) -> dict:
    out = Path(cfg.output_dir)
    todo = points(cfg)
    configs = {p["name"]: point_config(cfg, p, str(out / "points" / p["name"])) for p in todo}
    _check_points(cfg, configs)
    (out / "points").mkdir(parents=True, exist_ok=True)
    for p in todo:
        point_dir = out / "points" / p["name"]
        point_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(point_dir / "point.yaml", yaml.safe_dump(configs[p["name"]], sort_keys=False))
    failed = _run_points(cfg, todo, out)
    result = summarise(cfg, todo, configs, out)
    atomic_write_json(out / "sweep.json", result)
    if result["winner"]:
        winner = dict(configs[result["winner"]["point"]], output_dir=str(out / "winner"))
        atomic_write_text(out / "winner.yaml", f"# the sweep's winner ({result['winner']['point']}), chosen by "
                          f"{cfg.metric} ({cfg.goal}); rerun: alignkit {' '.join(STAGES[cfg.stage][0])} "
                          f"--config {out / 'winner.yaml'}\n" + yaml.safe_dump(winner, sort_keys=False))
    from alignkit.loop.sweep_report import write_report

    write_report(result, out / "report.html")
    if failed:
        raise ConfigError(f"sweep: {len(failed)} point(s) failed: {', '.join(failed)}; see points/<point>/run.log. "
                          "Run the sweep again to retry them (completed points are skipped)")
    return result


def _run_points(cfg: SweepConfig, todo: list[dict], out: Path) -> list[str]:
    """Each point as its own process (``alignkit <stage> --config point.yaml``): a crash or an
    out-of-memory in one point leaves the others and the sweep standing."""
    command = STAGES[cfg.stage][0]
    gpus = _gpu_count()
    queue, running, failed = list(todo), {}, []
    try:
        while queue or running:
            while queue and len(running) < cfg.parallel:
                p = queue.pop(0)
                point_dir = out / "points" / p["name"]
                env = dict(os.environ)
                if gpus and cfg.parallel > 1:
                    env["CUDA_VISIBLE_DEVICES"] = str(len(running) % gpus)
                log.info("sweep: %s", p["name"])
                logf = open(point_dir / "run.log", "a", encoding="utf-8")
                proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *command, "--config",
                                         str(point_dir / "point.yaml")], stdout=logf, stderr=subprocess.STDOUT, env=env)
                running[proc] = (p, logf)
            for proc in [r for r in running if r.poll() is not None]:
                p, logf = running.pop(proc)
                logf.close()
                if proc.returncode != 0:
                    failed.append(p["name"])
                    log.error("sweep: %s failed (exit %d); log: %s", p["name"], proc.returncode,
                              out / "points" / p["name"] / "run.log")
            time.sleep(0.2)
    finally:
        for proc, (_, logf) in running.items():  # interrupted: stop the points; they resume next time
            proc.terminate()
            proc.wait()
            logf.close()
    return failed


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch build with CUDA: CPU
        return 0


def curve(point_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key``: the evaluation before training (``initial_eval.json``, step 0),
    then the log history; one value per step (the stage's closing evaluation repeats the last)."""
    rows = []
    if (point_dir / "initial_eval.json").exists():
        rows.append({"step": 0, **json.loads((point_dir / "initial_eval.json").read_text())})
    path = point_dir / "log_history.jsonl"
    if path.exists():
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {int(r.get("step", 0)): float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}
    return sorted(by_step.items())


def summarise(cfg: SweepConfig, todo: list[dict], configs: dict[str, dict], out: Path) -> dict:
    better = min if cfg.goal == "min" else max
    rows = []
    for p in todo:
        point_dir = out / "points" / p["name"]
        manifest = read_manifest(point_dir) or {}
        metric = curve(point_dir, cfg.metric)
        rows.append({"point": p["name"], "values": p["values"], "seed": p["seed"], "status": manifest.get("status"),
                     "final": metric[-1][1] if metric else None, "final_step": metric[-1][0] if metric else None,
                     "best": better(v for _, v in metric) if metric else None,
                     "best_step": better(metric, key=lambda sv: sv[1])[0] if metric else None,
                     "curve": metric, "train_loss": curve(point_dir, "loss")})
    settings = compare_settings(rows, cfg.goal)
    finished = [r for r in rows if r["status"] == "completed" and r["final"] is not None]
    winner = None
    if settings["winner"] is not None:
        best_seed = better((r for r in finished if r["values"] == settings["winner"]["values"]),
                           key=lambda r: r["final"])
        winner = {**settings["winner"], "point": best_seed["point"]}
    return {"stage": cfg.stage, "metric": cfg.metric, "goal": cfg.goal, "grid": cfg.grid, "seeds": cfg.seeds,
            "points": rows, "settings": settings["settings"], "winner": winner, "certainty": settings["certainty"]}


def compare_settings(rows: list[dict], goal: str) -> dict:
    """Per setting (grid values, over its seeds): the final metric's mean and spread; the winner
    (best mean) and a sentence on how sure that is (Welch's t-test against the runner-up when
    both have two seeds or more)."""
    from scipy import stats

    settings: dict[str, dict] = {}
    for r in rows:
        key = json.dumps(r["values"], sort_keys=True)
        s = settings.setdefault(key, {"values": r["values"], "finals": []})
        if r["status"] == "completed" and r["final"] is not None:
            s["finals"].append(r["final"])
    ranked = []
    for s in settings.values():
        f = s["finals"]
        s["n"] = len(f)
        s["mean"] = sum(f) / len(f) if f else None
        s["sd"] = (sum((x - s["mean"]) ** 2 for x in f) / (len(f) - 1)) ** 0.5 if len(f) > 1 else None
        if f:
            ranked.append(s)
    ranked.sort(key=lambda s: s["mean"], reverse=goal == "max")
    if not ranked:
        return {"settings": list(settings.values()), "winner": None, "certainty": "no point finished"}
    winner = {"values": ranked[0]["values"], "mean": ranked[0]["mean"]}
    if len(ranked) == 1:
        certainty = "only one setting finished"
    else:
        first, second = ranked[0], ranked[1]
        gap = abs(first["mean"] - second["mean"])
        if first["n"] > 1 and second["n"] > 1:
            p = stats.ttest_ind(first["finals"], second["finals"], equal_var=False).pvalue
            verdict = "clear" if p < 0.05 else "not clear of the seed-to-seed spread"
            certainty = (f"{gap:.4g} better than the runner-up on the mean of {first['n']} vs {second['n']} seeds "
                         f"(Welch's t-test p = {p:.3g}: {verdict})")
        else:
            certainty = (f"{gap:.4g} better than the runner-up, one seed per setting: not tested against "
                         "seed-to-seed spread (ask for seeds: [0, 1, 2] to know)")
    return {"settings": list(settings.values()), "winner": winner, "certainty": certainty}


def configure_cli(p) -> None:
    from alignkit.config import add_config_args

    p.description = __doc__.split("\n\n")[1].replace("``", "")
    add_config_args(p, SweepConfig, "configs/sweep_sft_lr.yaml", force_help=None, positional=True)
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    cfg = load_config(SweepConfig, args.config, args.overrides)
    result = run(cfg)
    w = result["winner"]
    print(f"sweep: {len(result['points'])} runs; winner {w['point'] if w else '-'} by final {cfg.metric} ({cfg.goal})"
          f"{': ' + result['certainty'] if w else ''}\n  report: {Path(cfg.output_dir) / 'report.html'}\n"
          f"  winner config: {Path(cfg.output_dir) / 'winner.yaml'}")
    return 0
