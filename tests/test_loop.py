"""`alignkit run`: the whole loop on a tiny model against the real local Argilla, a second run
that skips every stage, the human-annotator mode that stops and says how far annotation is, and
GRPO and RLOO run from the loop on its reward model (killed in RLOO and resumed)."""

from __future__ import annotations

import json
import re

import pytest

from alignkit.cli import main
from alignkit.runstore import hash_path, read_manifest
from tests.test_kill_resume import ROOT, kill_when

TINY_LOOP = [
    "sft.max_steps=4", "sft.batch_size=4", "sft.max_length=96", "sft.eval_steps=1000", "sft.save_steps=100",
    "sft.max_examples=120", "sft.learning_rate=1e-3",
    "annotate.generate.max_prompts=20", "annotate.generate.max_new_tokens=10", "annotate.generate.batch_size=10",
    "annotate.simulate.flip_prob=0.0", "annotate.simulate.tie_threshold=0.0", "annotate.export.min_kappa=0.2", "annotate.export.bootstrap=50",
    "reward.max_steps=4", "reward.batch_size=4", "reward.max_length=128", "reward.eval_steps=1000",
    "reward.save_steps=100", "reward.learning_rate=1e-3", "reward.trainable_layers=1", "reward.backbone_layers=null",
    "dpo.max_steps=3", "dpo.batch_size=2", "dpo.max_length=128", "dpo.eval_steps=1000", "dpo.save_steps=100",
    "dpo.trainable_layers=1", "ppo.trainable_layers=1",
    "ppo.total_steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.max_new_tokens=8", "ppo.save_steps=100",
    "eval.max_prompts=6", "eval.max_new_tokens=8", "eval.batch_size=6",
    # GRPO and RLOO (not in the default stages): two steps of 4 replies, 2 per prompt
    *[f"{method}.{key}" for method in ("grpo", "rloo") for key in (
        "trainable_layers=1", "max_steps=2", "batch_size=4", "num_generations=2", "max_new_tokens=8", "save_steps=100")],
]


@pytest.fixture
def argilla_env(argilla_server, monkeypatch):
    """Point the loop at the session's Argilla instead of starting another one."""
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    return argilla_server


def run_loop(tmp_path, tiny_model, *extra: str) -> int:
    return main(["run", "configs/quickstart.yaml", f"run_dir={tmp_path / 'loop'}", f"model={tiny_model}",
                 *TINY_LOOP, *extra])


def test_whole_loop_then_a_rerun_skips_every_stage(tmp_path, tiny_model, argilla_env, capsys):
    assert run_loop(tmp_path, tiny_model, "annotate.common.dataset=loop-test") == 0
    loop = tmp_path / "loop"
    for stage in ("sft", "annotate/candidates", "annotate/export", "reward", "reward_eval", "dpo", "ppo", "eval"):
        m = read_manifest(loop / stage)
        assert m and m["status"] == "completed", (stage, m and m.get("error"))
    result = json.loads((loop / "eval" / "eval.json").read_text())
    assert set(result["models"]) == {"sft", "dpo", "ppo"}  # the quickstart leaves the base model out
    index = (loop / "index.html").read_text()
    assert "eval/report.html" in index and "reward_eval/report.html" in index
    assert argilla_env.api_key not in index
    assert_test_prompts_read_only_by_the_final_eval(loop)
    capsys.readouterr()
    manifests = {p: p.read_bytes() for p in loop.rglob("manifest.json")}

    assert run_loop(tmp_path, tiny_model, "annotate.common.dataset=loop-test") == 0
    out = capsys.readouterr()
    assert "already completed" in out.err + out.out
    # A skipped stage never rewrites its manifest: nothing trained, generated or annotated again.
    assert {p: p.read_bytes() for p in loop.rglob("manifest.json")} == manifests

    # Choosing settings reads the validation prompts, into a directory of its own.
    assert run_loop(tmp_path, tiny_model, "annotate.common.dataset=loop-test", "evaluate_on=validation") == 0
    validation = json.loads((loop / "eval_validation" / "eval.json").read_text())
    assert validation["prompts"].endswith("validation_prompts.jsonl")
    assert (loop / "eval" / "manifest.json").read_bytes() == manifests[loop / "eval" / "manifest.json"]


def assert_test_prompts_read_only_by_the_final_eval(loop):
    """No file of any stage before the final evaluation holds a test prompt: SFT trained on none,
    annotation sampled none, and so the reward model, DPO and PPO saw none (in every round: the
    policy a round's candidates come from was chosen on the validation prompts)."""
    test = [json.loads(line)["prompt"][-1]["content"]
            for line in (loop / "sft" / "heldout_prompts.jsonl").read_text().splitlines()]
    sizes = read_manifest(loop / "sft")["notes"]["split_sizes"]
    assert test and len(test) == sizes["heldout"] and read_manifest(loop / "sft")["notes"]["split_source"] == "data"
    needles = {t.encode() for t in test} | {json.dumps(t)[1:-1].encode() for t in test}
    for f in sorted(loop.rglob("*")):
        rel = f.relative_to(loop).as_posix()
        if f.is_dir() or re.match(r"(round\d+/)?eval/", rel) or rel in ("sft/heldout_prompts.jsonl", "index.html"):
            continue
        data = f.read_bytes()
        assert not any(n in data for n in needles), f"{rel} holds a test prompt"


def test_a_changed_sft_model_or_gate_redoes_the_annotation_steps_after_it(tmp_path, tiny_model, argilla_env):
    first = ["stages=[sft,annotate]", "annotate.common.dataset=loop-lineage"]
    assert run_loop(tmp_path, tiny_model, *first) == 0
    annotate = tmp_path / "loop" / "annotate"
    before = {step: read_manifest(annotate / step) for step in ("candidates", "export")}

    # Another gate: the candidates stay, the export runs again under the new gate.
    assert run_loop(tmp_path, tiny_model, *first, "annotate.export.min_kappa=0.25") == 0
    assert read_manifest(annotate / "candidates") == before["candidates"]
    export = read_manifest(annotate / "export")
    assert export["config"]["min_kappa"] == 0.25  # rewritten: a skipped step never touches its manifest

    # Another SFT model: new candidates from it, and the export reads those, not the old ones.
    assert run_loop(tmp_path, tiny_model, *first, "annotate.export.min_kappa=0.25", "sft.learning_rate=2e-3") == 0
    candidates = read_manifest(annotate / "candidates")
    assert candidates["inputs"]["model"]["hash"] != before["candidates"]["inputs"]["model"]["hash"]
    export = read_manifest(annotate / "export")
    assert export["inputs"]["candidates"]["hash"] != before["export"]["inputs"]["candidates"]["hash"]
    assert export["metrics"]["dropped"]["candidate_changed"] > 0  # the old records' answers are not reused

    # Nothing changed: every step is skipped.
    assert run_loop(tmp_path, tiny_model, *first, "annotate.export.min_kappa=0.25", "sft.learning_rate=2e-3") == 0
    assert read_manifest(annotate / "export") == export and read_manifest(annotate / "candidates") == candidates


def test_human_annotators_stop_the_loop_and_say_how_far(tmp_path, tiny_model, argilla_env, capsys):
    code = run_loop(tmp_path, tiny_model, "annotators=human", "stages=[sft,annotate,reward]",
                    "annotate.common.dataset=loop-human", "annotate.generate.max_prompts=4")
    assert code == 10
    out = capsys.readouterr().out
    assert "waiting for annotators: 0 of 4 records completed" in out
    assert read_manifest(tmp_path / "loop" / "reward") is None  # nothing after annotation ran
    # A new SFT model means new candidates: with people answering, the loop asks before pushing them.
    code = run_loop(tmp_path, tiny_model, "annotators=human", "stages=[sft,annotate,reward]",
                    "annotate.common.dataset=loop-human", "annotate.generate.max_prompts=4", "sft.learning_rate=2e-3")
    err = capsys.readouterr().err
    assert code == 2 and "the candidates changed since they were pushed" in err and "--force" in err


@pytest.mark.slow
def test_grpo_and_rloo_in_the_loop_read_its_reward_model_join_the_eval_and_resume_after_a_kill(
        tmp_path, tiny_model, one_torch_thread):
    """GRPO and RLOO named in ``stages``: trained on the SFT policy and training prompts against the
    loop's reward model, compared by the eval next to SFT; a loop killed in its RLOO stage resumes
    RLOO from its last checkpoint and redoes nothing before it. Annotation is left out (the pairs it
    exports are written in its place; the whole-loop test runs it), so no Argilla is needed."""
    loop = tmp_path / "loop"
    pairs = loop / "annotate" / "export" / "pairs.jsonl"
    pairs.parent.mkdir(parents=True)
    pairs.write_text("".join(json.dumps({"prompt": f"Name a fruit ({i}).", "chosen": "An apple.",
                                         "rejected": "no no no no no"}) + "\n" for i in range(24)))
    stages = "stages=[sft,reward,grpo,rloo,eval]"
    assert run_loop(tmp_path, tiny_model, stages) == 0
    reward_model = loop / "reward" / "model"
    for method in ("grpo", "rloo"):
        m = read_manifest(loop / method)
        assert m["status"] == "completed" and m["metrics"]["global_step"] == 2, (method, m.get("error"))
        cfg = m["config"]
        assert m["stage"] == cfg["method"] == method
        assert (cfg["model"], cfg["data"]) == (str(loop / "sft" / "model"), str(loop / "sft" / "train_prompts.jsonl"))
        assert cfg["reward_model"] == str(reward_model) and cfg["reward_function"] is None
        assert m["inputs"]["reward_model"]["hash"] == hash_path(reward_model)
    result = json.loads((loop / "eval" / "eval.json").read_text())
    assert set(result["models"]) == {"sft", "grpo", "rloo"} and result["baseline"] == "sft"
    for method in ("grpo", "rloo"):
        assert result["models"][method]["win_rate"]["reward_model"]["win_rate"] is not None
        assert read_manifest(loop / "eval")["inputs"][f"model:{method}"]["hash"] == hash_path(loop / method / "model")
    assert "grpo/manifest.json" in (loop / "index.html").read_text()

    # Longer RLOO (a new config: it starts afresh), killed at a checkpoint, then the same command again.
    # (checkpoint-4: the 2-step run above left a checkpoint-2 behind, until the new run clears it.)
    done = {stage: (loop / stage / "manifest.json").read_bytes() for stage in ("sft", "reward", "grpo")}
    longer = [stages, "rloo.max_steps=12", "rloo.save_steps=2"]
    kill_when(["run", str(ROOT / "configs" / "quickstart.yaml"), f"run_dir={loop}", f"model={tiny_model}", *TINY_LOOP,
               *longer], tmp_path, lambda: (loop / "rloo" / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists(),
              "RLOO's checkpoint at step 4")
    assert read_manifest(loop / "rloo")["status"] == "running"
    assert run_loop(tmp_path, tiny_model, *longer) == 0
    m = read_manifest(loop / "rloo")
    assert m["status"] == "completed" and m["notes"].get("resumed_from") and m["metrics"]["global_step"] == 12
    assert {stage: (loop / stage / "manifest.json").read_bytes() for stage in done} == done  # not redone
    assert read_manifest(loop / "eval")["inputs"]["model:rloo"]["hash"] == hash_path(loop / "rloo" / "model")


def test_eval_summary_says_which_models_beat_the_baseline():
    from alignkit.loop.index import beats, eval_summary

    def win(rate, lo, hi):
        return {"win_rate": rate, "ci": [lo, hi]}

    result = {"baseline": "sft", "primary_reward": "reward_model", "models": {
        "sft": {"reward": {"reward_model": {"mean": 0.1, "ci": [0.0, 0.2]}}, "oracle": {"pass": {"rate": 0.2, "ci": [0.1, 0.3]}}},
        "dpo": {"reward": {"reward_model": {"mean": 0.5, "ci": [0.4, 0.6]}},
                "win_rate": {"reward_model": win(0.7, 0.56, 0.81)}, "lc_win_rate": {"reward_model": win(0.6, 0.45, 0.72)},
                "oracle": {"pass": {"rate": 0.4, "ci": [0.3, 0.5]}, "win_rate": win(0.55, 0.41, 0.68)}},
        "ppo": {"reward": {"reward_model": {"mean": -0.5, "ci": [-0.6, -0.4]}},
                "win_rate": {"reward_model": win(0.2, 0.1, 0.35)},
                "oracle": {"pass": {"rate": 0.1, "ci": [0.0, 0.2]}}},
    }}
    text = eval_summary(result)
    assert "0.700 [0.560, 0.810]" in text and "0.550 [0.410, 0.680]" in text
    assert "dpo vs sft: by the reward model: beats (CI above 0.5); by the oracle: no clear difference (CI spans 0.5)" in text
    assert "ppo vs sft: by the reward model: loses (CI below 0.5)" in text and "ppo vs sft: by the reward model: loses (CI below 0.5);" not in text
    assert "sft vs sft" not in text
    assert beats({"ci": [None, None]}) == "no data"


def test_eval_models_follow_the_stages_and_the_base_model_switch():
    from alignkit.loop.run import Loop, LoopConfig

    loop = Loop(LoopConfig(run_dir="r", model="offline:x"))
    assert loop.eval_models() == {"base": "offline:x", "sft": "r/sft/model", "dpo": "r/dpo/model", "ppo": "r/ppo/model"}
    loop = Loop(LoopConfig(run_dir="r", stages=["sft", "annotate", "reward", "ppo", "eval"], eval_base_model=False))
    assert loop.eval_models() == {"sft": "r/sft/model", "ppo": "r/ppo/model"}
    loop = Loop(LoopConfig(run_dir="r", stages=["sft", "reward", "grpo", "rloo", "eval"], eval_base_model=False))
    assert loop.eval_models() == {"sft": "r/sft/model", "grpo": "r/grpo/model", "rloo": "r/rloo/model"}



@pytest.mark.parametrize("section", ["sft", "reward", "reward_eval", "dpo", "ppo", "grpo", "rloo", "eval", "annotate.generate",
                                     "annotate.push", "annotate.simulate", "annotate.pull", "annotate.export",
                                     "annotate.common"])
def test_a_mistyped_key_in_any_section_stops_the_loop_before_any_stage(tmp_path, section, capsys):
    """Every section is checked before the first stage: a typo fails at once, naming section and key,
    not when its stage comes ten minutes into the loop."""
    code = main(["run", "configs/quickstart.yaml", f"run_dir={tmp_path / 'loop'}", f"{section}.kl_coeff=0.1"])
    err = capsys.readouterr().err
    assert code == 2
    stage, _, verb = section.partition(".")
    assert stage in err and verb in err and "kl_coeff" in err, err
    assert not (tmp_path / "loop").exists()  # nothing ran, nothing was written


def test_a_bad_value_and_an_unknown_annotation_section_stop_the_loop_too(tmp_path, capsys):
    assert main(["run", "configs/quickstart.yaml", f"run_dir={tmp_path / 'loop'}", "ppo.mini_batch_size=3"]) == 2
    assert "mini_batch_size 3 must divide rollout_batch_size" in capsys.readouterr().err
    assert main(["run", "configs/quickstart.yaml", f"run_dir={tmp_path / 'loop'}", "annotate.exprt.min_kappa=0.5"]) == 2
    assert "exprt" in capsys.readouterr().err
    # a check across keys, which the push step used to make only after the candidates were sampled
    assert main(["run", "configs/quickstart.yaml", f"run_dir={tmp_path / 'loop'}", "annotate.common.mode=ranking",
                 "annotate.common.binary_tie=true"]) == 2
    assert "annotate.push: binary_tie: only for mode binary" in capsys.readouterr().err
    assert not (tmp_path / "loop").exists()


def test_the_loop_seed_moves_every_stage_seed_and_zero_keeps_them():
    from alignkit.loop.run import Loop, LoopConfig

    sections = dict(reward={"seed": 7}, annotate={"simulate": {"seed": 5}})
    loop = Loop(LoopConfig(run_dir="r", seed=3, **sections))
    seeds = {name: cfg.seed for name, cfg in loop.configs.items() if name != "annotate" and hasattr(cfg, "seed")}
    assert seeds == {"sft": 3, "reward": 10, "dpo": 3, "ppo": 3, "grpo": 3, "rloo": 3, "eval": 3}
    verbs = {verb: cfg.seed for verb, cfg in loop.configs["annotate"].items()}
    assert verbs == {"generate": 3, "push": 3, "simulate": 8, "pull": 3, "export": 3}
    same = Loop(LoopConfig(run_dir="r", **sections)).configs
    assert same["reward"].seed == 7 and same["sft"].seed == 0 and same["annotate"]["simulate"].seed == 5
