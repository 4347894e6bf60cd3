"""The verifiable-instruction oracle and the embedded demo data set it checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import alignkit
from alignkit.oracle import (
    CONSTRAINT_TYPES,
    HELDOUT_TEMPLATES,
    TEMPLATES,
    constraint_score,
    count_words,
    describe_constraint,
    find_constraint,
    oracle_preference,
    passes,
    validate_constraint,
)

DEMO = Path(alignkit.__file__).parent / "demo" / "instructions.jsonl"
RECORDS = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]

# A plain, non-repetitive pool of words for length tests.
TEXT = (
    "Rainbows appear when sunlight passes through falling raindrops which bend reflect and split white "
    "light into bands of red orange yellow green blue indigo and violet so an observer standing with the "
    "sun behind them sees a bright curved arc across part of the sky during or just after a passing "
    "shower on many spring afternoons near hills lakes or open fields far from tall city buildings"
).split()


def words(n: int) -> str:
    assert n <= len(TEXT)
    return " ".join(TEXT[:n])


def _id(rec):
    return rec["instruction"][:60]


# --------------------------------------------------------------------------------------------
# The shipped data


def test_demo_shape_and_counts():
    assert 400 <= len(RECORDS) <= 500
    for rec in RECORDS:
        assert set(rec) == {"instruction", "input", "output", "constraint", "split", "slice"}
        assert isinstance(rec["instruction"], str) and rec["instruction"].strip()
        assert isinstance(rec["input"], str)
        assert isinstance(rec["output"], str) and rec["output"].strip()
        validate_constraint(rec["constraint"])
        assert count_words(rec["output"]) <= 60
    counts = Counter(r["constraint"]["type"] for r in RECORDS)
    assert set(counts) == set(CONSTRAINT_TYPES)
    assert min(counts.values()) >= 40
    assert 10 <= sum(1 for r in RECORDS if r["input"]) < len(RECORDS) // 2
    # instruction+input pairs are unique (no duplicated prompts)
    assert len({(r["instruction"], r["input"]) for r in RECORDS}) == len(RECORDS)


def _task(rec) -> str:
    """The instruction without its constraint sentence (the topic's task)."""
    return rec["instruction"][: rec["instruction"].index(describe_sentence(rec))].strip()


def describe_sentence(rec) -> str:
    for held_out in (False, True):
        for v in range(3):
            sentence = describe_constraint(rec["constraint"], v, held_out)
            if rec["instruction"].endswith(sentence):
                return sentence
    raise AssertionError(rec["instruction"])


def test_demo_splits_hold_out_whole_topics_and_test_only_phrasings():
    by_split = {name: [r for r in RECORDS if r["split"] == name] for name in ("train", "validation", "test")}
    assert len(by_split["test"]) >= 80 and len(by_split["validation"]) >= 30
    tasks = {name: {(_task(r), r["input"]) for r in recs} for name, recs in by_split.items()}
    assert not tasks["train"] & tasks["validation"] and not tasks["train"] & tasks["test"]
    assert not tasks["validation"] & tasks["test"]
    held = [r for r in RECORDS if r["slice"] == "heldout_phrasing"]
    assert held and all(r["split"] == "test" for r in held)
    assert Counter(r["slice"] for r in by_split["test"]) == {"demo_phrasing": 72, "heldout_phrasing": 72}
    # no training or validation instruction uses a held-out phrasing, and every test one does
    held_sentences = {t.split("{")[0] for ts in HELDOUT_TEMPLATES.values() for t in ts}
    for rec in RECORDS:
        uses_held = any(_task(rec) + " " + h in rec["instruction"] for h in held_sentences)
        assert uses_held == (rec["slice"] == "heldout_phrasing"), rec["instruction"]


@pytest.mark.parametrize("rec", RECORDS, ids=_id)
def test_every_reference_output_passes(rec):
    assert passes(rec["output"], rec["constraint"])
    assert constraint_score(rec["output"], rec["constraint"]) == 1.0


@pytest.mark.parametrize("rec", RECORDS, ids=_id)
def test_constraint_recovered_from_instruction(rec):
    assert find_constraint(rec["instruction"]) == rec["constraint"]
    # the user turn as the SFT stage builds it: instruction, blank line, input
    prompt = f"{rec['instruction']}\n\n{rec['input']}" if rec["input"] else rec["instruction"]
    assert find_constraint(prompt) == rec["constraint"]


def test_generator_is_deterministic_and_matches_shipped_file(tmp_path):
    from alignkit.demo import make_demo

    assert make_demo.render(make_demo.build_records()) == DEMO.read_text(encoding="utf-8")
    assert make_demo.render(make_demo.build_records()) == make_demo.render(make_demo.build_records())
    assert make_demo.main(["--check", "--out", str(DEMO)]) == 0
    stale = tmp_path / "x.jsonl"
    stale.write_text("{}\n", encoding="utf-8")
    assert make_demo.main(["--check", "--out", str(stale)]) == 1


# --------------------------------------------------------------------------------------------
# find_constraint / describe_constraint


SAMPLES = [
    {"type": "max_words", "n": 25},
    {"type": "lowercase"},
    {"type": "bullets", "n": 3},
    {"type": "starts_with", "phrase": "Great question!"},
    {"type": "ends_with", "phrase": "Hope this helps!"},
    {"type": "include_keyword", "keyword": "sunlight"},
]


@pytest.mark.parametrize("c", SAMPLES, ids=lambda c: c["type"])
def test_every_phrasing_round_trips(c):
    for held_out, templates in ((False, TEMPLATES), (True, HELDOUT_TEMPLATES)):
        for v in range(len(templates[c["type"]])):
            sentence = describe_constraint(c, v, held_out)
            assert find_constraint("Explain what a rainbow is. " + sentence) == c, sentence
            assert find_constraint(f"Explain what a rainbow is. {sentence}\n\nSome input text.") == c, sentence


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Describe a cat in no more than twenty words.", {"type": "max_words", "n": 20}),
        ("Summarize it. 40 words or less, please.", {"type": "max_words", "n": 40}),
        ("Reply in at most twenty-five words.", {"type": "max_words", "n": 25}),
        ("Reply in up to thirty five words.", {"type": "max_words", "n": 35}),
        ("Reply in at most a hundred words.", {"type": "max_words", "n": 100}),
        ("List three fruits as exactly three bullet points.", {"type": "bullets", "n": 3}),
        ("Do not use any capital letters. Describe tea.", {"type": "lowercase"}),
        ("Describe tea in lower-case.", {"type": "lowercase"}),
        ("Describe tea. Begin your answer with \u201cIn short,\u201d please.", {"type": "starts_with", "phrase": "In short,"}),
        ("Describe tea. End your response with \"Cheers!\"", {"type": "ends_with", "phrase": "Cheers!"}),
        ("Describe tea and mention the word 'kettle'.", {"type": "include_keyword", "keyword": "kettle"}),
        ("Explain what a rainbow is.", None),
        ("", None),
    ],
)
def test_find_constraint_free_text(text, expected):
    assert find_constraint(text) == expected


def test_find_constraint_accepts_chat_messages():
    msgs = [{"role": "system", "content": "Answer in at most 5 words."},
            {"role": "user", "content": "Explain tides. Reply in all lowercase."}]
    assert find_constraint(msgs) == {"type": "lowercase"}


# --------------------------------------------------------------------------------------------
# Graded scores


def test_max_words_decays_monotonically():
    c = {"type": "max_words", "n": 25}
    scores = [constraint_score(words(n), c) for n in (10, 25, 26, 30, 40, 60)]
    assert scores[0] == scores[1] == 1.0
    assert scores[1] > scores[2] > scores[3] > scores[4] > scores[5] > 0.0
    assert passes(words(25), c) and not passes(words(26), c)


def test_lowercase_graded():
    c = {"type": "lowercase"}
    s = "the moon pulls on the oceans and makes the tides rise and fall twice a day"
    one_cap = "The moon pulls on the oceans and makes the tides rise and fall twice a day"
    sentence = "The Moon pulls on the Oceans and makes the Tides rise. Then they Fall."
    shouting = s.upper()
    scores = [constraint_score(x, c) for x in (s, one_cap, sentence, shouting)]
    assert scores[0] == 1.0
    assert 1.0 > scores[1] > scores[2] > scores[3]
    assert scores[3] == 0.0
    assert not passes(one_cap, c)
    assert constraint_score("1234 5678 !!!", c) == 0.0  # no letters


def test_bullets_graded():
    c = {"type": "bullets", "n": 3}
    right = "- Rinse the rice.\n- Add two cups of water.\n- Simmer for eighteen minutes."
    blank_lines = "\n- Rinse the rice.\n\n- Add two cups of water.\n\n- Simmer for eighteen minutes.\n"
    four = right + "\n- Rest it for five minutes."
    five = four + "\n- Fluff it with a fork."
    preamble = "Here is how:\n" + right
    stars = right.replace("- ", "* ")
    numbered = "1. Rinse the rice.\n2. Add two cups of water.\n3. Simmer for eighteen minutes."
    prose = "Rinse the rice, add two cups of water and simmer it for eighteen minutes."
    assert constraint_score(right, c) == constraint_score(blank_lines, c) == 1.0
    s4, s5 = constraint_score(four, c), constraint_score(five, c)
    assert 1.0 > s4 > s5 >= 0.5  # right format, wrong count keeps at least half credit
    assert 1.0 > constraint_score(preamble, c) > constraint_score(prose, c)
    assert constraint_score(stars, c) == constraint_score(numbered, c) == 0.5
    assert constraint_score(prose, c) == 0.0
    assert not passes(preamble, c) and not passes(four, c) and not passes(stars, c)
    assert not passes("-\n- \n-", c)


def test_starts_with_graded():
    c = {"type": "starts_with", "phrase": "Great question!"}
    body = "Tides are caused by the pull of the moon on the oceans."
    exact = f"Great question! {body}"
    case = f"  great QUESTION!  {body}"
    punct = f"Great question. {body}"
    later = f"{body} Great question!"
    half = f"Great idea! {body}"
    none = body
    scores = [constraint_score(x, c) for x in (exact, case, punct, later, half, none)]
    assert scores[0] == scores[1] == 1.0
    assert 1.0 > scores[2] > scores[3] > scores[4] > scores[5] == 0.0
    assert constraint_score("Sure thing, here it is.", {"type": "starts_with", "phrase": "Sure"}) == 1.0
    assert constraint_score("Surely it is fine.", {"type": "starts_with", "phrase": "Sure"}) < 1.0


def test_ends_with_graded():
    c = {"type": "ends_with", "phrase": "Hope this helps!"}
    body = "Tides are caused by the pull of the moon on the oceans."
    exact = f"{body} Hope this helps!\n"
    punct = f"{body} Hope this helps."
    later = f"Hope this helps! {body}"
    partial = f"{body} This helps!"
    none = body
    scores = [constraint_score(x, c) for x in (exact, punct, later, partial, none)]
    assert scores[0] == 1.0
    assert 1.0 > scores[1] > scores[2] > scores[3] > scores[4] == 0.0


def test_include_keyword_graded():
    c = {"type": "include_keyword", "keyword": "scatter"}
    assert constraint_score("Air molecules scatter blue light.", c) == 1.0
    assert constraint_score("Molecules SCATTERS blue light.", c) == 1.0
    assert constraint_score("Blue light is scattered by the air.", c) == 0.5
    assert constraint_score("Blue light bounces around in the air.", c) == 0.0
    assert constraint_score("The sky is scathing and blue today.", c) == 0.0  # shares only 4 letters
    assert not passes("Blue light is scattered by the air.", c)


def test_degenerate_replies_are_penalised():
    for c in SAMPLES:
        assert constraint_score("", c) == 0.0
        assert constraint_score("   \n ", c) == 0.0
        assert not passes("", c)
    # a required phrase alone is content-free
    c = {"type": "ends_with", "phrase": "Hope this helps!"}
    assert constraint_score("Hope this helps!", c) <= 0.5
    assert constraint_score("Tides follow the moon. Hope this helps!", c) == 1.0
    # repetition
    m = {"type": "max_words", "n": 40}
    loop = " ".join(["the moon pulls the sea"] * 8)
    assert count_words(loop) <= 40
    assert constraint_score(loop, m) < 0.5
    assert constraint_score(words(30), m) == 1.0
    assert constraint_score("sea sea sea sea sea sea", {"type": "lowercase"}) < 0.5
    assert constraint_score("Ok.", {"type": "include_keyword", "keyword": "ok"}) == 0.5


def test_scores_stay_in_unit_interval_and_match_passes():
    replies = ["", "Hi", words(5), words(60), words(60).upper(), "- a b c\n- d e f\n- g h i",
               "Great question! " + words(20), words(20) + " Hope this helps!", "x " * 200]
    for c in SAMPLES:
        for r in replies:
            s = constraint_score(r, c)
            assert 0.0 <= s <= 1.0
            assert passes(r, c) == (s == 1.0)


def test_oracle_preference():
    prompt = "Explain what a rainbow is. Answer in at most 10 words."
    short, long = words(8), words(30)
    assert oracle_preference(prompt, short, long) > 0
    assert oracle_preference(prompt, long, short) == -oracle_preference(prompt, short, long)
    assert oracle_preference(prompt, short, short) == 0.0
    assert -1.0 <= oracle_preference(prompt, "", short) < 0
    # an explicit constraint wins over the prompt's words
    assert oracle_preference(prompt, long, short, {"type": "max_words", "n": 40}) == 0.0
    # no recognisable constraint: no preference
    assert oracle_preference("Explain what a rainbow is.", short, long) == 0.0
    msgs = [{"role": "user", "content": prompt}]
    assert oracle_preference(msgs, short, long) > 0


# --------------------------------------------------------------------------------------------
# Malformed constraints


@pytest.mark.parametrize(
    "bad,field",
    [
        ({}, "type"),
        ({"n": 5}, "type"),
        ({"type": "max_chars", "n": 5}, "type"),
        ({"type": None}, "type"),
        ({"type": "max_words"}, "n"),
        ({"type": "max_words", "n": 0}, "n"),
        ({"type": "max_words", "n": -3}, "n"),
        ({"type": "max_words", "n": "25"}, "n"),
        ({"type": "max_words", "n": 2.5}, "n"),
        ({"type": "bullets", "n": True}, "n"),
        ({"type": "starts_with"}, "phrase"),
        ({"type": "starts_with", "phrase": ""}, "phrase"),
        ({"type": "ends_with", "phrase": " !! "}, "phrase"),
        ({"type": "include_keyword", "keyword": None}, "keyword"),
        ({"type": "include_keyword", "word": "sun"}, "word"),
        ({"type": "lowercase", "n": 3}, "n"),
        ({"type": "max_words", "n": 25, "limit": 30}, "limit"),
    ],
)
def test_malformed_constraints_raise_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        validate_constraint(bad)
    with pytest.raises(ValueError, match=f"'{field}'"):
        constraint_score("some reply here", bad)
    with pytest.raises(ValueError, match=f"'{field}'"):
        passes("some reply here", bad)


def test_non_dict_constraint_raises():
    for bad in (None, "max_words", ["max_words", 25]):
        with pytest.raises(ValueError, match="'type'"):
            constraint_score("a reply", bad)
