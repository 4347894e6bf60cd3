"""FSDP2 on CPU: make the launcher's engine the one the stages really run under.

``accelerate launch`` with an FSDP config tells each process so through the environment
(``ACCELERATE_USE_FSDP``, ``FSDP_*``). On a machine without GPUs accelerate 1.x ignores it and the
processes form a plain gloo group (``MULTI_CPU``: DDP). Yet PyTorch's FSDP2 (``fully_shard``) runs
on CPU over gloo, and testing the sharded path on CPU catches the bugs that would otherwise first
show on a GPU cluster (weights left on the meta device, sharded state dicts saved as they are). So
:func:`prepare_processes`, run by the CLI in each process before any stage, makes every accelerate
state built afterwards in the process (PPO's ``Accelerator``, each TRL trainer's) take FSDP on CPU
when the launcher asked for FSDP: configs/accelerate/fsdp_cpu.yaml is such a launch.

Generation splits across processes too: :func:`my_batches` gives this process its share of a
stage's numbered batches (batch b to process b mod N) and :func:`gather_by_index` brings every
process's results back to all of them, in order. Each batch is seeded by its number, so N
processes write the same replies as one (candidates, eval).

DeepSpeed needs nothing here: with DeepSpeed installed, accelerate runs it on CPU through
DeepSpeed's own CPU accelerator. A single process, or any GPU machine, is left alone.
docs/distributed.md says what is tested with which engine.
"""

from __future__ import annotations

import os

from typing import Any

from alignkit.errors import AlignkitError



def env_flag(name: str) -> bool:
    """An accelerate launcher's boolean environment variable (ACCELERATE_USE_FSDP, ...)."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def prepare_processes() -> None:
    """On CPU, under a launcher that asked for FSDP: let accelerate run FSDP2 (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is this process's GPU
        return  # accelerate handles every engine on GPUs itself
    if env_flag("ACCELERATE_USE_FSDP"):
        _let_fsdp_run_on_cpu()


def end_processes() -> None:
    """Leave the process group, if this process joined one (torch warns at exit otherwise)."""
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _let_fsdp_run_on_cpu() -> None:
    """Every ``AcceleratorState`` built from now on in this process (ours, and the one each TRL
    trainer builds after its arguments reset accelerate's state) takes FSDP where accelerate would
    have fallen back to a plain CPU group; the plugin is the one accelerate built from the
    launcher's ``FSDP_*`` variables."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "alignkit_fsdp_on_cpu", False):
        return
    build_state = AcceleratorState.__init__

    def build_state_with_fsdp(self, *args, **kwargs):
        build_state(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
            if plugin.fsdp_version != 2:
                raise AlignkitError("FSDP on CPU runs FSDP2 only: set fsdp_version: 2 in the accelerate config")
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin

    build_state_with_fsdp.alignkit_fsdp_on_cpu = True
    AcceleratorState.__init__ = build_state_with_fsdp



def _joined() -> bool:
    """Join the launcher's process group if no stage did yet; False when this process runs alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def my_batches(n_batches: int) -> list[int]:
    """The batch numbers this process generates: all of them alone, every N-th of them when a
    launcher started N processes."""
    if not _joined():
        return list(range(n_batches))
    import torch.distributed as dist

    return list(range(dist.get_rank(), n_batches, dist.get_world_size()))


def wait_for_all() -> None:
    """A barrier across the launcher's processes (nothing when alone)."""
    if _joined():
        import torch.distributed as dist

        dist.barrier()


def gather_by_index(mine: dict[int, Any]) -> dict[int, Any]:
    """Every process's ``{batch number: result}`` merged, on every process (a collective: all
    processes call it); this process's own dict when it runs alone."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, mine)
    return {b: result for part in parts for b, result in part.items()}
