"""Reward and DPO read several preference sources (an annotation export, the chat's picks and
thumbs pairs, other files) with weights: deduplicated across sources, resampled by weight in
training only, every source and its counts in the manifest."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from alignkit.cli import main as cli_main
from alignkit.config import ConfigError
from alignkit.preferences import load_preference_sources, preference_sources, weighted
from alignkit.runstore import hash_path, read_manifest
from tests.test_reward import write_jsonl


def export_rows(n: int) -> list[dict]:
    """An annotation export's shape: conversational pairs with a margin and item ids."""
    return [{"prompt": [{"role": "user", "content": f"Is {i} even?"}],
             "chosen": [{"role": "assistant", "content": "Yes." if i % 2 == 0 else "No."}],
             "rejected": [{"role": "assistant", "content": "No." if i % 2 == 0 else "Yes."}],
             "margin": 1.0, "item_id": f"item-{i}"} for i in range(n)]


def pick_rows(numbers) -> list[dict]:
    """The chat page's picks (and --serve's thumbs pairs): conversational, with their own extra fields."""
    return [{"prompt": [{"role": "user", "content": f"Is {i} even?"}],
             "chosen": [{"role": "assistant", "content": "Yes." if i % 2 == 0 else "No."}],
             "rejected": [{"role": "assistant", "content": "No." if i % 2 == 0 else "Yes."}],
             "model_chosen": "dpo", "model_rejected": "sft", "choice": "A", "session_id": "s"} for i in numbers]


@pytest.fixture
def sources(tmp_path):
    export = write_jsonl(tmp_path / "export.jsonl", export_rows(12))       # prompts 0..11
    picks = write_jsonl(tmp_path / "picks.jsonl", pick_rows(range(8, 16)))  # 8..11 are in the export too
    return export, picks


def test_sources_are_read_in_order_deduplicated_and_counted(sources):
    export, picks = sources
    data = load_preference_sources([str(export), {"path": str(picks), "weight": 2, "name": "arena"}])
    assert len(data.pairs) == 16  # 12 + the 4 picks the export lacks
    assert Counter(p["source"] for p in data.pairs) == {"export.jsonl": 12, "arena": 4}
    assert {p["weight"] for p in data.pairs if p["source"] == "arena"} == {2.0}
    assert data.dropped["duplicate_across_sources"] == 4
    assert data.sources == [
        {"name": "export.jsonl", "path": str(export), "weight": 1.0, "pairs": 12, "kept": 12, "duplicates": 0,
         "dropped": data.sources[0]["dropped"]},
        {"name": "arena", "path": str(picks), "weight": 2.0, "pairs": 8, "kept": 4, "duplicates": 4,
         "dropped": data.sources[1]["dropped"]}]
    # One source given as before: read as before, untagged.
    one = load_preference_sources(str(export))
    assert one.sources is None and "source" not in one.pairs[0] and len(one.pairs) == 12


def test_weights_resample_training_pairs():
    pairs = [{"id": i, "weight": w} for i, w in enumerate([1.0] * 100 + [2.0] * 100 + [0.5] * 200)]
    out = weighted(pairs, seed=0)
    counts = Counter(p["id"] for p in out)
    assert all(counts[i] == 1 for i in range(100)) and all(counts[i] == 2 for i in range(100, 200))
    half = sum(counts[i] for i in range(200, 400))
    assert 80 <= half <= 120 and set(counts[i] for i in range(200, 400)) <= {0, 1}
    assert weighted(pairs, seed=0) == out and weighted(pairs, seed=1) != out  # seeded
    unweighted = [{"id": 1}, {"id": 2, "weight": 1.0}]
    assert weighted(unweighted, seed=0) is unweighted


def test_dpo_keeps_the_clearest_pairs_of_each_source_for_a_prompt(tmp_path):
    """Two rounds of the loop rank other replies to the same prompts: pairs_per_prompt=1 keeps the
    clearest pair of each round's ranking, not only the first round's."""
    from alignkit.config import from_dict
    from alignkit.rlhf.dpo import DPOStageConfig, prepare_data

    def ranked(tag: str) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": f"Prompt {i}?"}],
                 "chosen": [{"role": "assistant", "content": f"{tag} best"}],
                 "rejected": [{"role": "assistant", "content": f"{tag} {worse}"}], "margin": margin}
                for i in range(6) for worse, margin in (("middling", 0.5), ("worst", 1.0))]

    rounds = [{"path": str(write_jsonl(tmp_path / f"round{k}.jsonl", ranked(f"r{k}"))), "name": f"round{k}"} for k in (1, 2)]
    data = prepare_data(from_dict(DPOStageConfig, {"data": rounds, "eval_fraction": 0.34, "pairs_per_prompt": 1,
                                                   "output_dir": str(tmp_path / "dpo")}))
    n_train = len({p["prompt"][0]["content"] for p in data["train"]})
    assert Counter(p["rejected"][0]["content"] for p in data["train"]) == {"r1 worst": n_train, "r2 worst": n_train}
    assert data["not_clearest"] == 2 * n_train


@pytest.mark.parametrize("bad, says", [
    ([], "empty list"),
    ([{"file": "a.jsonl"}], "expected a path or {path, weight, name}"),
    ([{"path": "a.jsonl", "weight": 0}], "data[0].weight"),
    ([{"path": "a.jsonl", "weight": "2"}], "data[0].weight"),
    (["x/a.jsonl", "y/a.jsonl"], "two sources are named 'a.jsonl'"),
])
def test_bad_source_lists_are_config_errors(bad, says):
    with pytest.raises(ConfigError) as e:
        preference_sources(bad)
    assert says in str(e.value)


@pytest.mark.parametrize("stage", ["reward train", "align dpo"])
def test_stages_train_on_several_sources_and_record_each(stage, sources, tiny_model, tmp_path):
    export, picks = sources
    out = tmp_path / "run"
    data = f"data=[{export},{{path: {picks}, weight: 2, name: arena}}]"
    rc = cli_main([*stage.split(), f"model={tiny_model}", data, f"output_dir={out}", "max_length=64", "batch_size=2",
                   "grad_accum=1", "max_steps=1", "eval_fraction=0.25", "save_steps=1000", "eval_steps=1000"])
    m = read_manifest(out)
    assert rc == 0 and m["status"] == "completed"
    assert m["inputs"]["data:export.jsonl"]["hash"] == hash_path(export)
    assert m["inputs"]["data:arena"]["hash"] == hash_path(picks)
    notes = m["notes"]
    assert [(s["name"], s["kept"], s["duplicates"]) for s in notes["sources"]] == [("export.jsonl", 12, 0), ("arena", 4, 4)]
    dropped = notes["dropped_pairs"].get("data", notes["dropped_pairs"])  # reward's holds data and eval_data
    assert dropped["duplicate_across_sources"] == 4
    # 16 prompts, a quarter held out, each pair once; in training the arena's pairs count twice.
    from alignkit.config import from_dict
    if stage == "reward train":
        from alignkit.reward.train import RewardTrainConfig as Config, prepare_data
    else:
        from alignkit.rlhf.dpo import DPOStageConfig as Config, prepare_data
    split = prepare_data(from_dict(Config, m["config"]))
    prompts = lambda rows: Counter(json.dumps(r["prompt"]) for r in rows)  # noqa: E731
    train, held = prompts(split["train"]), prompts(split["eval"])
    assert len(held) == 4 and set(held.values()) == {1} and not set(held) & set(train)
    arena_only = {json.dumps(r["prompt"]) for r in pick_rows(range(12, 16))}
    assert {k: v for k, v in train.items() if k in arena_only} == {k: 2 for k in arena_only - set(held)}
    assert set(v for k, v in train.items() if k not in arena_only) == {1}
    assert notes["split_sizes"] == {"train": sum(train.values()), "eval": 4}
