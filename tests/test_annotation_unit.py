"""Unit tests of the annotation loop's pieces that need no server: records, simulated decisions,
consensus and export, pull bookkeeping, configs, and candidate generation with a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from alignkit.annotation.cli import load_verb_config
from alignkit.annotation.datasets import (EMPTY_PLACEHOLDER, DatasetConfig, build_record, load_candidates, permutation,
                                          question_names, record_id, slot)
from alignkit.annotation.export import ExportConfig, export
from alignkit.annotation.gate import GateError
from alignkit.annotation.pull import latest, read_table, response_value
from alignkit.annotation.simulate import Annotator, decide, oracle_judge
from alignkit.config import ConfigError
from alignkit.preferences import load_preferences
from alignkit.runstore import stage_run

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Explain what a rainbow is. Answer in at most 5 words."}]


# ------------------------------------------------------------------ records


def test_record_ids_are_deterministic_and_content_derived():
    a = record_id("x", PROMPT, ["one", "two"])
    assert a == record_id("x", PROMPT, ["one", "two"])
    assert a != record_id("x", PROMPT, ["one", "three"])
    assert a != record_id("y", PROMPT, ["one", "two"])
    p = permutation(a, 4, seed=0)
    assert sorted(p) == [0, 1, 2, 3] and p == permutation(a, 4, seed=0)
    assert permutation(a, 4, 0, shuffle=False) == [0, 1, 2, 3]
    # over many records every order shows up (position bias is spread)
    firsts = {permutation(record_id(str(i), PROMPT, ["a", "b"]), 2, 0)[0] for i in range(20)}
    assert firsts == {0, 1}


def test_build_record_maps_slots_through_the_permutation():
    cfg = DatasetConfig(mode="ranking")
    cand = {"item_id": "i1", "prompt": PROMPT, "responses": ["r0", "r1", "", "r3"]}
    rec = build_record(cand, cfg)
    perm = rec["metadata"]["permutation"]
    for j, src in enumerate(perm):
        expected = cand["responses"][src] or EMPTY_PLACEHOLDER
        assert rec["fields"][slot(j)] == expected
    assert rec["metadata"]["item_id"] == "i1" and rec["external_id"].startswith("i1.")
    binary = build_record(cand, DatasetConfig(mode="binary"))
    assert set(binary["fields"]) == {"prompt", "response_1", "response_2"}  # binary compares the first two
    assert question_names(DatasetConfig(mode="multivariate", aspects=["quality", "harmfulness"]), 2) == [
        "quality_1", "harmfulness_1", "quality_2", "harmfulness_2"]


def test_load_candidates_rejects_bad_rows(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"item_id": "a", "prompt": "hi", "responses": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1: field 'responses'"):
        load_candidates(p)
    p.write_text("".join(json.dumps({"item_id": "a", "prompt": "hi", "responses": ["x", "y"]}) + "\n" for _ in range(2)))
    with pytest.raises(ValueError, match="duplicate item_id 'a'"):
        load_candidates(p)


# ------------------------------------------------------------------ simulated annotators


def test_decisions_follow_judge_and_biases():
    cfg = DatasetConfig(mode="binary")
    clean = Annotator("a")
    assert decide(clean, cfg, "", ["bad", "good"], [0.1, 0.9], random.Random(0)) == {"preference": "response_2"}
    # a strong position bias prefers whatever is shown first
    assert decide(Annotator("b", position_bias=1.0), cfg, "", ["bad", "good"], [0.1, 0.9], random.Random(0)) == {
        "preference": "response_1"}
    # length bias prefers the long answer
    long = " ".join(["word"] * 100)
    assert decide(Annotator("c", length_bias=1.0), cfg, "", ["ok", long], [0.6, 0.4], random.Random(0))["preference"] == "response_2"
    # flip_prob 1 always flips; the noise-free self (rng=None) never does
    flipper = Annotator("d", flip_prob=1.0)
    assert decide(flipper, cfg, "", ["bad", "good"], [0.1, 0.9], random.Random(0))["preference"] == "response_1"
    assert decide(flipper, cfg, "", ["bad", "good"], [0.1, 0.9], None)["preference"] == "response_2"
    # ranking: explicit ranks, best first
    r = decide(clean, DatasetConfig(mode="ranking"), "", ["a", "b", "c"], [0.5, 1.0, 0.0], random.Random(0))
    assert r == {"ranking": [{"value": "response_2", "rank": 1}, {"value": "response_1", "rank": 2},
                             {"value": "response_3", "rank": 3}]}
    # ranking: neighbours that look equally good share a rank (both constraint scores 0 here)
    tied = decide(Annotator("t", tie_threshold=0.1), DatasetConfig(mode="ranking"), "", ["a", "b", "c"],
                  [0.0, 1.0, 0.05], random.Random(0))
    assert tied == {"ranking": [{"value": "response_2", "rank": 1}, {"value": "response_3", "rank": 2},
                                {"value": "response_1", "rank": 2}]}
    # multivariate: 1..5 per aspect and response
    m = decide(clean, DatasetConfig(mode="multivariate", aspects=["quality", "realism"]), "", ["a", "b"],
               [1.0, {"quality": 0.0, "realism": 0.5}], random.Random(0))
    assert m == {"quality_1": 5, "realism_1": 5, "quality_2": 1, "realism_2": 3}
    noisy = decide(Annotator("e", rating_noise=2.0), DatasetConfig(mode="multivariate", aspects=["quality"]), "",
                   ["a", "b"], [0.5, 0.5], random.Random(1))
    assert all(1 <= v <= 5 for v in noisy.values())


def test_binary_tie_answers_tie_for_close_scores_only():
    cfg = DatasetConfig(mode="binary", binary_tie=True)
    careful = Annotator("t", tie_threshold=0.1)
    assert decide(careful, cfg, "", ["a", "b"], [0.50, 0.55], random.Random(0)) == {"preference": "tie"}
    assert decide(careful, cfg, "", ["a", "b"], [0.50, 0.70], random.Random(0)) == {"preference": "response_2"}
    # a position bias larger than the threshold turns a tie into a pick of the first response
    biased = Annotator("p", tie_threshold=0.1, position_bias=0.2)
    assert decide(biased, cfg, "", ["a", "b"], [0.5, 0.5], random.Random(0)) == {"preference": "response_1"}
    # flip noise on a tie picks one of the two at random; the noise-free self still says tie
    flipper = Annotator("f", tie_threshold=0.1, flip_prob=1.0)
    picks = {decide(flipper, cfg, "", ["a", "b"], [0.5, 0.5], random.Random(i))["preference"] for i in range(20)}
    assert picks == {"response_1", "response_2"}
    assert decide(flipper, cfg, "", ["a", "b"], [0.5, 0.5], None) == {"preference": "tie"}
    # without binary_tie the same annotator must pick
    assert decide(careful, DatasetConfig(mode="binary"), "", ["a", "b"], [0.5, 0.5], None) == {"preference": "response_1"}
    for bad in (dict(mode="ranking", binary_tie=True), dict(mode="binary", binary_question="ranking", binary_tie=True)):
        with pytest.raises(ValueError, match="binary_tie"):
            DatasetConfig(**bad).check()


def test_oracle_judge_reads_the_constraint_from_the_prompt():
    prompt = "Explain what a rainbow is. Use only lowercase letters, with no capitals at all."
    assert oracle_judge(prompt, "a rainbow is light bent by rain drops.") > oracle_judge(prompt, "A RAINBOW IS LIGHT.")
    assert oracle_judge("Say hello.", "hello") == 0.5  # no constraint: no opinion


# ------------------------------------------------------------------ pull bookkeeping


def test_pull_helpers(tmp_path):
    assert response_value([{"value": "response_2", "rank": 2}, {"value": "response_1", "rank": 1}]) == [
        "response_1", "response_2"]
    assert response_value("response_1") == "response_1" and response_value(4) == 4
    # equal ranks (Argilla accepts them) stay a tie, never a strict order
    assert response_value([{"value": "response_2", "rank": 1}, {"value": "response_1", "rank": 1}]) == [
        ["response_1", "response_2"]]
    assert response_value([{"value": "response_3", "rank": 2}, {"value": "response_1", "rank": 2},
                           {"value": "response_2", "rank": 1}]) == ["response_2", ["response_1", "response_3"]]
    t = tmp_path / "annotations.jsonl"
    row = {"item_id": "i", "annotator": "a", "question": "q", "value": 1, "status": "submitted",
           "updated_at": "2024-01-01T00:00:00", "record_id": "r"}
    t.write_text(json.dumps(row) + "\n" + json.dumps({**row, "value": 2, "updated_at": "2024-01-02T00:00:00"}) + "\n"
                 + '{"item_id": "i", "annot')  # a torn last line from an interrupted pull
    rows = read_table(t)
    assert len(rows) == 2 and t.read_text().endswith("\n")
    assert list(latest(rows).values())[0]["value"] == 2


# ------------------------------------------------------------------ export (consensus, gate, drops)


def _write_pull(tmp_path, mode, cands, answers, perms, k):
    """answers: {item_id: {annotator: {question: value}}} (values in display slots)."""
    run = tmp_path / mode
    (run / "candidates").mkdir(parents=True)
    (run / "pull").mkdir()
    with open(run / "candidates" / "candidates.jsonl", "w") as f:
        for c in cands:
            f.write(json.dumps(c) + "\n")
    records, rows = [], []
    for c in cands:
        rid = record_id(c["item_id"], c["prompt"], c["responses"][:k])
        records.append({"record_id": rid, "item_id": c["item_id"], "permutation": perms[c["item_id"]],
                        "content_hash": rid.rsplit(".", 1)[1], "status": "completed"})
        for ann, values in answers.get(c["item_id"], {}).items():
            for q, v in values.items():
                rows.append({"item_id": c["item_id"], "annotator": ann, "question": q, "value": v,
                             "status": "submitted", "updated_at": "2024-01-01T00:00:00", "record_id": rid})
    (run / "pull" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "pull" / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _cand(i, n=2):
    return {"item_id": f"i{i}", "prompt": [{"role": "user", "content": f"prompt {i}"}],
            "responses": [f"reply {i}.{j}" for j in range(n)]}


def test_export_binary_majority_ties_and_permutation(tmp_path):
    cands = [_cand(i) for i in range(4)]
    perms = {"i0": [0, 1], "i1": [1, 0], "i2": [0, 1], "i3": [1, 0]}
    A = lambda *vals: {f"u{j}": {"preference": v} for j, v in enumerate(vals)}
    answers = {
        "i0": A("response_1", "response_1", "response_2"),  # 2:1 for slot 1 = candidate 0
        "i1": A("response_1", "response_1", "response_1"),  # unanimous for slot 1 = candidate 1 (permuted)
        "i2": {"u0": {"preference": "response_1"}, "u1": {"preference": "response_2"}},  # tie 1:1
        "i3": A("response_2", "response_2", "response_2"),
    }
    run = _write_pull(tmp_path, "binary", cands, answers, perms, 2)
    cfg = ExportConfig(run_dir=str(run), mode="binary", min_kappa=None, min_annotations=2)
    m = export(cfg)
    pairs = [json.loads(x) for x in (run / "export" / "pairs.jsonl").read_text().splitlines()]
    by = {p["item_id"]: p for p in pairs}
    assert set(by) == {"i0", "i1", "i3"} and m["metrics"]["dropped"]["tie"] == 1
    assert by["i0"]["chosen"] == "reply 0.0" and by["i0"]["margin"] == pytest.approx(1 / 3)
    assert by["i0"]["agreement"] == pytest.approx(2 / 3)
    assert by["i1"]["chosen"] == "reply 1.1" and by["i1"]["margin"] == 1.0
    assert by["i3"]["chosen"] == "reply 3.0"
    prefs = load_preferences(run / "export" / "pairs.jsonl")
    assert len(prefs.pairs) == 3 and prefs.pairs[0]["margin"] is not None

    # a stricter per-item agreement drops the 2:1 item; tie_policy=random keeps the tie
    cfg2 = ExportConfig(run_dir=str(run), mode="binary", min_kappa=None, min_annotations=2, min_item_agreement=0.9,
                        tie_policy="random", output_dir=str(run / "export2"))
    m2 = export(cfg2)
    assert m2["metrics"]["dropped"]["low_item_agreement"] == 1 and m2["metrics"]["dropped"]["tie"] == 0
    pairs2 = {json.loads(x)["item_id"]: json.loads(x) for x in (run / "export2" / "pairs.jsonl").read_text().splitlines()}
    assert set(pairs2) == {"i1", "i2", "i3"} and pairs2["i2"]["margin"] == 0.0
    # min_annotations 3 drops the item with two answers
    m3 = export(ExportConfig(run_dir=str(run), mode="binary", min_kappa=None, output_dir=str(run / "export3")))
    assert m3["metrics"]["dropped"]["too_few_annotations"] == 1


def test_export_binary_tie_answers(tmp_path):
    cands = [_cand(i) for i in range(4)]
    perms = {"i0": [0, 1], "i1": [1, 0], "i2": [0, 1], "i3": [0, 1]}
    A = lambda *vals: {f"u{j}": {"preference": v} for j, v in enumerate(vals)}
    answers = {
        "i0": A("tie", "tie", "tie"),                   # everyone: neither is better -> dropped as a tie
        "i1": A("response_1", "tie", "tie"),            # one pick, two ties -> agreement 1/3 -> dropped
        "i2": A("response_2", "response_2", "tie"),     # two picks, one tie -> kept
        "i3": A("response_1", "response_1", "response_1"),
    }
    run = _write_pull(tmp_path, "binary", cands, answers, perms, 2)
    m = export(ExportConfig(run_dir=str(run), mode="binary", binary_tie=True, min_kappa=None))
    by = {json.loads(x)["item_id"]: json.loads(x) for x in (run / "export" / "pairs.jsonl").read_text().splitlines()}
    assert set(by) == {"i2", "i3"}
    assert m["metrics"]["dropped"]["tie"] == 1 and m["metrics"]["dropped"]["low_item_agreement"] == 1
    assert by["i2"]["chosen"] == "reply 2.1" and by["i2"]["agreement"] == pytest.approx(2 / 3)
    assert by["i2"]["margin"] == pytest.approx(2 / 3)  # (1 + 1 + 0.5) / 3 - (0 + 0 + 0.5) / 3
    assert by["i3"]["margin"] == 1.0
    # a dataset without binary_tie does not know the answer: the record counts as unanswered
    m2 = export(ExportConfig(run_dir=str(run), mode="binary", min_kappa=None, output_dir=str(run / "export2")))
    assert m2["metrics"]["dropped"]["too_few_annotations"] == 3


def test_export_gate_stops_with_no_pairs(tmp_path):
    rng = random.Random(0)
    cands = [_cand(i) for i in range(30)]
    perms = {c["item_id"]: [0, 1] for c in cands}
    answers = {c["item_id"]: {f"u{j}": {"preference": rng.choice(["response_1", "response_2"])} for j in range(3)}
               for c in cands}
    run = _write_pull(tmp_path, "binary", cands, answers, perms, 2)
    export(ExportConfig(run_dir=str(run), mode="binary", min_kappa=None))  # no gate: pairs written
    earlier = (run / "export" / "pairs.jsonl").read_text()
    with pytest.raises(GateError, match="Fleiss' kappa .* < 0.5"):
        export(ExportConfig(run_dir=str(run), mode="binary", min_kappa=0.5, bootstrap=50))
    # the earlier export's pairs are kept aside, under a name no stage reads by default
    assert not (run / "export" / "pairs.jsonl").exists()
    assert (run / "export" / "pairs.previous.jsonl").read_text() == earlier
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "GateError" in manifest["error"]
    assert (run / "export" / "agreement" / "agreement.json").exists()


def test_a_stage_refuses_an_input_from_a_run_that_did_not_complete(tmp_path, tiny_model, capsys):
    from alignkit.cli import main

    export_dir = tmp_path / "export"
    with pytest.raises(GateError):
        with stage_run("annotate-export", export_dir, {}, {}):
            (export_dir / "pairs.jsonl").write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
            raise GateError("agreement gate failed")
    rc = main(["reward", "train", f"model={tiny_model}", f"data={export_dir / 'pairs.jsonl'}",
               f"output_dir={tmp_path / 'reward'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "comes from the annotate-export run" in err and "'failed'" in err
    assert not (tmp_path / "reward" / "manifest.json").exists()


def test_export_ranking_all_pairs_and_multivariate_aspects(tmp_path):
    cands = [_cand(0, 3)]
    perm = [2, 0, 1]  # slot 1 shows candidate 2, slot 2 candidate 0, slot 3 candidate 1
    ranking = ["response_2", "response_3", "response_1"]  # candidate 0 > 1 > 2
    answers = {"i0": {f"u{j}": {"ranking": ranking} for j in range(3)}}
    run = _write_pull(tmp_path, "ranking", cands, answers, {"i0": perm}, 3)
    export(ExportConfig(run_dir=str(run), mode="ranking", min_kappa=None))
    pairs = [json.loads(x) for x in (run / "export" / "pairs.jsonl").read_text().splitlines()]
    got = {(p["chosen_index"], p["rejected_index"]): p["margin"] for p in pairs}
    assert got == {(0, 1): 0.5, (0, 2): 1.0, (1, 2): 0.5}

    # tied ranks: the tied pair is no preference (dropped as a tie), the others keep their order
    tied = ["response_2", ["response_3", "response_1"]]  # candidate 0 best; candidates 1 and 2 tie
    answers = {"i0": {f"u{j}": {"ranking": tied} for j in range(3)}}
    run = _write_pull(tmp_path / "tied", "ranking", cands, answers, {"i0": perm}, 3)
    m = export(ExportConfig(run_dir=str(run), mode="ranking", min_kappa=None))
    pairs = [json.loads(x) for x in (run / "export" / "pairs.jsonl").read_text().splitlines()]
    assert {(p["chosen_index"], p["rejected_index"]) for p in pairs} == {(0, 1), (0, 2)}
    assert m["metrics"]["dropped"]["tie"] == 1

    cands = [_cand(0, 2)]
    aspects = ["quality", "harmfulness"]
    ans = {"i0": {"u0": {"quality_1": 2, "harmfulness_1": 5, "quality_2": 5, "harmfulness_2": 4},
                  "u1": {"quality_1": 1, "harmfulness_1": 5, "quality_2": 4, "harmfulness_2": 4},
                  "u2": {"quality_1": 3, "harmfulness_1": 5, "quality_2": 5, "harmfulness_2": 5}}}
    run = _write_pull(tmp_path, "multivariate", cands, ans, {"i0": [1, 0]}, 2)
    export(ExportConfig(run_dir=str(run), mode="multivariate", aspects=aspects, min_kappa=None))
    (p,) = [json.loads(x) for x in (run / "export" / "pairs.jsonl").read_text().splitlines()]
    # slot 2 shows candidate 0: it scores (14/3 + 13/3)/2 = 4.5 vs (2 + 5)/2 = 3.5
    assert p["chosen"] == "reply 0.0" and p["margin"] == pytest.approx(1.0 / 4)
    assert p["aspects_chosen"] == {"quality": pytest.approx(14 / 3, abs=1e-3), "harmfulness": pytest.approx(13 / 3, abs=1e-3)}
    assert p["aspects_rejected"] == {"quality": 2.0, "harmfulness": 5.0}
    # weights change the decision: harmfulness only
    export(ExportConfig(run_dir=str(run), mode="multivariate", aspects=aspects, min_kappa=None,
                        aspect_weights={"quality": 0}, output_dir=str(run / "w")))
    (p,) = [json.loads(x) for x in (run / "w" / "pairs.jsonl").read_text().splitlines()]
    assert p["chosen"] == "reply 0.1"


def test_export_drops_records_whose_candidates_changed(tmp_path):
    cands = [_cand(0)]
    answers = {"i0": {f"u{j}": {"preference": "response_1"} for j in range(3)}}
    run = _write_pull(tmp_path, "binary", cands, answers, {"i0": [0, 1]}, 2)
    cands[0]["responses"][0] = "edited after the push"
    (run / "candidates" / "candidates.jsonl").write_text(json.dumps(cands[0]) + "\n")
    m = export(ExportConfig(run_dir=str(run), mode="binary", min_kappa=None))
    assert m["metrics"]["dropped"]["candidate_changed"] == 1 and m["metrics"]["n_pairs"] == 0


# ------------------------------------------------------------------ configs and CLI


def test_config_sections(tmp_path):
    cfg = load_verb_config("export", str(ROOT / "configs" / "annotate.yaml"), ["mode=ranking", "min_kappa=0.3"])
    assert cfg.mode == "ranking" and cfg.min_kappa == 0.3 and cfg.workspace == "alignkit"
    sim = load_verb_config("simulate", str(ROOT / "configs" / "annotate.yaml"))
    assert sim.annotators == 3 and sim.judge == "oracle"
    bad = tmp_path / "bad.yaml"
    bad.write_text("push:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_verb_config("push", str(bad))
    bad.write_text("pusj:\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_verb_config("push", str(bad))


def test_cli_has_every_verb():
    from alignkit.cli import build_parser

    parser = build_parser(["annotate"])
    for verb in ("server", "generate", "push", "simulate", "pull", "agreement", "export", "users"):
        args = parser.parse_args(["annotate", verb] + (["status"] if verb == "server" else [])
                                 + (["list"] if verb == "users" else [])
                                 + (["--annotations", "x", "--out", "y"] if verb == "agreement" else []))
        assert callable(args.func)


# ------------------------------------------------------------------ candidates from a model


def test_generate_with_tiny_model(tiny_model, tmp_path):
    from alignkit.annotation.candidates import GenerateConfig, generate, load_candidate_prompts

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "heldout_prompts.jsonl").write_text(
        json.dumps({"id": "heldout-0", "prompt": PROMPT, "reference": "x"}) + "\n")
    (sft / "train_prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}. Use only lowercase letters."}) + "\n"
                                                      for w in ("yes", "no", "hi")))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p1", "prompt": "Tell me a joke.", "constraint": {"type": "lowercase"}}) + "\n")
    items = load_candidate_prompts(str(sft), "both")
    assert [i["item_id"] for i in items] == ["heldout-0", "train-0", "train-1", "train-2"]
    # By default only training prompts: held-out ones stay unseen until evaluation.
    assert [i["item_id"] for i in load_candidate_prompts(str(sft))] == ["train-0", "train-1", "train-2"]
    assert items[0]["constraint"] == {"type": "max_words", "n": 5}  # recovered from the words
    assert load_candidate_prompts(str(prompts))[0]["constraint"] == {"type": "lowercase"}  # kept from the record

    cfg = GenerateConfig(run_dir=str(tmp_path / "ann"), model=str(tiny_model), prompts=str(sft), k=3,
                         max_new_tokens=8, batch_size=3, seed=1)
    m = generate(cfg)
    rows = [json.loads(x) for x in (tmp_path / "ann" / "candidates" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == 3 for r in rows)
    assert rows[0]["item_id"] == "train-0" and rows[0]["constraint"] == {"type": "lowercase"}
    gen = m["notes"]["generation"]
    assert gen["num_return_sequences"] == 3 and gen["padding_side"] == "left" and gen["do_sample"] is True
    assert gen["temperature"] == 1.0 and gen["max_new_tokens"] == 8
    # same seed, same samples (a second run is a no-op; force samples again)
    first = (tmp_path / "ann" / "candidates" / "candidates.jsonl").read_text()
    generate(cfg, force=True)
    assert (tmp_path / "ann" / "candidates" / "candidates.jsonl").read_text() == first
