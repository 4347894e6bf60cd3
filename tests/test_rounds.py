"""`alignkit run FILE rounds=2`: round 2's candidates come from round 1's policy chosen on the
validation prompts, its own Argilla dataset, a reward model and DPO trained on both rounds' pairs,
the index with both rounds' evaluations and a plot (checked in Chromium), a second run that skips
every stage; and the choice rule and the round wiring on their own."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.loop.rounds import choose_policy
from alignkit.runstore import hash_path, read_manifest
from tests.browser import report_page
from tests.test_loop import argilla_env, assert_test_prompts_read_only_by_the_final_eval, run_loop  # noqa: F401

TWO_ROUNDS = ["rounds=2", "stages=[sft,annotate,reward,dpo,ppo,eval]", "annotate.common.dataset=loop-rounds"]
ROUND_STAGES = ("annotate/candidates", "annotate/export", "reward", "reward_eval", "dpo", "ppo", "eval")


@pytest.mark.slow
def test_two_rounds_end_to_end_then_a_rerun_skips_every_stage(tmp_path, tiny_model, argilla_env, one_torch_thread,
                                                               capsys):
    assert run_loop(tmp_path, tiny_model, *TWO_ROUNDS) == 0
    loop = tmp_path / "loop"
    two = loop / "round2"
    for stage in ("sft", "eval_validation", *ROUND_STAGES, *(f"round2/{s}" for s in ROUND_STAGES)):
        m = read_manifest(loop / stage)
        assert m and m["status"] == "completed", (stage, m and m.get("error"))
    assert not (two / "sft").exists()  # one SFT model serves both rounds

    # Round 1's policy, chosen on the validation prompts by the rule, with every candidate's figure.
    choice = json.loads((two / "chosen_policy.json").read_text())
    assert choice["rule"] == "lc_win_rate" and "length-controlled" in choice["rule_text"]
    assert choice["prompts"].endswith("validation_prompts.jsonl") and choice["chosen_in_round"] == 1
    figures = {name: c["value"] for name, c in choice["candidates"].items()}
    assert set(figures) == {"dpo", "ppo"} and None not in figures.values()
    assert figures[choice["chosen"]] == max(figures.values())
    assert choice["model"] == str(loop / choice["chosen"] / "model")
    validation = json.loads((loop / "eval_validation" / "eval.json").read_text())
    assert {n: validation["models"][n]["lc_win_rate"]["reward_model"]["win_rate"] for n in figures} == figures

    # Round 2's candidates: that policy's replies to the training prompts, other seeds, a dataset of their own.
    generated = read_manifest(two / "annotate" / "candidates")
    assert generated["config"]["model"] == choice["model"] and generated["config"]["seed"] == 1000
    assert generated["inputs"]["model"]["hash"] == hash_path(Path(choice["model"]))
    assert generated["config"]["prompts_split"] == "train"
    assert read_manifest(two / "annotate" / "push")["config"]["dataset"] == "loop-rounds-round2"

    # Round 2's reward model and DPO read both rounds' pairs, each source counted and hashed.
    exports = {f"round{k}": d / "annotate" / "export" / "pairs.jsonl" for k, d in ((1, loop), (2, two))}
    for stage in ("reward", "dpo"):
        m = read_manifest(two / stage)
        sources = m["notes"]["sources"]
        assert [(s["name"], s["path"]) for s in sources] == [(name, str(p)) for name, p in exports.items()]
        assert all(s["pairs"] > 0 and s["kept"] > 0 for s in sources), sources
        assert {k: m["inputs"][f"data:{k}"]["hash"] for k in exports} == {k: hash_path(p) for k, p in exports.items()}
        assert m["config"]["model"] == str(loop / "sft" / "model")
    # DPO keeps the clearest pair per prompt of each round (the quickstart's pairs_per_prompt: 1): more than round 1's
    train = [read_manifest(d / "dpo")["notes"]["split_sizes"]["train"] for d in (loop, two)]
    assert train[1] > train[0], train
    ppo = read_manifest(two / "ppo")
    assert ppo["config"]["reward_model"] == str(two / "reward" / "model") and ppo["config"]["model"] == str(loop / "sft" / "model")

    # Each round's test evaluation compares SFT with that round's models.
    for d in (loop, two):
        result = json.loads((d / "eval" / "eval.json").read_text())
        assert set(result["models"]) == {"sft", "dpo", "ppo"} and result["prompts"].endswith("heldout_prompts.jsonl")
        m = read_manifest(d / "eval")
        assert m["config"]["reward_model"] == str(d / "reward" / "model")
        assert m["inputs"]["model:dpo"]["hash"] == hash_path(d / "dpo" / "model")
    assert_test_prompts_read_only_by_the_final_eval(loop)

    index = (loop / "index.html").read_text()
    for text in ("eval/report.html", "round2/eval/report.html", "round2/reward_eval/report.html",
                 "round2/chosen_policy.json", "Held-out (test) evaluation, round 1", "Held-out (test) evaluation, round 2",
                 "round 1: LC win rate vs sft", "round 2: LC win rate vs sft", "data:image/png;base64,"):
        assert text in index, text
    with report_page(loop / "index.html") as (page, requests):
        assert page.eval_on_selector("#rounds-plot", "img => img.complete && img.naturalWidth") > 0
        rows = page.eval_on_selector_all("#rounds tr", "rows => rows.map(r => r.innerText)")
        assert len(rows) == 4 and all(row.count("[") == 4 for row in rows[2:]), rows  # dpo, ppo: both rounds' CIs
        assert f"candidates from round 1's {choice['chosen']}" in page.inner_text("body")
        gains = page.eval_on_selector_all("#round-gains tr", "rows => rows.map(r => r.innerText)")
        assert any(row.startswith("round 2\tdpo\tall") for row in gains), gains
        assert all(u.startswith(("file:", "data:")) for u in requests), requests  # self-contained
    gains = json.loads((loop / "rounds.json").read_text())["gains_over_round_1"]
    assert set(gains["2"]) == {"dpo", "ppo"} and gains["2"]["dpo"]["all"]["n"] == result["oracle_prompts"]
    out = capsys.readouterr().out
    assert "evaluation of round 1" in out and "evaluation of round 2" in out

    # The same command again: every stage of both rounds skipped, the choice the same.
    manifests = {p: p.read_bytes() for p in loop.rglob("manifest.json")}
    chosen = (two / "chosen_policy.json").read_bytes()
    assert run_loop(tmp_path, tiny_model, *TWO_ROUNDS) == 0
    assert {p: p.read_bytes() for p in loop.rglob("manifest.json")} == manifests
    assert (two / "chosen_policy.json").read_bytes() == chosen


def win(rate: float | None) -> dict:
    return {"win_rate": rate, "ci": None if rate is None else [rate - 0.1, rate + 0.1]}


VALIDATION = {"baseline": "sft", "primary_reward": "reward_model", "prompts": "r/sft/validation_prompts.jsonl", "models": {
    "sft": {"oracle": {"pass": {"rate": 0.3, "ci": [0.2, 0.4]}}},
    "dpo": {"win_rate": {"reward_model": win(0.7)}, "lc_win_rate": {"reward_model": win(0.55)},
            "oracle": {"pass": {"rate": 0.5, "ci": [0.4, 0.6]}}},
    "ppo": {"win_rate": {"reward_model": win(0.6)}, "lc_win_rate": {"reward_model": win(0.62)},
            "oracle": {"pass": {"rate": 0.4, "ci": [0.3, 0.5]}}},
}}
CANDIDATES = {"dpo": "r/dpo/model", "ppo": "r/ppo/model"}


def test_the_round_choice_takes_the_highest_figure_and_records_every_candidate():
    c = choose_policy(VALIDATION, "lc_win_rate", CANDIDATES)
    assert (c["chosen"], c["model"]) == ("ppo", "r/ppo/model")
    assert c["candidates"] == {"dpo": {"model": "r/dpo/model", "value": 0.55, "ci": win(0.55)["ci"]},
                               "ppo": {"model": "r/ppo/model", "value": 0.62, "ci": win(0.62)["ci"]}}
    assert c["rule_text"] == "length-controlled reward-model win rate over sft"
    assert choose_policy(VALIDATION, "win_rate", CANDIDATES)["chosen"] == "dpo"
    assert choose_policy(VALIDATION, "oracle_pass_rate", CANDIDATES)["chosen"] == "dpo"

    tie = copy.deepcopy(VALIDATION)
    tie["models"]["ppo"]["lc_win_rate"]["reward_model"] = win(0.55)
    assert choose_policy(tie, "lc_win_rate", CANDIDATES)["chosen"] == "dpo"  # a tie: the first in stage order
    missing = copy.deepcopy(VALIDATION)
    missing["models"]["ppo"]["lc_win_rate"]["reward_model"] = win(None)
    c = choose_policy(missing, "lc_win_rate", CANDIDATES)
    assert c["chosen"] == "dpo" and c["candidates"]["ppo"]["value"] is None  # no figure, no win
    with pytest.raises(ConfigError, match="round_choice lc_win_rate: none of dpo, ppo"):
        choose_policy({**VALIDATION, "primary_reward": None}, "lc_win_rate", CANDIDATES)  # no reward model
    with pytest.raises(ConfigError, match="round_choice"):
        choose_policy(VALIDATION, "reward", CANDIDATES)


def test_round_two_is_wired_to_the_chosen_policy_and_every_rounds_pairs():
    from alignkit.loop.run import Loop, LoopConfig

    loop = Loop(LoopConfig(run_dir="r", rounds=2, stages=["sft", "annotate", "reward", "dpo", "eval"], seed=2,
                           annotate={"common": {"dataset": "mine"}}))
    one = loop.configs
    assert one["reward"].data == "r/annotate/export/pairs.jsonl" and one["annotate"]["push"].dataset == "mine"
    choice = one["choice_eval"]
    assert (choice.prompts, choice.output_dir) == ("r/sft/validation_prompts.jsonl", "r/eval_validation")
    assert one["eval"].prompts == "r/sft/heldout_prompts.jsonl"
    two = loop.at_round(2, "r/dpo/model")
    pairs = [{"path": "r/annotate/export/pairs.jsonl", "name": "round1"},
             {"path": "r/round2/annotate/export/pairs.jsonl", "name": "round2"}]
    assert two["reward"].data == two["dpo"].data == pairs
    assert (two["reward"].model, two["dpo"].model, two["reward"].output_dir) == ("r/sft/model", "r/sft/model", "r/round2/reward")
    generate = two["annotate"]["generate"]
    assert (generate.model, generate.prompts, generate.run_dir, generate.seed) == ("r/dpo/model", "r/sft", "r/round2/annotate", 1002)
    assert two["annotate"]["push"].dataset == "mine-round2" and two["annotate"]["simulate"].seed == 1002
    assert two["eval"].models == {"base": loop.cfg.model, "sft": "r/sft/model", "dpo": "r/round2/dpo/model"}
    assert two["eval"].reward_model == "r/round2/reward/model" and "choice_eval" not in two  # the last round
    # rounds=1 (the default) builds exactly what the loop always built
    assert Loop(LoopConfig(run_dir="r", stages=["sft", "annotate", "reward", "dpo", "eval"], seed=2,
                           annotate={"common": {"dataset": "mine"}})).configs == {
        k: v for k, v in Loop(LoopConfig(run_dir="r", rounds=2, stages=["sft", "annotate", "reward", "dpo", "eval"], seed=2,
                                         annotate={"common": {"dataset": "mine"}})).configs.items() if k != "choice_eval"}


@pytest.mark.parametrize("overrides, says", [
    (["rounds=0"], "rounds: expected an integer >= 1"),
    (["round_choice=reward"], "round_choice: expected one of lc_win_rate, win_rate, oracle_pass_rate"),
    (["rounds=2", "stages=[sft,annotate,reward]"], "rounds: 2 rounds need annotate, an aligned model"),
    (["rounds=2", "stages=[sft,annotate,dpo,eval]"], "rounds: 2 rounds need annotate"),
])
def test_bad_round_settings_stop_the_loop_before_any_stage(tmp_path, overrides, says, capsys):
    assert main(["run", "configs/quickstart.yaml", f"run_dir={tmp_path / 'loop'}", *overrides]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "loop").exists()


def test_round_gains_pair_each_prompt_across_rounds_overall_and_per_slice(tmp_path):
    """Round 2 against round 1 per model: per prompt, the share of passing replies in round 2 minus
    in round 1 (two replies a prompt here), averaged over prompts, overall and per slice."""
    from alignkit.loop.rounds import round_gains

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "heldout_prompts.jsonl").write_text("".join(
        json.dumps({"id": i, "slice": s}) + "\n" for i, s in (("a", "demo"), ("b", "demo"), ("c", "held_out"))))
    passes = {1: {"a": (1, 0), "b": (0, 0), "c": (1, 1)}, 2: {"a": (1, 1), "b": (1, 0), "c": (0, 1)}}
    for k, per_prompt in passes.items():
        d = tmp_path / ("eval" if k == 1 else "round2/eval")
        d.mkdir(parents=True)
        rows = [{"id": i, "sample": j, "responses": {"sft": {"oracle_score": 0.5},
                                                      "dpo": {"oracle_score": [0.5, 1.0][p[j]]}}}
                for i, p in per_prompt.items() for j in range(2)]
        (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gains = round_gains(tmp_path, {1: {"baseline": "sft"}, 2: {"baseline": "sft"}}, "eval")
    assert list(gains) == [2] and list(gains[2]) == ["dpo"]  # the baseline is the same model in every round
    by = gains[2]["dpo"]
    # per prompt: a 1.0 - 0.5, b 0.5 - 0, c 0.5 - 1.0
    assert by["all"]["mean"] == pytest.approx((0.5 + 0.5 - 0.5) / 3) and by["all"]["n"] == 3
    assert by["demo"]["mean"] == pytest.approx(0.5) and by["held_out"]["mean"] == pytest.approx(-0.5)
    assert by["held_out"]["ci"] == [None, None]  # one prompt: no interval
