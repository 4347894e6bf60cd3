"""``alignkit run FILE``: the whole loop from one config, resumable.

SFT -> candidates -> Argilla (push) -> annotators (simulated or human) -> pull -> agreement gate
-> export -> reward model (+ its evaluation) -> DPO and PPO (GRPO, RLOO when named in ``stages``)
-> held-out evaluation of every aligned model -> index page.

With ``rounds: N`` the loop goes round again: round k+1 samples new candidates from round k's best
aligned model on the validation prompts (``round_choice``), has them annotated in a new Argilla
dataset, and retrains the reward model and the aligned models from SFT on every round's pairs so
far; round k >= 2 lives in ``<run_dir>/round<k>/`` (:mod:`alignkit.loop.rounds`).

Every stage lives in ``<run_dir>/<stage>/`` and is skipped when its manifest says completed with
the same config and inputs, so running the same command again finishes in seconds, and a run
killed in the middle resumes where it stopped (training stages from their last checkpoint).
With human annotators the loop stops after pushing, says how far annotation is, and goes on from
there when run again.

The config has one section per stage; each holds that stage's own keys (see ``alignkit sft
--help``, ``alignkit reward train --help``, ...). The loop fills in the paths that connect the
stages; a key given in a section wins. Every section is checked before the first stage starts,
so a mistyped key fails at once, naming its section, not when its stage comes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from alignkit.annotation.cli import check_sections, verb_config
from alignkit.config import ConfigError, add_config_args, doc, from_dict, load_config, merge, to_dict
from alignkit.evals.evaluate import EvalConfig
from alignkit.evals.evaluate import evaluate as evaluate_models
from alignkit.loop.index import eval_summary, write_index
from alignkit.loop.rounds import CHOICE_RULES, CHOSEN_POLICY, choose_policy, round_dir, round_results
from alignkit.models import DEFAULT_MODEL
from alignkit.reward.evaluate import RewardEvalConfig
from alignkit.reward.evaluate import evaluate as evaluate_reward_model
from alignkit.reward.train import RewardTrainConfig
from alignkit.reward.train import train as train_reward_model
from alignkit.rlhf.dpo import DPOStageConfig
from alignkit.rlhf.dpo import train as train_dpo
from alignkit.rlhf.online import OnlineRLConfig, train_grpo, train_rloo
from alignkit.rlhf.ppo import PPOConfig
from alignkit.rlhf.ppo import train as train_ppo
from alignkit.runstore import atomic_write_json, hash_path, read_manifest, redact
from alignkit.sft.train import SFTStageConfig
from alignkit.sft.train import train as train_sft

log = logging.getLogger("alignkit.run")

STAGES = ("sft", "annotate", "reward", "dpo", "ppo", "grpo", "rloo", "eval")  # the order they run in
# GRPO and RLOO run only when named in `stages`: each costs about as much as PPO again
DEFAULT_STAGES = ("sft", "annotate", "reward", "dpo", "ppo", "eval")
ALIGNED = ("dpo", "ppo", "grpo", "rloo")  # the stages whose models the eval compares with SFT
ANNOTATION_VERBS = ("generate", "push", "simulate", "pull", "export")
WAITING_FOR_ANNOTATORS = 10  # exit code: nothing failed, the humans are not done yet
ROUND_SEED_STEP = 1000  # round k's annotation steps (sampling, annotator noise, ...) add (k - 1) * this to their seeds


@dataclass
class LoopConfig:
    run_dir: str = doc("every stage writes <run_dir>/<stage>/", "runs/quickstart")
    model: str = doc("the base model: a local dir, a Hub id, or offline:smollm2-135m-instruct", DEFAULT_MODEL)
    data: str = doc("instruction data for SFT ('demo': the shipped set with checkable constraints)", "demo")
    annotators: str = doc("'simulated' (an oracle-driven pool answers in Argilla) or 'human' (stop and wait)", "simulated")
    stages: list[str] = doc(f"stages to run, in loop order ({', '.join(STAGES)}); grpo and rloo train next to or "
                            "instead of ppo, on the same SFT policy, prompts and reward model, and the eval compares "
                            "every aligned model the list names", default_factory=lambda: list(DEFAULT_STAGES))
    seed: int = doc("added to the seed of every stage (SFT, candidate sampling, annotator noise and record order, "
                    "reward model, DPO, PPO, GRPO, RLOO, evaluation sampling); 0 keeps the stages' own seeds. Rerun the loop "
                    "with seed=1, 2, ... (each in its own run_dir) to see how much its figures move", 0)
    sft: dict = doc("SFT keys (alignkit sft --help)", default_factory=dict)
    annotate: dict = doc("annotation sections common/generate/push/simulate/pull/export (configs/annotate.yaml)", default_factory=dict)
    reward: dict = doc("reward model keys (alignkit reward train --help)", default_factory=dict)
    reward_eval: dict = doc("reward evaluation keys (alignkit reward eval --help)", default_factory=dict)
    dpo: dict = doc("DPO keys (alignkit align dpo --help)", default_factory=dict)
    ppo: dict = doc("PPO keys (alignkit align ppo --help)", default_factory=dict)
    grpo: dict = doc("GRPO keys (alignkit align grpo --help)", default_factory=dict)
    rloo: dict = doc("RLOO keys (alignkit align rloo --help)", default_factory=dict)
    eval: dict = doc("evaluation keys (alignkit eval --help)", default_factory=dict)
    evaluate_on: str = doc("prompts the final evaluation reads: 'test' (the held-out prompts, read once: the "
                           "figures to report) or 'validation' (for choosing settings; look as often as you "
                           "like; written to <run_dir>/eval_validation/)", "test")
    eval_base_model: bool = doc("evaluate the base model too, next to SFT and the aligned models (one more model to "
                                "sample from, score and compare)", True)
    rounds: int = doc("rounds of the loop. Round k+1 samples new candidates from round k's chosen policy (round_choice), "
                      "has them annotated in a new Argilla dataset (<dataset>-round<k+1>), and retrains the reward model "
                      "and the aligned models from SFT on every round's pairs so far; round 1 is <run_dir>/<stage>, "
                      "round k >= 2 <run_dir>/round<k>/<stage> (SFT is shared); the index shows every round", 1)
    round_choice: str = doc("which of round k's aligned models samples round k+1's candidates: the highest on round k's "
                            "validation evaluation (<round k>/eval_validation/; never the test prompts) by lc_win_rate "
                            "(length-controlled reward-model win rate over SFT), win_rate, or oracle_pass_rate; "
                            "ties go to the first in stage order", "lc_win_rate")

    def __post_init__(self):
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"stages: unknown {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
        if self.evaluate_on not in ("test", "validation"):
            raise ConfigError(f"evaluate_on: expected test or validation, got {self.evaluate_on!r}")
        if self.annotators not in ("simulated", "human"):
            raise ConfigError(f"annotators: expected simulated or human, got {self.annotators!r}")
        if self.round_choice not in CHOICE_RULES:
            raise ConfigError(f"round_choice: expected one of {', '.join(CHOICE_RULES)}, got {self.round_choice!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds: expected an integer >= 1, got {self.rounds!r}")
        if self.rounds > 1:
            needed = ["annotate"] + (["reward"] if self.round_choice != "oracle_pass_rate" else [])
            missing = [s for s in needed if s not in self.stages]
            if missing or not set(ALIGNED) & set(self.stages):
                raise ConfigError(f"rounds: {self.rounds} rounds need annotate, an aligned model ({', '.join(ALIGNED)}) "
                                  f"and, to choose by {self.round_choice}, the reward model in stages; got "
                                  f"{', '.join(self.stages)}")


def _local_server(server_home: str | None):
    """The local Argilla's config, or None when ARGILLA_API_URL/KEY name another server."""
    from alignkit.annotation.server import ServerConfig, named_server

    if named_server():
        return None
    return ServerConfig(home=server_home) if server_home else ServerConfig()


class Loop:
    def __init__(self, cfg: LoopConfig, force: bool = False):
        self.cfg, self.force = cfg, force
        self.run = Path(cfg.run_dir)
        self.timings: dict[str, float] = {}
        if cfg.rounds > 1:  # round 2's wiring (its pair files, dataset, policy) is checked up front too
            self.at_round(2, "(round 1's chosen policy)")
        self.configs = self.at_round(1)

    def at_round(self, k: int, policy: str | None = None) -> dict:
        """Round ``k``'s stage configs; round k >= 2 samples its candidates from ``policy``."""
        self.round, self.policy = k, policy
        return self.stage_configs()

    def path(self, *parts: str) -> str:
        """``<run_dir>/<parts>`` in round 1, ``<run_dir>/round<k>/<parts>`` in round k; SFT, shared by
        every round, is always ``<run_dir>/sft``."""
        base = self.run if parts[:1] == ("sft",) else round_dir(self.run, self.round)
        return str(base.joinpath(*parts))

    # -- every stage's config, built and checked before anything runs ------------------------

    def stage_configs(self) -> dict:
        """Each stage's config: the paths that connect the stages (wired here), then the section's
        own keys on top. Built all at once so that a bad key in any section stops the loop before
        its first stage, with the section and key in the message."""
        def build(cls, section: str, wired: dict):
            cfg = self.offset_seed(from_dict(cls, merge(wired, getattr(self.cfg, section) or {}), section))
            if hasattr(cfg, "check"):
                cfg.check()
            return cfg

        configs = {
            "sft": build(SFTStageConfig, "sft", {"model": self.cfg.model, "data": self.cfg.data,
                                                 "output_dir": self.path("sft")}),
            "reward": build(RewardTrainConfig, "reward", {"model": self.path("sft", "model"), "data": self.pairs(),
                                                          "output_dir": self.path("reward")}),
            "reward_eval": build(RewardEvalConfig, "reward_eval", {"model": self.path("reward"),
                                                                   "output_dir": self.path("reward_eval")}),
            "dpo": build(DPOStageConfig, "dpo", {"model": self.path("sft", "model"), "data": self.pairs(),
                                                 "output_dir": self.path("dpo")}),
            "ppo": build(PPOConfig, "ppo", self.online_rl_wiring("ppo", prompts_key="prompts")),
            "grpo": build(OnlineRLConfig, "grpo", self.online_rl_wiring("grpo", prompts_key="data")),
            "rloo": build(OnlineRLConfig, "rloo", self.online_rl_wiring("rloo", prompts_key="data")),
            "eval": build(EvalConfig, "eval", self.eval_wiring()),
        }
        if self.round < self.cfg.rounds:  # the next round's policy is chosen here, on the validation prompts
            choice = build(EvalConfig, "eval", self.eval_wiring("validation"))
            # whatever prompts or directory the section gives the final eval: never the test prompts
            choice.prompts, choice.output_dir = self.path("sft", "validation_prompts.jsonl"), self.path("eval_validation")
            configs["choice_eval"] = choice
        configs["annotate"] = self.annotation_configs()
        return configs

    def offset_seed(self, cfg, extra: int = 0):
        if hasattr(cfg, "seed"):
            cfg.seed += self.cfg.seed + extra
        return cfg

    @property
    def eval_dir(self) -> str:
        return "eval" if self.cfg.evaluate_on == "test" else "eval_validation"

    def pairs(self) -> str | list[dict]:
        """Round 1's export; from round 2 on, every round's export so far (round 1 first), as sources
        named round1, round2, ... (their counts in the manifest, each hashed among the inputs)."""
        if self.round == 1:
            return self.path("annotate", "export", "pairs.jsonl")
        return [{"path": str(round_dir(self.run, j) / "annotate" / "export" / "pairs.jsonl"), "name": f"round{j}"}
                for j in range(1, self.round + 1)]

    def online_rl_wiring(self, stage: str, prompts_key: str) -> dict:
        """PPO, GRPO and RLOO all start from the SFT policy, sample replies to the SFT stage's
        training prompts and are rewarded by this loop's reward model (through the scoring API), so
        the eval compares methods, not inputs. ``prompts_key``: the config key of the prompt file
        (PPO's ``prompts``, the TRL stages' ``data``)."""
        return {"model": self.path("sft", "model"), "reward_model": self.path("reward", "model"),
                prompts_key: self.path("sft", "train_prompts.jsonl"), "output_dir": self.path(stage)}

    def annotation_configs(self) -> dict:
        sections = dict(self.cfg.annotate)
        check_sections(sections, "annotate")
        user_common = sections.get("common") or {}
        common = merge({"run_dir": self.path("annotate"),
                        "dataset": f"{self.run.name}-{user_common.get('mode', 'binary')}"}, user_common)
        # round k >= 2: the chosen policy's replies to the same training prompts, other seeds, a dataset of its own
        wired = {"generate": {"model": self.policy or self.path("sft", "model"), "prompts": self.path("sft"),
                              "prompts_split": "train"}}
        configs = {verb: self.offset_seed(verb_config(verb, common, merge(wired.get(verb, {}), sections.get(verb) or {}),
                                                      f"annotate.{verb}"), ROUND_SEED_STEP * (self.round - 1))
                   for verb in ANNOTATION_VERBS}
        for cfg in configs.values():
            if self.round > 1 and hasattr(cfg, "dataset"):
                cfg.dataset += f"-round{self.round}"
        for verb, cfg in configs.items():  # cross-key checks too (binary_tie with mode ranking...), before any stage
            if hasattr(cfg, "check"):
                try:
                    cfg.check()
                except ConfigError as e:
                    raise ConfigError(f"annotate.{verb}: {e}") from None
        return configs

    def eval_models(self) -> dict[str, str]:
        """name -> model for the eval stage: (base), SFT, and the aligned models this loop trains."""
        models = {"base": self.cfg.model} if self.cfg.eval_base_model else {}
        models["sft"] = self.path("sft", "model")
        for stage in ALIGNED:
            if stage in self.cfg.stages:
                models[stage] = self.path(stage, "model")
        return models

    def eval_wiring(self, on: str | None = None) -> dict:
        """The eval's wiring on the test or the validation prompts (default: ``evaluate_on``)."""
        on = on or self.cfg.evaluate_on
        prompts, out = ("heldout_prompts.jsonl", "eval") if on == "test" else ("validation_prompts.jsonl", "eval_validation")
        wired = {"models": self.eval_models(), "baseline": "sft", "prompts": self.path("sft", prompts),
                 "output_dir": self.path(out), "forgetting_reference": self.cfg.model}
        if "reward" in self.cfg.stages:
            wired["reward_model"] = self.path("reward", "model")
        return wired

    # -- stages ------------------------------------------------------------------------------

    def sft(self) -> None:
        train_sft(self.configs["sft"], force=self.force)

    def annotate(self) -> int:
        from alignkit.annotation.candidates import generate
        from alignkit.annotation.server import connect
        from alignkit.annotation.server import down as stop_server
        from alignkit.annotation.server import status as local_status

        verbs = self.configs["annotate"]
        generate(verbs["generate"], force=self.force)  # skips itself unless its config or the SFT model changed
        if not self.force and self._annotation_up_to_date(verbs):
            log.info("annotate: every step already completed with this config on these candidates (%s)",
                     self.path("annotate"))
            return 0
        if self.cfg.annotators == "human" and not self.force:
            self._refuse_to_repush_silently(verbs)
        local = _local_server(verbs["push"].server_home)
        started_here = local is not None and not local_status(local)["ready"]
        connect(verbs["push"].server_home, start=True)  # the local server, unless ARGILLA_API_URL/KEY name another
        if self.cfg.annotators == "simulated" and started_here:
            try:
                return self._annotate_on_server(verbs)
            finally:
                # An idle Argilla (server, search engine, workers) holds about 2 GB and competes for
                # the CPU: with two left running, a 59 s generation took 65-77 s on 2 cores. Stop
                # the one this run started before training.
                stop_server(local)
                print(f"run: stopped the local Argilla server this run started; the annotations stay in "
                      f"{local.home} (`alignkit annotate server up` to browse them)")
        return self._annotate_on_server(verbs)

    def _annotation_up_to_date(self, verbs: dict) -> bool:
        """Whether push, (simulate,) pull and export all completed with today's configs and the export
        read today's candidates: only then may the loop skip the server. Any change (new SFT model,
        hence new candidates; another annotator setting; another gate) redoes the steps after it."""
        steps = ["push", "simulate", "pull", "export"] if self.cfg.annotators == "simulated" else ["push", "pull", "export"]
        for verb in steps:  # each writes <run_dir>/annotate/<verb>/manifest.json
            m = read_manifest(self.path("annotate", verb))
            if not m or m.get("status") != "completed" or m.get("config") != redact(to_dict(verbs[verb])):
                return False
        candidates = Path(verbs["export"].paths()[1])
        used = (read_manifest(self.path("annotate", "export")).get("inputs", {}).get("candidates") or {}).get("hash")
        return candidates.exists() and used == hash_path(candidates)

    def _refuse_to_repush_silently(self, verbs: dict) -> None:
        """People may be answering the pushed records: new candidates (a new SFT model, other
        annotate.generate settings) go to Argilla only when asked for with --force."""
        pushed = read_manifest(self.path("annotate", "push"))
        if not pushed or pushed.get("status") != "completed":
            return
        used = (pushed.get("inputs", {}).get("candidates") or {}).get("hash")
        candidates = Path(verbs["export"].paths()[1])
        if used and candidates.exists() and used != hash_path(candidates):
            raise ConfigError(
                f"annotate: the candidates changed since they were pushed to Argilla for your annotators "
                f"(a new SFT model or other annotate.generate settings: see {candidates.parent / 'manifest.json'}). "
                f"Pushing them adds new records beside the ones being answered; run again with --force to do so "
                f"(answers to the old records stay in Argilla but are no longer exported).")

    def _annotate_on_server(self, verbs: dict) -> int:
        """Push, (simulate,) pull and export once the Argilla server answers."""
        from alignkit.annotation.datasets import push
        from alignkit.annotation.export import export
        from alignkit.annotation.gate import GateError
        from alignkit.annotation.pull import pull

        push(verbs["push"])
        if self.cfg.annotators == "simulated":
            from alignkit.annotation.simulate import simulate

            simulate(verbs["simulate"])
        pulled = pull(verbs["pull"])
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
        try:
            export(verbs["export"], force=self.force)
        except GateError as e:
            print(f"run: the agreement gate stopped the export: {e}\n  See {self.path('annotate', 'export')}; "
                  f"lower annotate.export.min_kappa only if you accept less reliable preference data.")
            return GateError.exit_code
        return 0

    def reward(self) -> None:
        train_reward_model(self.configs["reward"], force=self.force)
        evaluate_reward_model(self.configs["reward_eval"], force=self.force)

    def dpo(self) -> None:
        train_dpo(self.configs["dpo"], force=self.force)

    def ppo(self) -> None:
        train_ppo(self.configs["ppo"], force=self.force)

    def grpo(self) -> None:
        train_grpo(self.configs["grpo"], force=self.force)

    def rloo(self) -> None:
        train_rloo(self.configs["rloo"], force=self.force)

    def eval(self) -> None:
        evaluate_models(self.configs["eval"], force=self.force)

    def choose(self) -> str:
        """This round's aligned models on the validation prompts (``eval_validation/``), and the one
        ``round_choice`` picks: the next round's candidates are its replies. The choice, with every
        candidate's figure, goes to ``round<k+1>/chosen_policy.json``; returns the chosen model."""
        cfg = self.configs["choice_eval"]
        result = evaluate_models(cfg, force=self.force)
        candidates = {name: model for name, model in cfg.models.items() if name in ALIGNED}
        choice = {"round": self.round + 1, "chosen_in_round": self.round,
                  **choose_policy(result, self.cfg.round_choice, candidates),
                  "evaluation": str(Path(cfg.output_dir) / "eval.json")}
        out = round_dir(self.run, self.round + 1) / CHOSEN_POLICY
        atomic_write_json(out, choice)
        print(f"run: round {self.round + 1} samples its candidates from round {self.round}'s {choice['chosen']} "
              f"(highest {choice['rule_text']} on the validation prompts; {out})")
        return choice["model"]

    # -- the loop ----------------------------------------------------------------------------

    def timed(self, name: str, step):
        t0 = time.time()
        print(f"\n=== run: {name} ===", flush=True)
        result = step()
        self.timings[name] = round(time.time() - t0, 1)
        print(f"=== run: {name} finished in {self.timings[name]:.1f} s ===", flush=True)
        return result

    def run_round(self, k: int) -> int:
        """Round ``k``'s stages (SFT only in round 1); round k >= 2 first chooses round k-1's policy."""
        prefix = "" if k == 1 else f"round{k}/"
        if k > 1:  # round k-1's configs choose, then round k's are built on the choice
            self.configs = self.at_round(k, self.timed(f"{prefix}choose", self.choose))
        for stage in STAGES:
            if stage in self.cfg.stages and not (stage == "sft" and k > 1):
                code = self.timed(prefix + stage, getattr(self, stage)) or 0
                if code:
                    return code
        return 0

    def __call__(self) -> int:
        self.run.mkdir(parents=True, exist_ok=True)
        code = 0
        try:
            for k in range(1, self.cfg.rounds + 1):
                code = self.run_round(k)
                if code:
                    break
        finally:  # a stage that raised still gets the index rewritten: its row says failed
            index = write_index(self.run, self.timings, self.eval_dir, self.cfg.rounds)
        which = "held-out (test)" if self.cfg.evaluate_on == "test" else "validation"
        for k, result in round_results(self.run, self.cfg.rounds, self.eval_dir).items():
            print(f"\nrun: {which} evaluation{'' if self.cfg.rounds == 1 else f' of round {k}'} "
                  f"(95% confidence intervals)\n" + eval_summary(result))
        print(f"\nrun: index of every report: {index}")
        return code


# ------------------------------------------------------------------------------------------
# CLI


def _handler(args) -> int:
    cfg = load_config(LoopConfig, args.config, args.overrides)
    return Loop(cfg, force=args.force)()


def configure_cli(p) -> None:
    p.description = __doc__
    add_config_args(p, LoopConfig, "configs/quickstart.yaml", force_help="run every stage again from scratch",
                    positional=True)
    p.epilog += (f"\n\nexit codes: 0 done, 2 bad config or data, 3 the agreement gate stopped the export, "
                 f"{WAITING_FOR_ANNOTATORS} waiting for human annotators")
    p.set_defaults(func=_handler)
