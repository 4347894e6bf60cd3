"""Every trainer under the engines a user launches with ``accelerate launch``, in two CPU processes:
DDP (configs/accelerate/cpu_2proc.yaml), FSDP2 (fsdp_cpu.yaml) and DeepSpeed ZeRO-3
(deepspeed_zero3_cpu.yaml).

Two processes with a per-process batch of 4 see, step for step, the same 8 examples as one process
with a batch of 8 (the runs stop before the first epoch ends, so no batch is partial). Gradients
are averaged across processes, so the saved model must be the one a single process trains: the
tests compare the weights' change, not only that the run completed. That comparison caught DDP
training an unsynchronised copy per process after the stages' first evaluation (alignkit.training.
evaluate_once). PPO samples each process's own prompts, so no single-process run matches it: under
FSDP2 it must train what DDP trains. Killed runs resume where an uninterrupted run ends.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.runstore import read_manifest
from tests.test_kill_resume import kill_when

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

ENGINES = {"ddp": ("cpu_2proc", "MULTI_CPU"), "fsdp2": ("fsdp_cpu", "FSDP"),
           "zero3": ("deepspeed_zero3_cpu", "DEEPSPEED")}
# DeepSpeed compiles its CPU communication op on first use
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None and shutil.which("g++") is not None
STAGE_COMMANDS = {"sft": ["sft"], "reward": ["reward", "train"], "dpo": ["align", "dpo"], "ppo": ["align", "ppo"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def engine_config(engine: str) -> Path:
    """The shipped accelerate config, except ZeRO-3: its settings with DeepSpeed's parameter
    persistence threshold at 0, so the tiny model's weights are really partitioned (by default
    DeepSpeed keeps parameters under 100k elements whole on every process, and all of the tiny
    model's are; a model saved without gathering its partitions then looks fine)."""
    shipped = ROOT / "configs" / "accelerate" / f"{ENGINES[engine][0]}.yaml"
    if engine != "zero3":
        return shipped
    d = Path(tempfile.mkdtemp(prefix="zero3-"))
    settings = yaml.safe_load(shipped.read_text())
    zero = settings.pop("deepspeed_config")
    (d / "zero3.json").write_text(json.dumps({
        "zero_optimization": {"stage": zero["zero_stage"], "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": zero["zero3_save_16bit_model"]},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto"}))
    settings.pop("mixed_precision")
    settings["deepspeed_config"] = {"deepspeed_config_file": str(d / "zero3.json"), "zero3_init_flag": zero["zero3_init_flag"]}
    (d / "zero3.yaml").write_text(yaml.safe_dump(settings))
    return d / "zero3.yaml"


def launch_command(engine: str, stage: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(engine_config(engine)), "--main_process_port", str(free_port()),
            "-m", "alignkit.cli", *STAGE_COMMANDS[stage], "--config", str(config)]


def launch_env() -> dict:
    # the venv's bin first: DeepSpeed's launcher and its op builder look for tools there
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def launch(engine: str, stage: str, config: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = launch_command(engine, stage, config)
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def relative_difference(trained: Path, reference: Path, start: Path) -> float:
    """|w - w_ref| / |w_ref - w_start| over the start model's tensors: how far a run's change of
    the weights is from the reference run's change (0: the same training)."""
    import torch

    w, ref, w0 = weights(trained), weights(reference), weights(start)
    keys = [k for k in w0 if k in ref and k in w]
    assert len(keys) == len(w0), f"{trained}: tensors missing against the start model"
    flat = lambda d: torch.cat([d[k].double().flatten() for k in keys])  # noqa: E731
    return float((flat(w) - flat(ref)).norm() / (flat(ref) - flat(w0)).norm())


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model) -> dict:
    """Data for every stage, a tiny reward model for PPO, and one config per stage (batch 4)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.models import build_tiny_model

    d = tmp_path_factory.mktemp("engines")
    (d / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} is a number and {i + 1} follows."}) + "\n"
                                         for i in range(24)))
    (d / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"{i} {i + 1}", "rejected": "No."}) + "\n"
                                           for i in range(20)))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(12)))
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(d / "reward_model")
    tokenizer.save_pretrained(d / "reward_model")
    build_tiny_model(d / "other", seed=1)  # a second policy for the eval
    common = {"model": str(tiny_model), "learning_rate": 1e-3, "batch_size": 4}
    configs = {  # 16 training examples or pairs: 2 steps of 8, within the first epoch
        "sft": {**common, "data": str(d / "sft.jsonl"), "max_steps": 2, "save_steps": 1},
        "reward": {**common, "data": str(d / "pairs.jsonl"), "eval_fraction": 0.2, "epochs": 1, "max_length": 64,
                   "save_steps": 1},
        "dpo": {**common, "data": str(d / "pairs.jsonl"), "eval_fraction": 0.2, "epochs": 1, "max_length": 64,
                "precompute_ref_log_probs": True, "save_steps": 1, "eval_steps": 100, "logging_steps": 1},
        "ppo": {"model": str(tiny_model), "reward_model": str(d / "reward_model"), "prompts": str(d / "prompts.jsonl"),
                "total_steps": 6, "save_steps": 2, "rollout_batch_size": 4, "mini_batch_size": 2, "grad_accum": 2,
                "ppo_epochs": 1, "learning_rate": 1e-3, "max_new_tokens": 8},
    }
    return {"dir": d, "configs": configs, "start": Path(tiny_model)}


def write_config(work: dict, stage: str, out: Path, **changes) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({**work["configs"][stage], "output_dir": str(out), **changes}))
    return path


@pytest.fixture(scope="module")
def one_process(work) -> dict:
    """SFT, reward and DPO in this process with a batch of 8: what two processes of 4 must train."""
    runs = {}
    for stage in ("sft", "reward", "dpo"):
        out = work["dir"] / f"one-{stage}"
        assert main([*STAGE_COMMANDS[stage], "--config", str(write_config(work, stage, out, batch_size=8))]) == 0
        runs[stage] = out
    return runs


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_two_processes_train_what_one_process_trains(engine, stage, work, one_process, tmp_path):
    if engine == "zero3" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install alignkit[deepspeed]), or no g++ to build its CPU op")
    out = tmp_path / stage
    launch(engine, stage, write_config(work, stage, out), tmp_path)
    manifest = read_manifest(out)
    assert manifest["status"] == "completed"
    assert manifest["notes"]["processes"] == 2
    assert manifest["notes"]["distributed_type"].endswith(ENGINES[engine][1])
    assert manifest["metrics"]["global_step"] == read_manifest(one_process[stage])["metrics"]["global_step"] == 2
    # the saved model is whole (not a shard, not a partitioned placeholder) and trained as one process trains
    assert relative_difference(out / "model", one_process[stage] / "model", work["start"]) < 1e-3


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3"])
def test_sft_killed_after_a_checkpoint_resumes_and_ends_where_an_uninterrupted_run_ends(engine, work, tmp_path):
    if engine == "zero3" and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed, or no g++")
    whole, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    launch(engine, "sft", write_config(work, "sft", whole, max_steps=12, save_steps=2), tmp_path)
    config = write_config(work, "sft", killed, max_steps=12, save_steps=2)
    kill_when([], tmp_path, lambda: (killed / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists(),
              "its first checkpoint", command=launch_command(engine, "sft", config), env=launch_env())
    assert read_manifest(killed)["status"] == "running"  # what a crash leaves
    launch(engine, "sft", config, tmp_path)
    manifest = read_manifest(killed)
    assert manifest["status"] == "completed" and "checkpoint-" in manifest["notes"]["resumed_from"]
    assert relative_difference(killed / "model", whole / "model", work["start"]) < 1e-5


def test_ppo_under_fsdp2_trains_what_ddp_trains_and_resumes_after_a_kill(work, tmp_path):
    """The policy and value model sharded (one ``prepare`` each; the value model's new head is on
    rank 1's meta device until FSDP fills it from rank 0, where a plain ``.to()`` failed before),
    the frozen reference and reward model whole on each rank, checkpoints of each rank's shards."""
    ddp, fsdp, killed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "killed"
    launch("ddp", "ppo", write_config(work, "ppo", ddp), tmp_path)
    launch("fsdp2", "ppo", write_config(work, "ppo", fsdp), tmp_path)
    manifest = read_manifest(fsdp)
    assert manifest["status"] == "completed" and manifest["notes"]["distributed_type"].endswith("FSDP")
    assert read_manifest(ddp)["notes"]["ranks_in_sync"] is True
    rows = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(rows(fsdp), rows(ddp), strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4) and a["kl"] == pytest.approx(b["kl"], abs=1e-3)
    assert relative_difference(fsdp / "model", ddp / "model", work["start"]) < 1e-3

    config = write_config(work, "ppo", killed)
    checkpoint = killed / "checkpoints" / "step-000002"
    kill_when([], tmp_path, lambda: (checkpoint / "trainer_state.pt").exists(), "its first checkpoint",
              command=launch_command("fsdp2", "ppo", config), env=launch_env())
    assert sorted(p.name for p in checkpoint.glob("*_rank1.pt")) == ["policy_rank1.pt", "rng_rank1.pt", "state_rank1.pt",
                                                                  "value_rank1.pt"]
    launch("fsdp2", "ppo", config, tmp_path)
    manifest = read_manifest(killed)
    assert manifest["status"] == "completed" and "step-" in manifest["notes"]["resumed_from"]
    assert relative_difference(killed / "model", fsdp / "model", work["start"]) < 1e-5


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed, or no g++")
def test_ppo_under_deepspeed_stops_with_a_clear_error_instead_of_running_as_ddp(work, tmp_path):
    out = tmp_path / "ppo"
    cmd = launch_command("zero3", "ppo", write_config(work, "ppo", out))
    proc = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "DeepSpeed is not supported for PPO" in proc.stderr and "fsdp" in proc.stderr
    assert read_manifest(out) is None  # nothing started, nothing claimed


def run_processes(n: int, args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "alignkit.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"


def test_two_processes_generate_the_candidates_and_the_eval_one_process_writes(work, tiny_model, tmp_path):
    """Each process samples every other batch (each batch seeded by its number) and all gather the
    replies in order: the files are byte for byte those of one process; 21 prompts in batches of
    4 leave the last batch short and give the processes unequal shares."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write about topic {i} in a few words."}) + "\n" for i in range(21)))
    for n in (1, 2):
        run_processes(n, ["annotate", "generate", f"run_dir={tmp_path / f'annotate{n}'}", f"model={tiny_model}",
                          f"prompts={prompts}", "k=3", "max_new_tokens=16", "batch_size=4"], tmp_path)
        run_processes(n, ["eval", f"models={{sft: {tiny_model}, other: {work['dir'] / 'other'}}}", "baseline=sft", f"prompts={prompts}", f"output_dir={tmp_path / f'eval{n}'}",
                          "max_new_tokens=12", "batch_size=4", "samples_per_prompt=2", "cpu_threads=1",
                          f"reward_model={work['dir'] / 'reward_model'}"], tmp_path)
    candidates = [(tmp_path / f"annotate{n}" / "candidates" / "candidates.jsonl").read_text() for n in (1, 2)]
    assert candidates[0] == candidates[1] and len(candidates[0].splitlines()) == 21
    generations = [(tmp_path / f"eval{n}" / "generations.jsonl").read_text() for n in (1, 2)]
    assert generations[0] == generations[1] and len(generations[0].splitlines()) == 21 * 2  # a row per prompt and sample
    results = [json.loads((tmp_path / f"eval{n}" / "eval.json").read_text()) for n in (1, 2)]
    for r in results:  # generation times differ by design
        for model in r["models"].values():
            model["generation"].pop("seconds")
    assert results[0] == results[1]
    assert read_manifest(tmp_path / "eval2")["status"] == "completed"
