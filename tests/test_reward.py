"""Reward stage: real training on the tiny model, the loss by hand, malformed data, the scoring API."""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest
import torch
from alignkit.cli import main as cli_main
from alignkit.config import ConfigError
from alignkit.data import DataError
from alignkit.reward.evaluate import RewardEvalConfig, evaluate
from alignkit.reward.train import RewardTrainConfig, prepare_data, train
from alignkit.runstore import read_manifest
from alignkit.scoring import RewardScorer
from alignkit.stats import wilson_interval
from alignkit.training import LoraOptions

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WORDS = "the sea is wide and blue waves are calling you eat a balanced diet exercise sleep well".split()
BIG, SMALL = 4.0, 0.25


def synthetic_pairs(n: int, seed: int, noise: float = 0.0, aspects: bool = False) -> list[dict]:
    """The rule: a reply ending in "Good." beats the same reply ending in "Bad." (margin 4), and
    "Yes." beats "No." (margin 0.25). With label noise the loss has a finite optimum gap, which
    grows with the margin: for flip rate e the optimum solves (1-e)*sigmoid(m - gap) = e*sigmoid(gap + m),
    about 2.1 for m=0.25 and 6.2 for m=4 at e=0.15. Without noise, Adam grows every gap alike."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        good, bad, margin = ("Good.", "Bad.", BIG) if i % 2 == 0 else ("Yes.", "No.", SMALL)
        chosen, rejected = f"{filler} {good}", f"{filler} {bad}"
        if rng.random() < noise:
            chosen, rejected = rejected, chosen
        row = {"prompt": f"Question {seed}-{i}: {rng.choice(WORDS)}?", "chosen": chosen, "rejected": rejected,
               "margin": margin, "item_id": f"{seed}-{i}"}
        if aspects:  # "polite" follows the rule; "short" is rated 3 on both sides (no order to learn)
            row["aspects_chosen"] = {"polite": 5 if chosen.endswith(("Good.", "Yes.")) else 1, "short": 3}
            row["aspects_rejected"] = {"polite": 1 if chosen.endswith(("Good.", "Yes.")) else 5, "short": 3}
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gaps(model_dir, pairs):
    scorer = RewardScorer(model_dir)
    prompts = [p["prompt"] for p in pairs]
    c = scorer.score(prompts, [p["chosen"] if isinstance(p["chosen"], str) else p["chosen"][0]["content"] for p in pairs])
    r = scorer.score(prompts, [p["rejected"] if isinstance(p["rejected"], str) else p["rejected"][0]["content"] for p in pairs])
    return [a - b for a, b in zip(c, r)]


@pytest.fixture(scope="module")
def synthetic_run(tiny_model, tmp_path_factory):
    """Train on noisy synthetic pairs (15% flipped), evaluate on a clean held-out file."""
    d = tmp_path_factory.mktemp("reward_syn")
    train_file = write_jsonl(d / "train.jsonl", synthetic_pairs(256, seed=1, noise=0.15))
    eval_file = write_jsonl(d / "eval.jsonl", synthetic_pairs(40, seed=2))
    cfg = RewardTrainConfig(model=str(tiny_model), data=str(train_file), eval_data=str(eval_file),
                            output_dir=str(d / "run"), max_length=128, epochs=3, learning_rate=2e-3, batch_size=16,
                            warmup_ratio=0.0, eval_steps=1000, save_steps=16, logging_steps=1000)
    manifest = train(cfg)
    return cfg, manifest, eval_file


@pytest.mark.slow
def test_learns_rule_and_margins_widen_gaps(synthetic_run):
    cfg, manifest, eval_file = synthetic_run
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["eval_accuracy_after"] >= 0.9
    assert manifest["notes"]["margin"]["used"] is True
    held = [json.loads(line) for line in eval_file.read_text().splitlines()]
    g = gaps(f"{cfg.output_dir}/model", held)
    assert sum(x > 0 for x in g) / len(g) >= 0.9
    big = [x for x, p in zip(g, held) if p["margin"] == BIG]
    small = [x for x, p in zip(g, held) if p["margin"] == SMALL]
    assert sum(big) / len(big) > sum(small) / len(small) + 1.0, (big, small)


@pytest.mark.slow
def test_completed_run_is_noop_and_interrupted_run_resumes(synthetic_run):
    cfg, _, _ = synthetic_run
    again = train(cfg)  # completed, same config and inputs: skipped
    assert again["status"] == "completed" and "resumed_from" not in again["notes"]
    # Simulate a crash after the last checkpoint: status "running", no final model.
    import shutil
    from pathlib import Path

    out = Path(cfg.output_dir)
    m = read_manifest(out)
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(out / "model")
    resumed = train(cfg)
    assert resumed["status"] == "completed"
    assert resumed["notes"]["resumed_from"].endswith("checkpoint-48")
    assert (out / "model" / "config.json").exists()


def test_batched_scores_equal_one_at_a_time(synthetic_run):
    cfg, _, _ = synthetic_run
    scorer = RewardScorer(f"{cfg.output_dir}/model", batch_size=3)
    prompts = ["What is the capital of France?", [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "hi"}],
               "Explain photosynthesis in a few words please.", "x", "Answer in one word.", "Summarise."]
    responses = ["Paris.", "hello there friend, how are you today? the sea is wide and blue", "no",
                 "The sea is wide and blue", "Yes.", "Good."]
    batched = scorer.score(prompts, responses)
    single = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert all(isinstance(x, float) for x in batched)
    assert max(abs(a - b) for a, b in zip(batched, single)) < 1e-4
    # score_tensors on the caller's own (right-padded) tokenisation gives the same numbers
    ids = scorer.encode(prompts, responses)
    batch = scorer.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    assert torch.allclose(scorer.score_tensors(batch["input_ids"], batch["attention_mask"]), torch.tensor(batched), atol=1e-4)


def test_loss_matches_hand_computation(tiny_model, tmp_path):
    from alignkit.reward.train import _make_trainer_class
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput
    from trl import RewardConfig

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    args = RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=0.1, bf16=False, use_cpu=True,
                        report_to=[], gradient_checkpointing=False, remove_unused_columns=False)
    from alignkit.models import load_tokenizer

    trainer = _make_trainer_class()(model=model, args=args, processing_class=load_tokenizer(str(tiny_model)),
                                    train_dataset=Dataset.from_list([{"chosen_ids": [5, 6], "rejected_ids": [7]}]))
    # rewards: chosen [2.0, 0.5], rejected [1.0, 1.5]; margins [0.5, 0.0]
    #   pair 1: 2.0 - 1.0 - 0.5 = 0.5   -> -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    #   pair 2: 0.5 - 1.5 - 0.0 = -1.0  -> -log sigmoid(-1)  = log(1 + e^1)    = 1.313262
    #   ranking loss = mean = 0.893669
    #   centring: 0.1 * mean((2.0 + 1.0)^2, (0.5 + 1.5)^2) = 0.1 * (9 + 4) / 2 = 0.65
    #   total = 1.543669
    logits = torch.tensor([[2.0], [0.5], [1.0], [1.5]])  # chosen rows first, then rejected (TRL's collator order)
    inputs = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long),
              "margin": torch.tensor([0.5, 0.0])}
    loss = trainer.compute_loss(lambda **_: SequenceClassifierOutput(logits=logits), dict(inputs))
    assert loss.item() == pytest.approx(0.893669 + 0.65, abs=1e-5)
    # Plain Bradley-Terry (no margin column): log(1 + e^-1) = 0.313262, log(1 + e^1) = 1.313262 -> mean 0.813262
    no_margin = {k: v for k, v in inputs.items() if k != "margin"}
    trainer.args.center_rewards_coefficient = None
    loss = trainer.compute_loss(lambda **_: SequenceClassifierOutput(logits=logits), dict(no_margin))
    assert loss.item() == pytest.approx(0.813262, abs=1e-5)
    # Aspect heads: column 1 predicts chosen [0.5, 9.0 (unrated)], rejected [0.0, 0.5] against targets
    # [1.0, nan], [-0.5, 0.0]: squared errors 0.25, 0.25, 0.25 (nan masked) -> MSE 0.25; weight 0.5 -> +0.125
    trainer.aspect_loss_weight = 0.5
    logits2 = torch.tensor([[2.0, 0.5], [0.5, 9.0], [1.0, 0.0], [1.5, 0.5]])
    targets = torch.tensor([[1.0], [math.nan], [-0.5], [0.0]])
    loss = trainer.compute_loss(lambda **_: SequenceClassifierOutput(logits=logits2),
                                {**no_margin, "aspect_targets": targets})
    assert loss.item() == pytest.approx(0.813262 + 0.125, abs=1e-5)


def test_malformed_pairs(tiny_model, tmp_path):
    good = [{"prompt": f"q{i}", "chosen": "Good.", "rejected": "Bad."} for i in range(6)]
    bad = good + [{"prompt": "same", "chosen": "Yes.", "rejected": "Yes."},
                  {"prompt": "empty", "chosen": "Yes.", "rejected": "  "}]
    f = write_jsonl(tmp_path / "bad.jsonl", bad)
    data = prepare_data(RewardTrainConfig(model=str(tiny_model), data=str(f), output_dir=str(tmp_path / "x")))
    assert data["dropped"]["data"]["identical_replies"] == 1 and data["dropped"]["data"]["empty_reply"] == 1
    assert len(data["train"]) + len(data["eval"]) == 6
    with pytest.raises(DataError, match=r"bad.jsonl:7: field 'rejected' identical replies"):
        prepare_data(RewardTrainConfig(model=str(tiny_model), data=str(f), on_bad_pair="error"))
    missing = write_jsonl(tmp_path / "missing.jsonl", good + [{"prompt": "p", "chosen": "Good."}])
    out = tmp_path / "run_missing"
    assert cli_main(["reward", "train", f"model={tiny_model}", f"data={missing}", f"output_dir={out}"]) == 2
    assert not out.exists()  # bad input is caught before anything is written
    with pytest.raises(DataError, match=r"missing.jsonl:7: field 'rejected' missing"):
        prepare_data(RewardTrainConfig(model=str(tiny_model), data=str(missing)))
    # Every pair longer than max_length: the run fails inside the stage; the manifest says failed.
    ok = write_jsonl(tmp_path / "ok.jsonl", good)
    out = tmp_path / "run_long"
    assert cli_main(["reward", "train", f"model={tiny_model}", f"data={ok}", f"output_dir={out}", "max_length=2"]) == 2  # plain text: q0Good.<eos>
    m = read_manifest(out)
    assert m["status"] == "failed" and "max_length" in m["error"]
    assert not (out / "model").exists()


@pytest.mark.slow
def test_hh_rlhf_train_and_eval_end_to_end(tiny_model, real_data, tmp_path):
    lines = gzip.open(real_data / "hh_rlhf_harmless" / "test_200.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    subset = tmp_path / "hh200.jsonl"
    subset.write_text("\n".join(lines[:200]) + "\n")
    run, ev = tmp_path / "reward", tmp_path / "reward_eval"
    rc = cli_main(["reward", "train", "--config", "configs/reward.yaml", f"model={tiny_model}", f"data={subset}",
                   f"output_dir={run}", "max_length=256", "overlength=truncate", "eval_fraction=0.2", "batch_size=8",
                   "grad_accum=1", "learning_rate=1e-3", "epochs=1", "save_steps=1000", "eval_steps=1000"])
    assert rc == 0
    m = read_manifest(run)
    assert m["status"] == "completed"
    notes = m["notes"]
    assert notes["format"] == "hh-rlhf" and notes["margin"]["used"] is False  # HH has no margins: plain BT
    assert notes["overlength"]["policy"] == "truncate" and notes["overlength"]["train"] > 0
    assert notes["pairs_used"]["train"] == notes["split_sizes"]["train"]  # truncated, not dropped
    assert notes["leakage"]["exact_duplicates"] == 0  # split by prompt
    rc = cli_main(["reward", "eval", "--config", "configs/reward_eval.yaml", f"model={run}", f"output_dir={ev}",
                   "max_length=256"])
    assert rc == 0
    result = json.loads((ev / "eval.json").read_text())
    assert result["n_pairs"] == notes["split_sizes"]["eval"] > 0
    lo, hi = result["accuracy_ci95"]
    assert 0 <= lo <= result["accuracy"] <= hi <= 1
    assert (lo, hi) == pytest.approx(wilson_interval(result["accuracy"] * result["n_pairs"], result["n_pairs"]))
    assert 0 <= result["calibration"]["ece"] <= 1 and result["calibration"]["bins"]
    assert result["length"]["level"] in ("ok", "note", "warning") and result["length"]["message"]
    assert set(result["rewards"]) == {"chosen", "rejected", "all"} and result["by_margin"] == []
    html = (ev / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<script" not in html
    assert "src='http" not in html and "<link" not in html  # self-contained
    assert read_manifest(ev)["status"] == "completed"
    check_report_in_chromium(ev / "report.html", tmp_path / "reward_report.png")
    # the long-pair policy "drop" would have dropped the same pairs that were truncated
    data = prepare_data(RewardTrainConfig(model=str(tiny_model), data=str(subset), eval_fraction=0.2))
    from alignkit.reward.train import tokenize_pairs

    from alignkit.models import load_tokenizer

    cfg = RewardTrainConfig(model=str(tiny_model), data=str(subset), max_length=256)
    rows, overlong = tokenize_pairs(data["train"], load_tokenizer(str(tiny_model)), cfg, False, [])
    assert overlong == notes["overlength"]["train"] and len(rows) == len(data["train"]) - overlong


@pytest.mark.slow
def test_aspect_heads(tiny_model, tmp_path):
    train_file = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(96, seed=3, aspects=True))
    eval_file = write_jsonl(tmp_path / "b.jsonl", synthetic_pairs(24, seed=4, aspects=True))
    run = tmp_path / "run"
    m = train(RewardTrainConfig(model=str(tiny_model), data=str(train_file), eval_data=str(eval_file), aspects=True,
                                output_dir=str(run), max_length=128, epochs=2, learning_rate=2e-3, batch_size=16,
                                eval_steps=1000, save_steps=1000, logging_steps=1000))
    assert m["notes"]["aspects"] == ["polite", "short"]
    scorer = RewardScorer(run)
    assert scorer.aspects == ["polite", "short"] and scorer.model.config.num_labels == 3
    ev = evaluate(RewardEvalConfig(model=str(run), data=str(eval_file), output_dir=str(tmp_path / "ev")))
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["status"] == "completed"
    assert result["aspects"]["polite"]["n"] == 24 and result["aspects"]["polite"]["accuracy"] >= 0.9
    assert result["aspects"]["short"]["n"] == 0  # equal ratings: no order to get right


def test_trainable_layers_freezes_the_lower_blocks_and_still_learns(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train_file = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(96, seed=5))
    eval_file = write_jsonl(tmp_path / "b.jsonl", synthetic_pairs(24, seed=6))
    run = tmp_path / "run"
    m = train(RewardTrainConfig(model=str(tiny_model), data=str(train_file), eval_data=str(eval_file),
                                trainable_layers=1, output_dir=str(run), max_length=128, epochs=3, learning_rate=2e-3,
                                batch_size=16, eval_steps=1000, save_steps=1000, logging_steps=1000))
    params = m["notes"]["parameters"]
    assert params["trainable_layers"] == 1 and params["trainable_parameters"] < params["total_parameters"] / 2
    assert m["metrics"]["eval_accuracy_after"] >= 0.9
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    after = AutoModelForSequenceClassification.from_pretrained(run / "model")
    layers = after.config.num_hidden_layers
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    top = f"layers.{layers - 1}."
    for name, value in new.items():
        if "score" in name or name not in old:
            continue
        if "embed" in name or any(f"layers.{i}." in name for i in range(layers - 1)):
            assert torch.equal(old[name], value), f"{name} changed although frozen"
    assert any(not torch.equal(old[n], v) for n, v in new.items() if top in n), "the top block did not train"
    with pytest.raises(ConfigError, match="trainable_layers and lora"):
        RewardTrainConfig(trainable_layers=2, lora=LoraOptions(enabled=True))
    with pytest.raises(ValueError, match="trainable_layers: expected 1.."):
        train(RewardTrainConfig(model=str(tiny_model), data=str(train_file), trainable_layers=99,
                                output_dir=str(tmp_path / "bad")))


def test_backbone_layers_keeps_the_lowest_blocks_and_the_smaller_model_learns(tiny_model, tmp_path):
    """backbone_layers=1 of the tiny model's 2 blocks: the saved reward model has one block, whose
    frozen weights are the backbone's lowest block (not its top one), and it still learns the rule."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    train_file = write_jsonl(tmp_path / "a.jsonl", synthetic_pairs(96, seed=5))
    eval_file = write_jsonl(tmp_path / "b.jsonl", synthetic_pairs(24, seed=6))
    run = tmp_path / "run"
    m = train(RewardTrainConfig(model=str(tiny_model), data=str(train_file), eval_data=str(eval_file),
                                backbone_layers=1, output_dir=str(run), max_length=128, epochs=3, learning_rate=2e-3,
                                batch_size=16, eval_steps=1000, save_steps=1000, logging_steps=1000))
    assert m["notes"]["parameters"]["total_layers"] == 1
    assert m["metrics"]["eval_accuracy_after"] >= 0.9
    full = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert full.config.num_hidden_layers == 2
    small = AutoModelForSequenceClassification.from_pretrained(run / "model")
    assert small.config.num_hidden_layers == 1 and len(small.model.layers) == 1
    kept = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, num_hidden_layers=1).model.layers[0].mlp.up_proj.weight
    assert torch.equal(kept, full.model.layers[0].mlp.up_proj.weight)  # what loading keeps is the lowest block
    assert gaps(run / "model", synthetic_pairs(8, seed=7))[0] > 0  # the scoring API reads the smaller model
    with pytest.raises(ConfigError, match="must not exceed backbone_layers"):
        RewardTrainConfig(backbone_layers=2, trainable_layers=3)
    with pytest.raises(ConfigError, match="backbone_layers: 5, but"):
        train(RewardTrainConfig(model=str(tiny_model), data=str(train_file), backbone_layers=5,
                                output_dir=str(tmp_path / "bad")))


def check_report_in_chromium(report, shot):
    """The report loads in a real browser, every plot renders, nothing is fetched from outside."""
    import os

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: `apt-get update && apt-get install -y chromium` (never `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.resolve().as_uri())
            page.wait_for_load_state("load")
            imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            assert len(imgs) >= 3
            for complete, width, alt in imgs:
                assert complete and width > 0, f"image did not load: {alt}"
            assert "pairwise accuracy" in page.inner_text("#summary")
            assert "length" in page.inner_text("#length-verdict")
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_report_escapes_text():
    import numpy as np
    from alignkit.reward.evaluate import accuracy_summary, calibration, length_analysis, render_report

    r_c, r_r = np.array([1.0, -0.5, 2.0]), np.array([0.0, 0.5, 1.0])
    gap = r_c - r_r
    result = {"model": "<m>", "data": "d&d", "data_format": "preference", "n_pairs": 3, "ties": 0,
              **{k: v for k, v in accuracy_summary(gap).items() if k != "n"}, "by_margin": [],
              "calibration": calibration(gap), "rewards": {k: {} for k in ("chosen", "rejected", "all")},
              "length": length_analysis(r_c, r_r, np.array([5, 9, 4]), np.array([3, 3, 8]))}
    result["accuracy_ci95"] = result.pop("ci95")
    evil = "<script>alert(1)</script>"
    page = render_report(result, r_c, r_r, np.array([5, 9, 4]), np.array([3, 3, 8]),
                         [{"prompt": evil, "chosen": "a & b", "rejected": "<b>x</b>", "r_chosen": -0.5, "r_rejected": 0.5}])
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<code>&lt;m&gt;</code>" in page


def test_report_draws_a_perfect_margin_bucket_and_json_has_no_nan_interval():
    import numpy as np
    from alignkit.reward.evaluate import accuracy_summary, calibration, length_analysis, margin_buckets, render_report

    assert accuracy_summary(np.array([]))["ci95"] == [None, None]  # no pairs: no interval (null in eval.json)
    r_c, r_r = np.linspace(1.0, 2.0, 10), np.zeros(10)
    gap = r_c - r_r
    buckets = margin_buckets(np.full(10, 4.0), gap)
    assert buckets[0]["accuracy"] == 1.0 and buckets[0]["ci95"][1] < 1.0  # 1 - 1e-16: its error bar must not go negative
    result = {"model": "m", "data": "d", "data_format": "preference", "n_pairs": 10, "ties": 0,
              **{k: v for k, v in accuracy_summary(gap).items() if k != "n"}, "by_margin": buckets,
              "calibration": calibration(gap), "rewards": {k: {} for k in ("chosen", "rejected", "all")},
              "length": length_analysis(r_c, r_r, np.arange(10), np.arange(10) + 1)}
    result["accuracy_ci95"] = result.pop("ci95")
    page = render_report(result, r_c, r_r, np.arange(10), np.arange(10) + 1, [])
    assert "alt='accuracy by margin'" in page


def test_eval_batches_are_all_the_same_size():
    # TRL averages per-batch accuracies: 10 pairs as 8 + 2 with 4/8 and 2/2 right would read 0.75, not 0.6
    from alignkit.training import even_eval_batch_size

    assert even_eval_batch_size(10, 8) == 5
    assert even_eval_batch_size(16, 8) == 8
    assert even_eval_batch_size(13, 8) == 1  # a prime count: one pair per batch, slow but exact
    assert even_eval_batch_size(3, 8) == 3
    assert even_eval_batch_size(0, 8) == 8


IMPLICIT_AND_EXPLICIT = {  # TRL's preference layouts, eight records each
    "standard-explicit": lambda i: {"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No.",
                                    "rejected": "No." if i % 2 == 0 else "Yes."},
    "standard-implicit": lambda i: {"chosen": f"Is {i} even? {'Yes.' if i % 2 == 0 else 'No.'}",
                                    "rejected": f"Is {i} even? {'No.' if i % 2 == 0 else 'Yes.'}"},
    "conversational-implicit": lambda i: {
        "chosen": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "Yes." if i % 2 == 0 else "No."}],
        "rejected": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "No." if i % 2 == 0 else "Yes."}]},
}


@pytest.mark.parametrize("layout", list(IMPLICIT_AND_EXPLICIT))
@pytest.mark.parametrize("stage", ["reward train", "align dpo"])
def test_each_trl_preference_layout_trains(layout, stage, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [IMPLICIT_AND_EXPLICIT[layout](i) for i in range(8)])
    out = tmp_path / "run"
    rc = cli_main([*stage.split(), f"model={tiny_model}", f"data={data}", f"output_dir={out}", "max_length=64",
                   "batch_size=2", "grad_accum=1", "max_steps=1", "eval_fraction=0.25", "save_steps=1000",
                   "eval_steps=1000"])
    assert rc == 0 and read_manifest(out)["status"] == "completed"
    assert read_manifest(out)["notes"]["split_sizes"]["train"] == 6  # 8 prompts, a quarter held out
