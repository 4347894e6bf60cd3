"""Picks of the chat's blind comparison page (``alignkit chat --web``) as Argilla records.

A pick record (a line of the chat's picks files, see :mod:`alignkit.evals.chat_web`) becomes a
record of a binary-preference dataset, so annotators can confirm or overrule what a tester chose.
"""

from __future__ import annotations

import hashlib
import json

from alignkit.annotation.argilla_client import sdk_client
from alignkit.annotation.datasets import EMPTY_PLACEHOLDER, DatasetConfig, ensure_dataset, render_prompt
from alignkit.annotation.server import connect


def push_picks_to_argilla(records: list[dict], dataset_name: str, workspace: str = "alignkit", client=None) -> int:
    """Push saved picks (records of the picks files) to Argilla as new annotation records.

    The dataset is a binary-preference dataset as ``alignkit annotate push`` makes them (fields
    ``prompt``, ``response_1`` = answer A, ``response_2`` = answer B; LabelQuestion ``preference``),
    created if missing. The tester's pick is attached as a suggestion (none for ties / both bad);
    models, choice and session go to metadata, which annotators do not see. Record ids come from
    the content, so pushing the same picks again adds nothing. The client is ``client`` or one for
    ARGILLA_API_URL / ARGILLA_API_KEY, else the local server (``alignkit.annotation.server``). Returns the
    number of records sent."""
    import argilla as rg

    if client is None:
        client = sdk_client(connect())
    cfg = DatasetConfig(mode="binary", dataset=dataset_name, workspace=workspace, annotators_per_record=1)
    ds, _ = ensure_dataset(client, cfg, 2)
    rows = []
    for rec in records:
        a, b = rec["response_a"], rec["response_b"]
        rid = hashlib.sha256(json.dumps([rec["session_id"], rec["prompt"], a, b], ensure_ascii=False).encode()).hexdigest()[:24]
        suggestions = ([rg.Suggestion(question_name="preference", value="response_1" if rec["choice"] == "A" else "response_2",
                                      agent="alignkit-chat-tester")] if rec["choice"] in ("A", "B") else [])
        rows.append(rg.Record(
            id=f"chat.{rid}",
            fields={"prompt": render_prompt(rec["prompt"]), "response_1": a if a.strip() else EMPTY_PLACEHOLDER,
                    "response_2": b if b.strip() else EMPTY_PLACEHOLDER},
            metadata={"item_id": f"chat.{rid}", "permutation": [0, 1], "alignkit_mode": "binary", "source": "alignkit-chat",
                      "choice": rec["choice"], "model_a": rec["model_a"], "model_b": rec["model_b"],
                      "session_id": rec["session_id"], "timestamp": rec["timestamp"]},
            suggestions=suggestions))
    ds.records.log(rows)
    return len(rows)
