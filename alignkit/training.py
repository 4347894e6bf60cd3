"""Pieces the training stages share (SFT, reward, DPO, and PPO where it fits).

Each function is small and does one thing; the why of each is in its comments. Heavy imports
(torch, transformers, peft) happen inside the functions, so importing this module stays cheap and a
stage can validate its config before paying for them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete ``checkpoint-N`` under ``ckpt_dir``, for ``trainer.train(resume_from_checkpoint=...)``.

    Only checkpoints with a ``trainer_state.json`` count: transformers writes that file last, so a
    directory without it is a save that was killed halfway and cannot be resumed from. Sorted by the
    step number, not by name (``checkpoint-100`` comes after ``checkpoint-99``)."""
    if not ckpt_dir.exists():
        return None
    ckpts = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[1]))) if ckpts else None


def evaluate_once(trainer, path: Path) -> dict:
    """``trainer.evaluate()`` before training, measured once and kept in ``path``.

    A resumed run (after a kill) starts from a checkpoint whose model is already trained: measuring
    "before" again would report the partly trained model. Reading the first measurement back keeps
    the before/after comparison honest and makes the re-run cheaper. Every process evaluates (it is a
    collective under DDP); only the main one writes."""
    from alignkit.runstore import atomic_write_json, is_main_process

    if path.exists():
        return json.loads(path.read_text())
    metrics = trainer.evaluate()
    if is_main_process():
        atomic_write_json(path, metrics)
    return metrics


def lora_config(lora_options, task_type: str):
    """A PEFT ``LoraConfig`` from a stage's ``LoraOptions`` (``sft.train.LoraOptions``).

    ``target_modules`` is a string in the config so it can be given as ``KEY=VALUE`` on the command
    line: ``all-linear`` is PEFT's own shorthand and passes through; anything else is a comma list.
    ``task_type`` is ``CAUSAL_LM`` for policies; ``SEQ_CLS`` for reward models, which also makes
    PEFT train the (new, randomly initialised) score head fully beside the adapters."""
    from peft import LoraConfig

    targets = lora_options.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",")]
    return LoraConfig(r=lora_options.r, lora_alpha=lora_options.alpha, lora_dropout=lora_options.dropout,
                      target_modules=targets, task_type=task_type)


def qlora_problem(stage: str) -> str | None:
    """Why 4-bit QLoRA cannot run on this machine, or None when it can.

    Separate from :func:`qlora_config` so a stage that validates its config before writing anything
    (DPO's ``check()``) can raise its own ``ConfigError`` with the same words."""
    import torch

    if not torch.cuda.is_available():
        return f"{stage}: qlora (4-bit) needs a CUDA GPU; on CPU use lora.enabled=true instead"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return f"{stage}: qlora needs bitsandbytes (pip install 'alignkit[qlora]')"
    return None


def qlora_config(dtype, stage: str):
    """The ``BitsAndBytesConfig`` for a QLoRA base model (NF4, double quantisation, compute in ``dtype``).

    Raises ``RuntimeError`` when QLoRA cannot run here: without this check transformers fails deep in
    model loading with a message that does not say what to do instead."""
    problem = qlora_problem(stage)
    if problem:
        raise RuntimeError(problem)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoard callback, writing to ``log_dir`` (use with ``report_to="none"``).

    Left to ``report_to=["tensorboard"]``, the callback picks its directory in ``on_train_begin``; a
    log that comes before that (the stages' "before training" evaluation) makes it open a writer with
    no directory, and TensorBoard then writes to ``./runs/<date>`` in the working directory: a stray
    folder outside the run. Setting the directory up front avoids it."""
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(log_dir)
    return callback


def save_model_atomically(model, tokenizer, model_dir: Path, padding_side: str | None = None) -> None:
    """Save model + tokenizer through a temp dir and a rename, so a crash never leaves half a
    model under ``model_dir`` (a later stage would load it, or fail on it, without knowing).

    ``padding_side``: set on the tokenizer before saving, for models whose readers depend on it
    (reward models and PPO policies are saved with ``right``); None leaves it as it is."""
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def save_trained_model(trainer, tokenizer, model_dir: Path, merge: bool, padding_side: str | None = None) -> None:
    """Save a transformers/TRL trainer's model to ``model_dir`` (main process only; every process
    must call it, since it waits for all of them first so no rank is still writing a checkpoint).

    ``merge``: fold LoRA adapters into the base weights, giving a plain model that later stages load
    without PEFT. The merge goes into a copy, so the trainer's model keeps its adapters: a stage may
    still evaluate it, or save the adapters alone afterwards (reward with ``lora.merge=false``)."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if merge:
        model = copy.deepcopy(model).merge_and_unload()
    save_model_atomically(model, tokenizer, model_dir, padding_side)


def transformer_blocks(model):
    """The model's list of transformer blocks (the ``nn.ModuleList`` as long as ``num_hidden_layers``)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {n} transformer blocks found; set trainable_layers: null")


def freeze_lower_layers(model, trainable_layers: int | None) -> dict:
    """Train only the top ``trainable_layers`` transformer blocks (plus the final norm and any new
    head); the embeddings and the blocks below stay frozen. Backpropagation then stops at the
    lowest trainable block, which roughly halves the cost of a step on a small model, and a small
    preference set has fewer parameters to overfit. ``None`` trains everything.

    Returns ``{"trainable_layers", "total_layers", "trainable_parameters", "total_parameters"}``."""
    blocks = transformer_blocks(model) if trainable_layers is not None else None
    if blocks is not None:
        if not 1 <= trainable_layers <= len(blocks):
            raise ValueError(f"trainable_layers: expected 1..{len(blocks)} (the model's blocks), got {trainable_layers}")
        keep = {id(p) for block in list(blocks)[len(blocks) - trainable_layers:] for p in block.parameters()}
        below = {id(p) for block in list(blocks)[:len(blocks) - trainable_layers] for p in block.parameters()}
        embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
        for p in model.parameters():
            if id(p) in below or (id(p) in embeddings and id(p) not in keep):
                p.requires_grad_(False)
    params = list(model.parameters())
    return {"trainable_layers": trainable_layers, "total_layers": model.config.num_hidden_layers,
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params)}


def even_eval_batch_size(n_examples: int, batch_size: int) -> int:
    """The largest eval batch size up to ``batch_size`` that divides ``n_examples``.

    TRL's reward and DPO trainers report eval accuracy as the mean of per-batch means, which is
    the true accuracy only when every batch is the same size: 10 pairs in batches of 8 and 2 with
    4/8 and 2/2 right read 0.75, not 6/10."""
    if n_examples <= 0:
        return batch_size
    return max(d for d in range(1, min(batch_size, n_examples) + 1) if n_examples % d == 0)


def score_only_labelled_tokens_on_cpu() -> bool:
    """Make TRL's fused LM head skip the positions without a label on CPU, as it does on CUDA.

    SFT and DPO compute their loss through TRL's fused LM head, which projects hidden states onto
    the vocabulary and takes log-softmax. With Triton (CUDA/XPU) it first keeps only the positions
    whose label is not -100; elsewhere it scores every position (so that compilers see fixed shapes)
    and zeroes the prompt and padding positions afterwards. On CPU there is nothing to recompile,
    and those positions are most of a DPO batch: scoring only the labelled ones made 8 DPO steps on
    the quickstart pairs 27% faster (73.6 s -> 53.4 s, reference pass included: 154 s -> 107 s)
    with the same eval metrics. The loss is the same sum over the same positions.

    Patches ``trl.trainer.utils._use_triton``, which TRL 1.16 reads there only to decide this,
    for CPU tensors only. Returns False, changing nothing, with a TRL that lacks the name (1.15
    keeps only labelled positions everywhere; 1.14 has no fused head).
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "alignkit_cpu_compaction", False):
        return original is not None

    def use_compaction(device):
        return device.type == "cpu" or original(device)

    use_compaction.alignkit_cpu_compaction = True
    trl_utils._use_triton = use_compaction
    return True
