"""``alignkit run FILE``: the whole loop from one config, resumable.

SFT -> candidates -> Argilla (push) -> annotators (simulated or human) -> pull -> agreement gate
-> export -> reward model (+ its evaluation) -> DPO and PPO -> held-out evaluation -> index page.

Every stage lives in ``<run_dir>/<stage>/`` and is skipped when its manifest says completed with
the same config and inputs, so running the same command again finishes in seconds, and a run
killed in the middle resumes where it stopped (training stages from their last checkpoint).
With human annotators the loop stops after pushing, says how far annotation is, and goes on from
there when run again.

The config has one section per stage; each holds that stage's own keys (see ``alignkit sft
--help``, ``alignkit reward train --help``, ...). The loop fills in the paths that connect the
stages; a key given in a section wins.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ConfigError, _merge, doc, from_dict, load_config
from alignkit.models import DEFAULT_MODEL
from alignkit.runstore import atomic_write_text, read_manifest

log = logging.getLogger("alignkit.run")

STAGES = ("sft", "annotate", "reward", "dpo", "ppo", "eval")
WAITING_FOR_ANNOTATORS = 10  # exit code: nothing failed, the humans are not done yet


@dataclass
class LoopConfig:
    run_dir: str = doc("every stage writes <run_dir>/<stage>/", "runs/quickstart")
    model: str = doc("the base model: a local dir, a Hub id, or offline:smollm2-135m-instruct", DEFAULT_MODEL)
    data: str = doc("instruction data for SFT ('demo': the shipped set with checkable constraints)", "demo")
    annotators: str = doc("'simulated' (an oracle-driven pool answers in Argilla) or 'human' (stop and wait)", "simulated")
    stages: list[str] = doc("stages to run, in loop order", default_factory=lambda: list(STAGES))
    sft: dict = doc("SFT keys (alignkit sft --help)", default_factory=dict)
    annotate: dict = doc("annotation sections common/generate/push/simulate/pull/export (configs/annotate.yaml)", default_factory=dict)
    reward: dict = doc("reward model keys (alignkit reward train --help)", default_factory=dict)
    reward_eval: dict = doc("reward evaluation keys (alignkit reward eval --help)", default_factory=dict)
    dpo: dict = doc("DPO keys (alignkit align dpo --help)", default_factory=dict)
    ppo: dict = doc("PPO keys (alignkit align ppo --help)", default_factory=dict)
    eval: dict = doc("evaluation keys (alignkit eval --help)", default_factory=dict)
    eval_base_model: bool = doc("evaluate the base model too, next to SFT, DPO and PPO (one more model to "
                                "sample from, score and compare)", True)


def _stage_config(cls, wired: dict, given: dict, where: str):
    return from_dict(cls, _merge(wired, given or {}), where)


def _local_server(server_home: str | None):
    """The local Argilla's config, or None when ARGILLA_API_URL/KEY name another server."""
    from alignkit.annotation.server import ServerConfig, named_server

    if named_server():
        return None
    return ServerConfig(home=server_home) if server_home else ServerConfig()


def _completed(stage_dir: Path) -> bool:
    m = read_manifest(stage_dir)
    return bool(m) and m.get("status") == "completed"


class Loop:
    def __init__(self, cfg: LoopConfig, force: bool = False):
        unknown = sorted(set(cfg.stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"stages: unknown {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
        if cfg.annotators not in ("simulated", "human"):
            raise ConfigError(f"annotators: expected simulated or human, got {cfg.annotators!r}")
        self.cfg, self.force = cfg, force
        self.run = Path(cfg.run_dir)
        self.timings: dict[str, float] = {}

    def path(self, *parts: str) -> str:
        return str(self.run.joinpath(*parts))

    # -- stages ------------------------------------------------------------------------------

    def sft(self) -> None:
        from alignkit.sft.train import SFTStageConfig, train

        wired = {"model": self.cfg.model, "data": self.cfg.data, "output_dir": self.path("sft")}
        train(_stage_config(SFTStageConfig, wired, self.cfg.sft, "sft"), force=self.force)

    def annotate(self) -> int:
        from alignkit.annotation.cli import VERBS, _config_class

        sections = dict(self.cfg.annotate)
        unknown = sorted(set(sections) - {"common", *VERBS})
        if unknown:
            raise ConfigError(f"annotate: unknown section(s) {', '.join(unknown)}; expected common, {', '.join(VERBS)}")
        export_dir = self.run / "annotate" / "export"
        if _completed(export_dir) and not self.force:
            log.info("annotate: export already completed in %s", export_dir)
            return 0
        common = _merge({"run_dir": self.path("annotate"), "dataset": f"{self.run.name}-"
                         f"{(sections.get('common') or {}).get('mode', 'binary')}"}, sections.get("common") or {})

        def verb_config(verb: str, wired: dict | None = None):
            cls = _config_class(verb)
            known = {f for f in cls.__dataclass_fields__}
            base = {k: v for k, v in common.items() if k in known}
            return _stage_config(cls, _merge(base, wired or {}), sections.get(verb) or {}, f"annotate.{verb}")

        from alignkit.annotation.candidates import generate
        from alignkit.annotation.datasets import connect
        from alignkit.annotation.server import down as stop_server
        from alignkit.annotation.server import status as local_status

        generate(verb_config("generate", {"model": self.path("sft", "model"), "prompts": self.path("sft"),
                                          "prompts_split": "train"}), force=self.force)
        push_cfg = verb_config("push")
        local = _local_server(push_cfg.server_home)
        started_here = local is not None and not local_status(local)["ready"]
        connect(push_cfg.server_home, start=True)  # the local server, unless ARGILLA_API_URL/KEY name another
        if self.cfg.annotators == "simulated" and started_here:
            try:
                return self._annotate_on(push_cfg, verb_config)
            finally:
                # An idle Argilla (server, search engine, workers) holds about 2 GB and competes for
                # the CPU: with two left running, a 59 s generation took 65-77 s on 2 cores. Stop
                # the one this run started before training.
                stop_server(local)
                print(f"run: stopped the local Argilla server this run started; the annotations stay in "
                      f"{local.home} (`alignkit annotate server up` to browse them)")
        return self._annotate_on(push_cfg, verb_config)

    def _annotate_on(self, push_cfg, verb_config) -> int:
        """Push, (simulate,) pull and export once the Argilla server answers."""
        from alignkit.annotation.datasets import push
        from alignkit.annotation.export import export
        from alignkit.annotation.pull import pull

        push(push_cfg)
        if self.cfg.annotators == "simulated":
            from alignkit.annotation.simulate import simulate

            simulate(verb_config("simulate"))
        pulled = pull(verb_config("pull"))
        done, total = pulled["metrics"]["n_records_completed"], pulled["metrics"]["n_records"]
        if done < total:
            if self.cfg.annotators == "human":
                from alignkit.annotation.server import status

                st = status()
                print(f"run: waiting for annotators: {done} of {total} records completed "
                      f"({pulled['metrics']['n_rows_total_latest']} answers so far).\n"
                      f"  Annotators log in at {st.get('url') or 'your Argilla server'}; "
                      f"run the same command again to continue from here.")
                return WAITING_FOR_ANNOTATORS
            log.warning("annotate: %d of %d records completed by the simulated annotators", done, total)
        from alignkit.annotation.export import GateError

        try:
            export(verb_config("export"), force=self.force)
        except GateError as e:
            print(f"run: the agreement gate stopped the export: {e}\n  See {self.path('annotate', 'export')}; "
                  f"lower annotate.export.min_kappa only if you accept less reliable preference data.")
            return 3
        return 0

    def reward(self) -> None:
        from alignkit.reward.evaluate import RewardEvalConfig, evaluate
        from alignkit.reward.train import RewardTrainConfig, train

        wired = {"model": self.path("sft", "model"), "data": self.path("annotate", "export", "pairs.jsonl"),
                 "output_dir": self.path("reward")}
        train(_stage_config(RewardTrainConfig, wired, self.cfg.reward, "reward"), force=self.force)
        wired = {"model": self.path("reward"), "output_dir": self.path("reward_eval")}
        evaluate(_stage_config(RewardEvalConfig, wired, self.cfg.reward_eval, "reward_eval"), force=self.force)

    def dpo(self) -> None:
        from alignkit.rlhf.dpo import DPOStageConfig, train

        wired = {"model": self.path("sft", "model"), "data": self.path("annotate", "export", "pairs.jsonl"),
                 "output_dir": self.path("dpo")}
        train(_stage_config(DPOStageConfig, wired, self.cfg.dpo, "dpo"), force=self.force)

    def ppo(self) -> None:
        from alignkit.rlhf.ppo import PPOConfig, train

        wired = {"policy": self.path("sft", "model"), "reward_model": self.path("reward", "model"),
                 "prompts": self.path("sft", "train_prompts.jsonl"), "output_dir": self.path("ppo")}
        train(_stage_config(PPOConfig, wired, self.cfg.ppo, "ppo"), force=self.force)

    def eval_models(self) -> dict[str, str]:
        """name -> model for the eval stage: (base), SFT, and the aligned models this loop trains."""
        models = {"base": self.cfg.model} if self.cfg.eval_base_model else {}
        models["sft"] = self.path("sft", "model")
        for stage in ("dpo", "ppo"):
            if stage in self.cfg.stages:
                models[stage] = self.path(stage, "model")
        return models

    def eval(self) -> None:
        from alignkit.evals.evaluate import EvalConfig, evaluate

        wired = {"models": self.eval_models(), "baseline": "sft", "prompts": self.path("sft", "heldout_prompts.jsonl"),
                 "output_dir": self.path("eval")}
        if "reward" in self.cfg.stages:
            wired["reward_model"] = self.path("reward", "model")
        evaluate(_stage_config(EvalConfig, wired, self.cfg.eval, "eval"), force=self.force)

    # -- the loop ----------------------------------------------------------------------------

    def __call__(self) -> int:
        self.run.mkdir(parents=True, exist_ok=True)
        code = 0
        for stage in STAGES:
            if stage not in self.cfg.stages:
                continue
            t0 = time.time()
            print(f"\n=== run: {stage} ===", flush=True)
            code = getattr(self, stage)() or 0
            self.timings[stage] = round(time.time() - t0, 1)
            print(f"=== run: {stage} finished in {self.timings[stage]:.1f} s ===", flush=True)
            if code:
                break
        index = write_index(self.run, self.timings)
        evaluation = self.run / "eval" / "eval.json"
        if evaluation.exists():
            print("\nrun: held-out evaluation (95% confidence intervals)\n" + _eval_summary(json.loads(evaluation.read_text())))
        print(f"\nrun: index of every report: {index}")
        return code


# ------------------------------------------------------------------------------------------
# The index page

REPORTS = [  # (stage dir, file, what it is)
    ("sft", "manifest.json", "SFT manifest: loss before/after, held-out leakage check"),
    ("annotate/export", "agreement/report.html", "Annotator agreement (Fleiss' kappa) and the export gate"),
    ("annotate/export", "manifest.json", "Export manifest: pairs, drops per reason"),
    ("reward_eval", "report.html", "Reward model: held-out accuracy, calibration, length correlation"),
    ("dpo", "manifest.json", "DPO manifest: implicit-reward accuracy before/after"),
    ("ppo", "manifest.json", "PPO manifest and metrics.jsonl: reward, KL, entropy per step"),
    ("eval", "report.html", "Held-out evaluation: reward, win rates, oracle, diversity"),
]


HEADLINES = {
    "sft": ["eval_loss_before", "eval_loss_after"],
    "annotate/export": ["n_pairs", "fleiss_kappa"],
    "reward_eval": ["accuracy", "ece", "length_spearman"],
    "dpo": ["eval_reward_accuracy_before", "eval_reward_accuracy_after"],
    "ppo": ["score_first", "score_last", "kl_last"],
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


def write_index(run: Path, timings: dict[str, float] | None = None) -> Path:
    """``<run>/index.html``: each stage's status, headline figures and a link to its report."""
    rows = []
    for stage, file, what in REPORTS:
        m = read_manifest(run / stage)
        target = run / stage / file
        status = m.get("status", "?") if m else "not run"
        link = f'<a href="{html.escape(f"{stage}/{file}")}">{html.escape(what)}</a>' if target.exists() else html.escape(what)
        rows.append(f"<tr><td>{html.escape(stage)}</td><td class='{html.escape(status)}'>{html.escape(status)}</td>"
                    f"<td>{link}</td><td>{html.escape(_headline(stage, m or {}))}</td></tr>")
    evaluation = run / "eval" / "eval.json"
    summary = ""
    if evaluation.exists():
        summary = f"<h2>Held-out evaluation</h2><pre>{html.escape(_eval_summary(json.loads(evaluation.read_text())))}</pre>"
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


def _eval_summary(result: dict) -> str:
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
    return "\n".join(lines + ([""] + verdicts if verdicts else []))


def beats(win: dict) -> str:
    """'beats' when the win rate's confidence interval lies above 0.5, 'loses' when below, else 'no
    clear difference'."""
    lo, hi = win.get("ci") or (None, None)
    if lo is None:
        return "no data"
    return "beats (CI above 0.5)" if lo > 0.5 else "loses (CI below 0.5)" if hi < 0.5 else "no clear difference (CI spans 0.5)"


# ------------------------------------------------------------------------------------------
# CLI


def _handler(args) -> int:
    cfg = load_config(LoopConfig, args.config, args.overrides)
    return Loop(cfg, force=args.force)()


def configure_cli(p) -> None:
    from alignkit.config import describe

    p.description = __doc__
    p.epilog = ("config keys:\n" + describe(LoopConfig) + "\n\nexit codes: 0 done, 2 bad config or data, "
                f"3 the agreement gate stopped the export, {WAITING_FOR_ANNOTATORS} waiting for human annotators")
    p.add_argument("config", help="YAML config (configs/quickstart.yaml)")
    p.add_argument("--force", action="store_true", help="run every stage again from scratch")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys (e.g. sft.max_steps=5)")
    p.set_defaults(func=_handler)
