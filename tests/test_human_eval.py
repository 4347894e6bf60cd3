"""``alignkit eval --human-eval A,B`` against a REAL local Argilla (never mocked): a tiny eval of two tiny
models, blind A/B records pushed (no model name anywhere annotators look, order shuffled), human
annotators awaited (exit 10), simulated annotators answering, the human win rate, its interval, ties
and Fleiss' kappa checked by hand against the pulled answers and against what the annotators' judge
prefers, an idempotent re-run, the report's "Human evaluation" section in headless Chromium, and the
command's errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from alignkit.annotation.argilla_client import Http, sdk_client
from alignkit.annotation.datasets import DatasetConfig, get_dataset, list_records, render_prompt
from alignkit.cli import main
from alignkit.evals.human import majority, summarise
from alignkit.evals.stats import tie_aware_interval
from tests.argilla_fixture import argilla_server  # noqa: F401  (session fixture)
from tests.browser import report_page

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS = 12
WORKSPACE = "human-eval"
RULE = '''
def word_count_reward(prompts, responses):
    return [float(len(r.split())) for r in responses]
'''
# Annotators 1 and 2 answer exactly what the judge prefers (the majority is then always theirs);
# annotator 3 flips a coin half the time, so the agreement is real but not perfect.
ANNOTATE = f"""
common:
  workspace: {WORKSPACE}
  annotators_per_record: 3
  seed: 0
simulate:
  annotators: 3
  user_prefix: heval-
  judge: tests.test_human_eval:longer_is_better
  tie_threshold: 0.001
  pool: [{{}}, {{}}, {{flip_prob: 0.5}}]
"""


def longer_is_better(prompt: str, response: str) -> float:
    """The simulated annotators' judge: the longer reply is better (equal lengths: a tie)."""
    text = "" if response == "(empty response)" else response
    return min(len(text.strip()) / 500, 1.0)


def preferred(a_text: str, b_text: str) -> str:
    """What the noise-free annotators answer for A's and B's replies, in model terms."""
    sa, sb = longer_is_better("", a_text), longer_is_better("", b_text)
    return "tie" if abs(sa - sb) < 0.001 else "b" if sb > sa else "a"


@pytest.fixture(scope="module")
def eval_dir(tiny_model, tmp_path_factory):
    """A completed tiny eval: the tiny model as `sft`, a second tiny model (seed 1) as `other`."""
    from alignkit.models import build_tiny_model

    root = tmp_path_factory.mktemp("human_eval")
    other = build_tiny_model(root / "other", seed=1)
    demo = [json.loads(x) for x in (ROOT / "alignkit" / "demo" / "instructions.jsonl").read_text().splitlines()]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": d["instruction"]}) + "\n"
                               for i, d in enumerate(demo[:N_PROMPTS])))
    (root / "rules.py").write_text(RULE)
    out = root / "eval"
    assert main(["eval", f"models={{sft: {tiny_model}, other: {other}}}", "baseline=sft", f"prompts={prompts}",
                 f"output_dir={out}", "max_new_tokens=12", "batch_size=6", "report_samples=3", "cpu_threads=1",
                 "general_text=null", f"reward_function={root / 'rules.py'}:word_count_reward"]) == 0
    return out


@pytest.fixture()
def argilla_env(monkeypatch, argilla_server):  # noqa: F811
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)


def human_cli(eval_dir: Path, annotate: Path, annotators: str, versus: str = "sft,other") -> int:
    return main(["eval", "--human-eval", versus, "--annotators", annotators, "--annotate-config", str(annotate),
                 f"output_dir={eval_dir}"])


def hand_computed(pair: Path) -> dict:
    """The figures of human_eval.json from the pulled table alone: each answer mapped to a model
    through its record's permutation, each record's majority, the counts, the interval, and Fleiss'
    kappa by statsmodels on the raw answers."""
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    records = {r["record_id"]: r for r in map(json.loads, (pair / "pull" / "records.jsonl").read_text().splitlines())}
    answers: dict[str, dict[str, str]] = {}
    for row in map(json.loads, (pair / "pull" / "annotations.jsonl").read_text().splitlines()):
        if row["question"] == "preference":
            answers.setdefault(row["record_id"], {})[row["annotator"]] = row["value"]
    outcomes, raw = {}, []
    for rid, by_annotator in answers.items():
        perm = records[rid]["permutation"]
        votes = ["tie" if v == "tie" else "ab"[perm[int(v.split("_")[1]) - 1]] for v in by_annotator.values()]
        top = max(set(votes), key=votes.count)
        outcomes[records[rid]["item_id"]] = top if votes.count(top) * 2 > len(votes) else None
        raw.append([by_annotator[name] for name in sorted(by_annotator)])
    labels = sorted({v for row in raw for v in row})
    table, _ = aggregate_raters([[labels.index(v) for v in row] for row in raw])
    counts = {o: list(outcomes.values()).count(o) for o in ("b", "tie", "a", None)}
    return {"outcomes": outcomes, "wins": counts["b"], "ties": counts["tie"], "losses": counts["a"],
            "n_no_majority": counts[None], "kappa": float(fleiss_kappa(table, method="fleiss"))}


def test_human_eval_through_argilla(eval_dir, tmp_path, argilla_server, argilla_env, capsys):  # noqa: F811
    annotate = tmp_path / "annotate.yaml"
    annotate.write_text(ANNOTATE)
    pair = eval_dir / "human" / "sft_vs_other"
    gens = [json.loads(x) for x in (eval_dir / "generations.jsonl").read_text().splitlines()]
    replies = {r["id"]: (r["responses"]["sft"]["text"], r["responses"]["other"]["text"]) for r in gens}
    # the two random models start alike (same tokenizer, same sampling seeds): a prompt they answer
    # identically is a tie, not a question for annotators
    identical = {rid for rid, (a, b) in replies.items() if a.strip() == b.strip()}
    n_records = N_PROMPTS - len(identical)

    # 1. human annotators: the records are pushed, nobody has answered: exit 10, nothing reported
    assert human_cli(eval_dir, annotate, "human") == 10
    assert f"0 of {n_records} records completed" in capsys.readouterr().out
    assert not (pair / "human_eval.json").exists()

    # the records on the server: one per prompt, blind, shuffled
    dataset = json.loads((pair / "push" / "manifest.json").read_text())["notes"]["dataset"]
    http, client = Http(argilla_server), sdk_client(argilla_server)
    ds = get_dataset(client, DatasetConfig(dataset=dataset, workspace=WORKSPACE))
    records = list(list_records(http, ds.id))
    assert len(records) == n_records == len({r["external_id"] for r in records})
    assert {r["metadata"]["item_id"] for r in records} == set(replies) - identical
    prompts = {r["id"]: render_prompt(r["prompt"]) for r in gens}
    visible = [dataset, WORKSPACE, ds.settings.guidelines]
    visible += [json.dumps([q.title, q.description, getattr(q, "labels", None)], default=str)
                for q in ds.settings.questions] + [f.title for f in ds.settings.fields]
    assert list(ds.settings.metadata) == []  # no metadata property: the metadata is hidden from annotators
    perms = set()
    for rec in records:
        meta = rec["metadata"]
        sft_text, other_text = replies[meta["item_id"]]
        shown = [rec["fields"]["response_1"], rec["fields"]["response_2"]]
        assert rec["fields"]["prompt"] == prompts[meta["item_id"]]
        assert shown == [[sft_text, other_text][i] for i in meta["permutation"]]  # the replies, nothing added
        perms.add(tuple(meta["permutation"]))
        visible.append(json.dumps(meta))
    assert perms == {(0, 1), (1, 0)}  # the order is shuffled for some records, not for others
    for text in visible:
        assert not re.search(r"\b(sft|other)\b", text, re.I), text

    # 2. simulated annotators answer: the result
    assert human_cli(eval_dir, annotate, "simulated") == 0
    assert "human win rate of other over sft" in capsys.readouterr().out
    human = json.loads((pair / "human_eval.json").read_text())
    hand = hand_computed(pair)
    assert (human["a"], human["b"], human["annotators"]) == ("sft", "other", "simulated")
    assert human["n_records"] == human["n_records_completed"] == n_records and human["n_annotators"] == 3
    assert human["n_identical"] == len(identical) and human["n_prompts"] == N_PROMPTS
    wins, ties, losses = hand["wins"], hand["ties"] + len(identical), hand["losses"]  # identical replies tie
    assert (human["wins"], human["ties"], human["losses"]) == (wins, ties, losses)
    assert human["n_no_majority"] == hand["n_no_majority"]
    n = wins + ties + losses
    assert human["n"] == n and human["win_rate"] == pytest.approx((wins + ties / 2) / n)
    assert human["ci"] == pytest.approx(tie_aware_interval(wins, ties, losses, 0.95))
    assert human["ci"][0] <= human["win_rate"] <= human["ci"][1]
    assert human["agreement"]["fleiss_kappa"] == pytest.approx(hand["kappa"], abs=1e-9)
    lo, hi = human["agreement"]["ci"]
    assert lo <= human["agreement"]["fleiss_kappa"] <= hi
    # two of three annotators answer what the judge prefers, so every majority is the judge's preference
    expected = {rid: preferred(*replies[rid]) for rid in set(replies) - identical}
    assert {r["item_id"]: r["outcome"] for r in human["records"]} == hand["outcomes"] == expected
    assert {"b", "a"} <= set(expected.values())  # both models win somewhere: a swapped mapping would show
    assert human["automatic"]["rule"]["n"] == N_PROMPTS and "oracle" in human["automatic"]

    # 3. again: nothing new on the server, no new answers, the same result
    lines = (pair / "pull" / "annotations.jsonl").read_text()
    assert human_cli(eval_dir, annotate, "simulated") == 0
    assert len(list(list_records(http, ds.id))) == n_records
    assert json.loads((pair / "push" / "manifest.json").read_text())["metrics"]["n_created"] == 0
    assert json.loads((pair / "simulate" / "manifest.json").read_text())["metrics"]["n_submitted"] == 0
    assert (pair / "pull" / "annotations.jsonl").read_text() == lines
    again = json.loads((pair / "human_eval.json").read_text())
    assert {k: again[k] for k in ("win_rate", "ci", "wins", "ties", "losses", "agreement")} == \
        {k: human[k] for k in ("win_rate", "ci", "wins", "ties", "losses", "agreement")}
    assert human_cli(eval_dir, annotate, "human") == 0  # every record complete: people are not waited for
    assert json.loads((pair / "human_eval.json").read_text())["annotators"] == "simulated"  # who answered

    check_report_in_chromium(eval_dir / "report.html", human)


def check_report_in_chromium(report: Path, human: dict) -> None:
    with report_page(report) as (page, requests):
        assert "Human evaluation" in page.inner_text("body")
        row = page.inner_text("#human tbody tr")
        lo, hi = human["ci"]
        k, (klo, khi) = human["agreement"]["fleiss_kappa"], human["agreement"]["ci"]
        assert "other vs sft" in row
        assert f"{human['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]" in row
        assert f"{human['wins']} / {human['ties']} / {human['losses']}" in row
        assert f"{k:.3f} [{klo:.3f}, {khi:.3f}]" in row
        assert page.eval_on_selector_all("#summary tbody tr", "els => els.length") == 2  # the eval's own table
        assert all(u.startswith(("file:", "data:")) for u in requests), requests  # self-contained


def test_majority_and_summary_by_hand():
    assert majority([1.0, 1.0, 0.0]) == 1.0 and majority([0.5, 0.5, 1.0]) == 0.5
    assert majority([1.0, 0.0, 0.5]) is None and majority([1.0, 0.0]) is None and majority([]) is None
    s = summarise([1.0, 1.0, 0.0, 0.5, None], identical=1, confidence=0.95)
    assert (s["wins"], s["ties"], s["losses"], s["n"], s["n_no_majority"]) == (2, 2, 1, 5, 1)
    assert s["win_rate"] == pytest.approx(3 / 5) and s["ci"] == tie_aware_interval(2, 2, 1, 0.95)


def test_errors_name_the_problem(eval_dir, tmp_path, capsys):
    assert main(["eval", "--human-eval", "sft,other", f"output_dir={tmp_path / 'missing'}"]) == 2
    assert "no completed eval run" in capsys.readouterr().err
    assert main(["eval", "--human-eval", "sft,dpo", f"output_dir={eval_dir}"]) == 2
    assert "'dpo' not in the eval (sft, other)" in capsys.readouterr().err
    assert main(["eval", "--human-eval", "sft,sft", f"output_dir={eval_dir}"]) == 2
    assert main(["eval", "--human-eval", "sft", f"output_dir={eval_dir}"]) == 2
    assert "expected two model names" in capsys.readouterr().err
    one = tmp_path / "one_model"
    shutil.copytree(eval_dir, one, ignore=shutil.ignore_patterns("human"))
    result = json.loads((one / "eval.json").read_text())
    del result["models"]["other"]
    (one / "eval.json").write_text(json.dumps(result))
    assert main(["eval", "--human-eval", "sft,other", f"output_dir={one}"]) == 2
    assert "the eval has one model (sft)" in capsys.readouterr().err
    assert main(["eval", "--annotators", "human", f"output_dir={eval_dir}"]) == 2
    assert not (eval_dir / "human" / "sft_vs_sft").exists()
