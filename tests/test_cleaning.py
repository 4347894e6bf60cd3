"""Data cleaning: planted duplicates, near duplicates and each kind of personal data are found and
counted; clean text, the shipped demo and real instruction and preference data are left alone."""

from __future__ import annotations

import json

import pytest

from alignkit.cleaning import clean_records, scrub_text
from alignkit.cli import main
from alignkit.data import load_sft_examples
from alignkit.preferences import load_preferences
from alignkit.runstore import read_manifest

PLANTED = {  # kind -> texts holding one each
    "email": ["Write to jane.doe+news@mail.example.co.uk today.", "contact: a_b@x-y.org"],
    "phone": ["Call +1 415-555-0132.", "Ring (020) 7946 0958 after six.", "Tel. 06 12 34 56 78"],
    "credit_card": ["Card 4111 1111 1111 1111 expires soon.", "pay with 5500-0000-0000-0004"],
    "iban": ["IBAN GB82 WEST 1234 5698 7654 32 please", "DE89370400440532013000"],
    "ip_address": ["The server is 192.168.1.20.", "ping 2001:db8::ff00:42:8329 now"],
    "api_key": ["export OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx12", "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
                "AKIAIOSFODNN7EXAMPLE is the key id", 'api_key: "a1b2c3d4e5f6g7h8i9"', "ghp_" + "a1" * 16],
}
CLEAN = [  # look like some kind, are not: must come back unchanged
    "In 2024-01-31 we sold 1,000,000 units at $19.99 each.", "Version 1.2.3 fixes it; pi is 3.14159.",
    "Meet at 12:30:45.", "WARM : HOT :: COLD : FREEZING", "reverse = word[::-1]", "std::vector<int> v;",
    "Order 1234 5678 9012 3456 (not a valid card number).", "The ratio was 1:2:3.", "Call 555-0132.",
    "Email me at the usual address.", "Random numbers: 92 55 27 41 16 83 78 39", "token: short", "ISBN 978-3-16-148410-0", "Room 101, floor 3.",
]


@pytest.mark.parametrize("kind", list(PLANTED))
def test_each_kind_of_personal_data_is_masked_and_counted(kind):
    for text in PLANTED[kind]:
        cleaned, counts = scrub_text(text)
        assert counts == {kind: 1}, (text, counts)
        assert f"[{kind.upper()}]" in cleaned


def test_clean_text_is_untouched():
    for text in CLEAN:
        assert scrub_text(text) == (text, {}), text


def sft_record(prompt, reply):
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": reply}]}


def test_duplicates_and_near_duplicates_are_dropped_and_counted():
    long_reply = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the "
                  "chloroplasts of green plants, and it feeds almost every food chain on the planet. The light "
                  "reactions split water and make ATP; the Calvin cycle then fixes carbon dioxide into sugars "
                  "that the plant burns for energy or stores as starch for the night and the winter.")
    records = [
        sft_record("Explain photosynthesis.", long_reply),
        sft_record("explain   PHOTOSYNTHESIS!", long_reply.upper()),  # exact after normalisation
        sft_record("Explain photosynthesis.", long_reply.replace("almost every", "nearly every")),  # near
        sft_record("Explain photosynthesis to a child.", "Plants eat sunlight."),  # different
        sft_record("Explain respiration.", long_reply.replace("Photosynthesis turns light, water and carbon "
                                                              "dioxide into sugar", "Respiration burns sugar")),
    ]
    kept, report = clean_records(records, "sft")
    assert (report["exact_duplicates"], report["near_duplicates"], report["kept"]) == (1, 1, 3)
    assert [r["prompt"][0]["content"] for r in kept] == ["Explain photosynthesis.", "Explain photosynthesis to a child.",
                                                         "Explain respiration."]
    assert clean_records(records, "sft", threshold=1.0)[1]["near_duplicates"] == 0  # only identical trigram sets


def test_preference_pairs_are_compared_within_their_prompt():
    user = [{"role": "user", "content": "Name a colour."}]

    def pair(chosen, rejected, prompt=user):
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    a, b, c = ("Blue is the colour of a clear sky at noon in summer.", "Green is the colour of fresh grass in spring.",
               "Red is the colour of ripe tomatoes and of fire.")
    other = [{"role": "user", "content": "Name another colour."}]
    pairs = [pair(a, b), pair(a, c), pair(b, c),  # a ranking of three replies: three different pairs
             pair(a, b),  # the same pair again
             pair(a, b, other)]  # the same replies to another prompt: not a duplicate
    kept, report = clean_records(pairs, "preference")
    assert (report["exact_duplicates"], report["near_duplicates"], report["kept"]) == (1, 0, 4)


def test_no_false_positives_on_the_demo_and_on_real_data(real_data):
    demo, _ = load_sft_examples("demo")
    alpaca, _ = load_sft_examples(real_data / "alpaca_libre" / "alpaca_libre_ok_400.json", on_bad_record="drop")
    hh = load_preferences(real_data / "hh_rlhf_harmless" / "test_200.jsonl.gz").pairs
    for records, kind in ((demo, "sft"), (alpaca, "sft"), (hh, "preference")):
        kept, report = clean_records(records, kind)
        assert kept == records and report["records_changed"] == report["near_duplicates"] == 0


def test_sft_cleans_by_default_and_reports_without_the_values(tiny_model, tmp_path):
    rows = [{"instruction": f"Reply to ticket {i} from bob{i}@corp.example.com", "output": f"Done, ticket {i}."}
            for i in range(10)] + [{"instruction": "Reply to ticket 0 from bob0@corp.example.com", "output": "Done, ticket 0."}]
    data = tmp_path / "tickets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model={tiny_model}", f"data={data}", "max_steps=1", "batch_size=2", "save_steps=1000", "eval_steps=1000",
              "max_length=64"]
    assert main(["sft", *common, f"output_dir={tmp_path / 'on'}"]) == 0
    notes = read_manifest(tmp_path / "on")["notes"]["cleaning"]
    assert notes["enabled"] and notes["exact_duplicates"] == 1 and notes["pii"] == {"email": 10}
    assert notes["samples"] and all("[EMAIL]" in s["cleaned"] for s in notes["samples"])
    written = "".join(p.read_text() for p in (tmp_path / "on").glob("*.json*"))
    assert "corp.example.com" not in written  # neither the manifest nor the prompt files hold an address
    assert main(["sft", *common, f"output_dir={tmp_path / 'off'}", "clean=false"]) == 0
    assert read_manifest(tmp_path / "off")["notes"]["cleaning"] == {"enabled": False}
    assert "bob3@corp.example.com" in (tmp_path / "off" / "train_prompts.jsonl").read_text() + \
        (tmp_path / "off" / "validation_prompts.jsonl").read_text() + (tmp_path / "off" / "heldout_prompts.jsonl").read_text()
