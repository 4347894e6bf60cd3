"""``alignkit eval`` end to end on tiny real models: every prompt-file shape, a reward model and a
rule reward, the oracle, KL, no-op re-runs, clear errors, and the report in headless Chromium."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.runstore import read_manifest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DEMO = Path(__file__).resolve().parent.parent / "alignkit" / "demo" / "instructions.jsonl"
FAST = ["max_prompts=8", "max_new_tokens=12", "batch_size=4", "report_samples=4", "cpu_threads=1"]

RULE = '''
def word_count_reward(prompts, responses):
    """Longer replies score higher (a deliberately length-biased rule)."""
    assert all(isinstance(p, str) for p in prompts)
    return [float(len(r.split())) for r in responses]
'''


SLICES = ("demo_phrasing", "heldout_phrasing")


@pytest.fixture(scope="module")
def assets(tiny_model, tmp_path_factory):
    """A second tiny policy, a reward model built on the tiny model (random head: a real
    sequence-classification directory for RewardScorer), a rule reward file and a held-out
    prompt file in the SFT run's format."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.models import build_tiny_model

    root = tmp_path_factory.mktemp("eval_assets")
    second = build_tiny_model(root / "second", seed=1)
    rm_dir = root / "reward" / "model"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    rule = root / "rules.py"
    rule.write_text(RULE)
    sft_run = root / "sft_run"
    sft_run.mkdir()
    demo = [json.loads(line) for line in DEMO.read_text().splitlines()[:10]]
    with open(sft_run / "heldout_prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"id": f"heldout-{i}", "prompt": [{"role": "user", "content": d["instruction"]}],
                                "reference": d["output"], "slice": SLICES[i % 2]}) + "\n" for i, d in enumerate(demo))
    return {"first": tiny_model, "second": second, "reward": root / "reward", "rule": f"{rule}:word_count_reward",
            "heldout": sft_run}


def run_eval(out: Path, assets, prompts, *extra: str) -> int:
    return main(["eval", f"models={{sft: {assets['first']}, dpo: {assets['second']}}}", "baseline=sft",
                 f"prompts={prompts}", f"output_dir={out}", *FAST, *extra])


SHAPES = {
    "mt_bench": lambda d, a: d / "mt_bench" / "question.jsonl",
    "self_instruct": lambda d, a: d / "self_instruct" / "user_oriented_instructions_60.jsonl",
    "oasst_strings": lambda d, a: d / "oasst_prompts" / "prompt_lottery_en_60_text.jsonl",
    "heldout": lambda d, a: a["heldout"],  # an SFT run dir stands for its heldout_prompts.jsonl
}


@pytest.fixture(scope="module")
def evals(assets, real_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    out = {}
    for shape, source in SHAPES.items():
        extra = [f"reward_function={assets['rule']}"]
        if shape in ("mt_bench", "heldout"):
            extra.append(f"reward_model={assets['reward']}")
        assert run_eval(root / shape, assets, source(real_data, assets), *extra) == 0, shape
        out[shape] = root / shape
    return out


def load(d: Path) -> tuple[dict, list[dict]]:
    result = json.loads((d / "eval.json").read_text())
    rows = [json.loads(line) for line in (d / "generations.jsonl").read_text().splitlines()]
    return result, rows


@pytest.mark.parametrize("shape", list(SHAPES))
def test_eval_json_fields_for_each_prompt_shape(evals, shape):
    result, rows = load(evals[shape])
    assert result["n_prompts"] == 8 and len(rows) == 8
    assert result["baseline"] == "sft" and result["kl_reference"] == "sft"
    sources = ["reward_model", "rule"] if shape in ("mt_bench", "heldout") else ["rule"]
    assert list(result["reward_sources"]) == sources
    assert result["primary_reward"] == sources[0]
    base, dpo = result["models"]["sft"], result["models"]["dpo"]
    assert "win_rate" not in base  # the baseline is not compared with itself
    for m in (base, dpo):
        for src in sources:
            r = m["reward"][src]
            assert r["n"] == 8 and (r["ci"][0] is None or r["ci"][0] <= r["mean"] <= r["ci"][1])
        assert 0 <= m["diversity"]["distinct_1"] <= 1 and 0 <= m["diversity"]["distinct_2"] <= 1
        assert 0 < m["length"]["tokens"]["mean"] <= 12
        assert m["length"]["words"]["n"] == 8
    assert base["kl"]["mean"] == 0.0
    assert dpo["kl"]["mean"] is not None and dpo["kl"]["estimator"].startswith("sampled")
    for src in sources:
        w, lc = dpo["win_rate"][src], dpo["lc_win_rate"][src]
        assert w["wins"] + w["ties"] + w["losses"] == 8
        assert w["win_rate"] == pytest.approx((w["wins"] + w["ties"] / 2) / 8)
        assert w["ci"][0] <= w["win_rate"] <= w["ci"][1]
        assert 0 <= lc["win_rate"] <= 1 and "slope" in lc and "intercept" in lc
    # the length-biased rule reward: its LC slope is exactly one point per word, and after
    # removing it every adjusted difference is 0: all ties, an LC win rate of exactly 0.5
    assert dpo["lc_win_rate"]["rule"]["win_rate"] == 0.5
    if dpo["lc_win_rate"]["rule"]["slope_estimated"]:
        assert dpo["lc_win_rate"]["rule"]["slope"] == pytest.approx(1.0)
    # the per-reply file agrees with the summary
    for name in ("sft", "dpo"):
        rule_scores = [r["responses"][name]["rewards"]["rule"] for r in rows]
        assert sum(rule_scores) / 8 == pytest.approx(result["models"][name]["reward"]["rule"]["mean"])
        assert all(r["responses"][name]["rewards"]["rule"] == r["responses"][name]["n_words"] for r in rows)
    m = read_manifest(evals[shape])
    assert m["status"] == "completed" and m["stage"] == "eval"
    assert set(m["outputs"]) == {"eval", "generations", "report"}
    assert m["metrics"]["dpo/lc_win_rate"] == dpo["lc_win_rate"][sources[0]]["win_rate"]
    assert m["inputs"]["model:dpo"]["hash"].startswith("sha256:")


def test_figures_per_slice_and_constraint_type_agree_with_the_replies(evals):
    result, rows = load(evals["heldout"])
    assert {label: part["n_prompts"] for label, part in result["slices"].items()} == {SLICES[0]: 4, SLICES[1]: 4}
    groups = {("slices", label): [r for i, r in enumerate(rows) if SLICES[i % 2] == label] for label in SLICES}
    for r in rows:
        groups.setdefault(("by_constraint_type", r["constraint"]["type"]), []).append(r)
    assert sum(part["n_prompts"] for part in result["by_constraint_type"].values()) == 8
    for (key, label), members in groups.items():
        models = result[key][label]["models"]
        assert result[key][label]["n_prompts"] == len(members)
        for name in ("sft", "dpo"):
            replies = [r["responses"][name] for r in members]
            assert models[name]["reward"]["reward_model"]["mean"] == pytest.approx(
                sum(x["rewards"]["reward_model"] for x in replies) / len(members))
            assert models[name]["oracle"]["score"]["mean"] == pytest.approx(
                sum(x["oracle_score"] for x in replies) / len(members))
        gain = [(r["responses"]["dpo"]["oracle_score"] >= 1.0) - (r["responses"]["sft"]["oracle_score"] >= 1.0)
                for r in members]
        assert models["dpo"]["oracle"]["pass_gain"]["mean"] == pytest.approx(sum(gain) / len(members))
    for other in ("mt_bench", "self_instruct"):  # no slice field: no slices
        assert "slices" not in load(evals[other])[0]
    page = (evals["heldout"] / "report.html").read_text()
    assert "<table id=slices>" in page and "<table id=by_constraint_type>" in page
    assert page.count("<th>heldout_phrasing</th>") == 2  # one row per model
    assert "<table id=slices>" not in (evals["mt_bench"] / "report.html").read_text()


def test_prompt_shapes_are_read_as_expected(evals):
    # MT-Bench: the first turn only
    _, rows = load(evals["mt_bench"])
    assert rows[0]["id"] == "81" and rows[0]["prompt"][0]["content"].startswith("Compose an engaging travel blog")
    assert len(rows[0]["prompt"]) == 1
    _, rows = load(evals["oasst_strings"])
    assert rows[0]["prompt"][0]["content"].startswith("What is the next letter in the series")
    _, rows = load(evals["self_instruct"])
    assert rows[0]["id"] == "user_oriented_task_0"
    # held-out prompts keep their reference answers, and the demo's constraints feed the oracle
    result, rows = load(evals["heldout"])
    assert rows[0]["id"] == "heldout-0" and rows[0]["reference"]
    assert result["oracle_prompts"] == 8 and all("constraint" in r for r in rows)
    for name in ("sft", "dpo"):
        o = result["models"][name]["oracle"]
        assert o["n"] == 8 and 0 <= o["score"]["mean"] <= 1 and 0 <= o["pass"]["rate"] <= 1
    assert "win_rate" in result["models"]["dpo"]["oracle"]
    # prompts without checkable constraints: no oracle section
    result, _ = load(evals["mt_bench"])
    assert result["oracle_prompts"] == 0 and "oracle" not in result["models"]["sft"]


def test_report_renders_in_chromium(evals):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's browser with "
                    f"`apt-get update && apt-get install -y chromium` (never `playwright install`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for shape, d in evals.items():
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                requests = []
                page.on("request", lambda r, seen=requests: seen.append(r.url))
                page.goto((d / "report.html").resolve().as_uri())
                page.wait_for_load_state("load")
                imgs = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
                # reward distribution(s), win rates, reward vs length (+ oracle pass rates)
                expected = (2 if shape in ("mt_bench", "heldout") else 1) + 2 + (1 if shape == "heldout" else 0)
                assert len(imgs) == expected, (shape, imgs)
                for complete, width, alt in imgs:
                    assert complete and width > 0, f"{shape}: image did not load: {alt}"
                assert page.eval_on_selector_all("#summary tbody tr", "els => els.length") == 2
                header = page.inner_text("#summary thead")
                assert "LC win rate" in header and "KL to sft" in header
                assert page.eval_on_selector_all("#samples tbody tr", "els => els.length") == 4
                assert "Length-controlled" in page.content()
                # self-contained: nothing but the page itself (and inline data: images) was fetched
                assert all(u.startswith(("file:", "data:")) for u in requests), requests
                page.close()
        finally:
            browser.close()


def test_report_escapes_text(tmp_path):
    from alignkit.evals.report import render

    result = {"n_prompts": 1, "prompts": "<p>", "baseline": "a", "kl_reference": "a", "reward_sources": {},
              "primary_reward": None, "oracle_prompts": 0, "confidence": 0.95,
              "generation": {"do_sample": False, "max_new_tokens": 4, "seed": 0},
              "models": {"a": {"reward": {}, "kl": {"mean": 0.0, "ci": [None, None]},
                               "length": {"tokens": {"mean": 1.0, "ci": [None, None]}, "words": {"mean": 1.0, "ci": [None, None]},
                                          "finished_fraction": 1.0},
                               "diversity": {"distinct_1": 1.0, "distinct_2": 0.0}}}}
    rows = [{"id": "0", "prompt": [{"role": "user", "content": "<script>alert(1)</script>"}],
             "responses": {"a": {"text": "</pre><b>x</b>", "n_tokens": 1, "finished": True, "rewards": {}}}}]
    page = render(result, rows)
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "&lt;/pre&gt;&lt;b&gt;" in page


def test_same_model_twice_gets_identical_replies_and_rerun_is_a_noop(assets, real_data, tmp_path):
    """Fixed seeds per model: the same model under two names writes the same replies, so it
    ties with itself (win rate 0.5) and its KL to itself is exactly 0."""
    prompts = real_data / "mt_bench" / "question.jsonl"
    args = ["eval", f"models={{sft: {assets['first']}, copy: {assets['first']}}}", "baseline=sft",
            f"prompts={prompts}", f"output_dir={tmp_path / 'e'}", f"reward_function={assets['rule']}", *FAST]
    assert main(args) == 0
    result, rows = load(tmp_path / "e")
    assert all(r["responses"]["sft"]["text"] == r["responses"]["copy"]["text"] for r in rows)
    copy = result["models"]["copy"]
    assert copy["win_rate"]["rule"]["ties"] == 8 and copy["win_rate"]["rule"]["win_rate"] == 0.5
    # the copy's own log-probs come from its generation logits, the reference's from teacher
    # forcing: equal up to float rounding
    assert copy["kl"]["mean"] == pytest.approx(0.0, abs=1e-4)
    before = (tmp_path / "e" / "manifest.json").read_text()
    assert main(args) == 0  # completed with the same config and inputs: skipped
    assert (tmp_path / "e" / "manifest.json").read_text() == before
    assert main(args + ["max_new_tokens=6"]) == 0  # another setting: runs again
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["generation"]["max_new_tokens"] == 6
    assert main(args) == 0
    cached = tmp_path / "e" / "cache" / "copy.json"
    stamp = cached.stat().st_mtime_ns
    assert main(args[:1] + ["--force"] + args[1:]) == 0  # --force generates again
    assert cached.stat().st_mtime_ns != stamp and read_manifest(tmp_path / "e")["status"] == "completed"
    _, rows_again = load(tmp_path / "e")
    assert rows_again == rows  # same seeds, same replies


def test_several_replies_per_prompt(assets, tmp_path, capsys):
    """samples_per_prompt=2: two rows per prompt in generations.jsonl, and every summary number is
    over prompts (the per-prompt mean of the two replies), checked against the rows."""
    out = tmp_path / "k2"
    assert run_eval(out, assets, assets["heldout"], "max_prompts=4", "samples_per_prompt=2",
                    f"reward_model={assets['reward']}", f"reward_function={assets['rule']}") == 0
    result, rows = load(out)
    assert result["n_prompts"] == 4 and result["samples_per_prompt"] == 2
    assert [(r["id"], r["sample"]) for r in rows] == [(f"heldout-{i}", j) for i in range(4) for j in range(2)]
    for name in ("sft", "dpo"):
        per_prompt = [sum(r["responses"][name]["rewards"]["rule"] for r in rows[2 * i:2 * i + 2]) / 2 for i in range(4)]
        reward = result["models"][name]["reward"]["rule"]
        assert reward["n"] == 4 and reward["mean"] == pytest.approx(sum(per_prompt) / 4)
    assert rows[0]["responses"]["dpo"]["text"] != rows[1]["responses"]["dpo"]["text"]  # two draws, not one twice
    w = result["models"]["dpo"]["win_rate"]["reward_model"]
    assert w["wins"] + w["ties"] + w["losses"] == 4
    page = (out / "report.html").read_text()
    samples = page[page.index("<h2>Sample generations</h2>"):page.index("<h2>What the numbers mean</h2>")]
    assert "2 replies per prompt" in page and samples.count("<tr>") - 1 == len(rows) // 2  # one sample per prompt shown
    capsys.readouterr()
    code = main(["eval", f"models={{sft: {assets['first']}}}", f"prompts={assets['heldout']}",
                 f"output_dir={tmp_path / 'greedy'}", "samples_per_prompt=2", "do_sample=false"])
    assert code == 2 and "samples_per_prompt > 1 needs do_sample: true" in capsys.readouterr().err


def test_greedy_left_padded_batches_match_one_prompt_at_a_time(assets, real_data):
    from alignkit.data import load_prompts
    from alignkit.generation import generate, load_policy, sequence_logprobs

    model, tok = load_policy(str(assets["second"]))
    with torch.no_grad():  # sharpen the random model so its greedy replies depend on the prompt
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3)
    prompts = [p["prompt"] for p in load_prompts(real_data / "mt_bench" / "question.jsonl")[:8]]
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    single = generate(model, tok, prompts, max_new_tokens=12, batch_size=1)
    assert len({tuple(r) for r in batched.response_ids}) > 2  # not one degenerate reply for all
    assert batched.response_ids == single.response_ids and batched.texts == single.texts
    assert batched.batches == 2 and single.batches == 8
    # k sampled replies per prompt, prompt-major, reproducible with the same seed
    a = generate(model, tok, prompts[:3], max_new_tokens=6, do_sample=True, num_return_sequences=2, seed=5)
    b = generate(model, tok, prompts[:3], max_new_tokens=6, do_sample=True, num_return_sequences=2, seed=5)
    assert len(a.texts) == 6 and a.response_ids == b.response_ids
    assert a.prompt_ids[0] == a.prompt_ids[1] != a.prompt_ids[2]
    assert all(n == len(r) - (1 if f else 0) for n, r, f in zip(a.n_tokens, a.response_ids, a.finished))
    # log-probs from the generation logits: the same replies, and what teacher forcing gives
    c = generate(model, tok, prompts[:3], max_new_tokens=6, do_sample=True, num_return_sequences=2, seed=5,
                 temperature=0.7, return_logprobs=True)
    assert a.logprobs is None and c.response_ids != a.response_ids
    forced = sequence_logprobs(model, c.prompt_ids, c.response_ids, tok.pad_token_id)
    assert c.logprobs == pytest.approx(forced, abs=1e-3) and all(lp < 0 for lp in forced)


def test_prompts_read_once_give_the_replies_of_plain_generate(assets, real_data):
    """k sampled replies per prompt from one pass over each left-padded prompt and a repeated
    cache: the same replies and logits as transformers' own expansion (k passes), same seed."""
    from transformers import GenerationConfig

    from alignkit.data import load_prompts
    from alignkit.generation import (
        left_pad,
        encode_prompt,
        generate_sharing_prompts,
        load_policy,
    )

    model, tok = load_policy(str(assets["second"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3)
    prompts = [p["prompt"] for p in load_prompts(real_data / "mt_bench" / "question.jsonl")[:4]]
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    assert len(set(mask.sum(1).tolist())) > 1  # prompts of different lengths: real left padding
    config = GenerationConfig(max_new_tokens=8, do_sample=True, num_return_sequences=3, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(3)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    torch.manual_seed(3)
    shared = generate_sharing_prompts(model, ids, mask, config)
    assert shared.sequences.shape == plain.sequences.shape == (12, ids.shape[1] + 8)
    assert torch.equal(shared.sequences, plain.sequences)
    assert len({tuple(r) for r in plain.sequences[:, ids.shape[1]:].tolist()}) > 4  # not one reply copied
    for a, b in zip(shared.logits, plain.logits):
        assert torch.allclose(a, b, atol=1e-4)
    assert config.num_return_sequences == 3  # the caller's config is left as it was


def test_sequence_logprobs_sharing_prompts_equal_one_sequence_at_a_time(assets, real_data):
    """Teacher forcing with each prompt read once (consecutive replies of one prompt share its
    cache) against the definition: one unpadded sequence at a time, log-softmax summed over the reply."""
    from alignkit.data import load_prompts
    from alignkit.generation import encode_prompt, load_policy, sequence_logprobs

    model, tok = load_policy(str(assets["second"]))
    prompts = [encode_prompt(tok, p["prompt"]) for p in load_prompts(real_data / "mt_bench" / "question.jsonl")[:3]]
    assert len({len(p) for p in prompts}) == 3
    g = torch.Generator().manual_seed(0)
    replies = [torch.randint(5, 100, (n,), generator=g).tolist() for n in (5, 1, 7, 3, 0, 6, 2, 4)]
    # prompt 0 three times, prompt 1 twice (one empty reply), prompt 2, then prompt 0 again (not consecutive)
    prompt_ids = [prompts[0]] * 3 + [prompts[1]] * 2 + [prompts[2]] + [prompts[0]] + [prompts[1]]
    expected = []
    with torch.no_grad():
        for prompt, reply in zip(prompt_ids, replies):
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1]
            expected.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply).unsqueeze(-1)).sum()))
    for batch_size in (1, 3, 16):
        got = sequence_logprobs(model, prompt_ids, replies, tok.pad_token_id, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-4), batch_size
    assert got[4] == 0.0 and all(v < 0 for i, v in enumerate(got) if i != 4)


def test_missing_model_dir_is_a_clear_error(assets, real_data, tmp_path, capsys):
    prompts = real_data / "mt_bench" / "question.jsonl"
    code = main(["eval", f"models={{sft: {assets['first']}, dpo: {tmp_path / 'runs' / 'dpo' / 'model'}}}",
                 f"prompts={prompts}", f"output_dir={tmp_path / 'e'}", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "model 'dpo'" in err and "not found" in err
    assert not (tmp_path / "e").exists()  # nothing half-written
    code = main(["eval", f"models={{sft: {assets['first']}}}", "baseline=ppo", f"prompts={prompts}",
                 f"output_dir={tmp_path / 'e'}"])
    assert code == 2 and "baseline 'ppo' is not one of the models" in capsys.readouterr().err
