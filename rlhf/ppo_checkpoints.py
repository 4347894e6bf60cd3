"""PPO checkpoints: ``<run>/checkpoints/step-N/`` with the trainable weights of the policy and the
value model, the trainer state (optimisers, schedulers, KL controller, step) and every rank's RNG
states, so that a resumed run continues exactly where the killed one was.

A checkpoint is written to a temporary directory and renamed; ``trainer_state.pt`` marks a complete
one (``alignkit.training.complete_checkpoints``), so a half-written checkpoint is never used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from alignkit.runstore import atomic_write_text
from alignkit.training import complete_checkpoints

log = logging.getLogger("alignkit.ppo")

PREFIX, MARKER = "step", "trainer_state.pt"


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict:
    """The weights that training changes (all of them, or the LoRA adapters)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict, what: str) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint {what}: does not match the model (missing {missing[:3]}, unexpected {unknown[:3]}); "
                         "was it written with another config?")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def write_checkpoint(root: Path, step: int, accelerator, models: dict[str, torch.nn.Module], trainer_state: dict,
                     keep: int) -> None:
    """Write ``root/step-N`` atomically (every rank must call it): every rank adds its RNG state to
    a temp directory (under FSDP also its shards: ``<name>_rank<r>.pt`` and ``state_rank<r>.pt``),
    then rank 0 writes ``<name>.pt`` for each of ``models`` (their trainable weights; not under
    FSDP) and ``trainer_state.pt``, renames the directory and keeps the newest ``keep``
    checkpoints (0: all)."""
    final, tmp = root / f"{PREFIX}-{step:06d}", root / f".tmp-{PREFIX}-{step:06d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if accelerator.is_fsdp2:  # each rank holds its own shards of the weights and optimiser states
        for name, model in models.items():
            torch.save(trainable_state(model), tmp / f"{name}_rank{rank}.pt")
        torch.save(trainer_state, tmp / f"state_rank{rank}.pt")
    accelerator.wait_for_everyone()
    if main:
        if not accelerator.is_fsdp2:
            for name, model in models.items():
                torch.save(trainable_state(model), tmp / f"{name}.pt")
        torch.save(trainer_state, tmp / MARKER)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(root, PREFIX, MARKER)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("ppo: checkpoint %s", final)
    accelerator.wait_for_everyone()


def read_checkpoint(ckpt: Path, accelerator, models: dict[str, torch.nn.Module]) -> dict:
    """What :func:`write_checkpoint` wrote, back into ``models`` (their trainable weights) and this
    rank's RNG; returns the trainer state (under FSDP, this rank's own). A checkpoint written by
    another number of processes, or with or without FSDP, is refused: its shards would not fit."""
    state = torch.load(ckpt / MARKER, weights_only=False)
    sharded, world = accelerator.is_fsdp2, accelerator.num_processes
    if state["world_size"] != world or state.get("sharded", False) != sharded:
        raise ValueError(f"{ckpt}: written by {state['world_size']} processes{' under FSDP' if state.get('sharded') else ''}, "
                         f"resumed with {world}{' under FSDP' if sharded else ''}; resume with the same processes and engine")
    rank = f"_rank{accelerator.process_index}" if sharded else ""  # under FSDP each rank reads its own shards
    if sharded:
        state = torch.load(ckpt / f"state{rank}.pt", weights_only=False)
    for name, model in models.items():
        load_trainable_state(model, torch.load(ckpt / f"{name}{rank}.pt", weights_only=False), name)
    set_rng_state(torch.load(ckpt / f"rng_rank{accelerator.process_index}.pt", weights_only=False))
    return state


def replicas_in_sync(model: torch.nn.Module, accelerator) -> bool:
    """Whether every rank's copy of ``model``'s trainable weights is the same. DDP keeps replicas
    identical; this checks it rather than trusting it (a mismatch means a synchronisation bug)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    sums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).cpu()
    return bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9))


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` with the rows of steps ``<= step`` only: a killed run logged
    steps after its last checkpoint (all of them, when it died before the first), which the
    resuming run does again; a line torn by a crash or a full disk is dropped, not fatal."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line)
    atomic_write_text(path, "".join(r + "\n" for r in rows))
