"""Shared fixtures: tiny real models built once per session, the real data the repository carries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = ROOT / "tests" / "data"  # subsets carried in the repository: see its README

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_data() -> Path:
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64) with a BPE tokenizer, ChatML template and a distinct <pad>."""
    from alignkit.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def offline_cache(tmp_path_factory):
    """(cache, model dir): the offline default model fetched into a fresh cache once per test
    session, so the download and the conversion really run, once."""
    from alignkit.offline_models import DEFAULT_OFFLINE_MODEL, resolve_offline

    cache = tmp_path_factory.mktemp("alignkit-cache")
    return cache, resolve_offline(f"offline:{DEFAULT_OFFLINE_MODEL}", cache_dir=cache)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are slowed down badly by thread contention on a shared 2-core machine: one torch
    thread for the module's runs (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """The online-RL tests' prompts (PPO, GRPO, RLOO), twice over."""
    import json

    from tests.test_ppo import PROMPTS

    path = tmp_path_factory.mktemp("rl_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    return path


from tests.argilla_fixture import argilla_server  # noqa: E402,F401  (session fixture: a real local Argilla)
