"""The forgetting check: each model's perplexity on general text that no stage trains on, beside
the reference model's (by default the model the loop started from), through the ``evaluate``
metric in :mod:`alignkit.evals.perplexity_metric`.

A model whose perplexity rose by more than ``forgetting_threshold`` (relative) is flagged: it
learnt the task at the cost of its general language ability (catastrophic forgetting). The
paired per-text difference in nats per token comes with a confidence interval, so a rise within
the noise of 200 texts is told apart from a real one.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path

from alignkit.data import DataError, read_dataset_rows

log = logging.getLogger("alignkit.eval")

METRIC = Path(__file__).resolve().parent / "perplexity_metric.py"


def general_text_file(spec: str) -> Path:
    if spec == "builtin":
        from importlib.resources import files

        return Path(str(files("alignkit") / "demo" / "general_text.jsonl"))
    return Path(spec)


def load_general_text(spec: str, limit: int | None) -> list[str]:
    """Texts from ``{"text": ...}`` JSONL/JSON (or a dataset dir): file, line and field on errors."""
    path = general_text_file(spec)
    texts = []
    for line, rec in read_dataset_rows(path):
        text = rec.get("text") if isinstance(rec, dict) else rec
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, line, "text", "expected a non-empty string")
        texts.append(text)
    if not texts:
        raise DataError(path, None, "text", "no texts")
    return texts[:limit] if limit else texts


def perplexity(model_path: str, texts: list[str], batch_size: int, device: str | None, trust_remote_code: bool) -> dict:
    import evaluate
    import torch

    from alignkit.generation import load_policy

    model, tokenizer = load_policy(model_path, device=device, trust_remote_code=trust_remote_code)
    result = evaluate.load(str(METRIC)).compute(predictions=texts, model=model, tokenizer=tokenizer,
                                                batch_size=batch_size)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def forgetting(models: dict[str, str], reference: str, texts: list[str], threshold: float, confidence: float,
               batch_size: int, device: str | None, trust_remote_code: bool, cache_dir: Path,
               fingerprint) -> dict:
    """Perplexity per model (``models``: name -> path, the reference included) and each one's
    change against ``reference``; per-model results are cached so a resumed eval skips them."""
    from scipy import stats

    measured = {}
    for name, path in models.items():
        key = fingerprint(path, texts)
        cached = cache_dir / f"perplexity-{name}.json"
        if cached.exists() and json.loads(cached.read_text()).get("key") == key:
            measured[name] = json.loads(cached.read_text())
            continue
        log.info("eval: %s: perplexity on %d general texts", name, len(texts))
        measured[name] = {"key": key, **perplexity(path, texts, batch_size, device, trust_remote_code)}
        from alignkit.runstore import atomic_write_json

        atomic_write_json(cached, measured[name])
    base = measured[reference]
    out = {"reference": reference, "texts": len(texts), "tokens": base["tokens"], "threshold": threshold,
           "models": {}}
    for name, m in measured.items():
        diffs = [a - b for a, b in zip(m["per_text_nll"], base["per_text_nll"])]
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1))
        half = stats.t.ppf(0.5 + confidence / 2, max(len(diffs) - 1, 1)) * sd / math.sqrt(len(diffs)) if sd else 0.0
        change = m["perplexity"] / base["perplexity"] - 1
        out["models"][name] = {
            "perplexity": m["perplexity"], "change": change,
            "nll_diff": {"mean": mean, "ci": [mean - half, mean + half]},
            "flagged": name != reference and change > threshold and mean - half > 0,
        }
    return out
