"""FSDP2 on CPU: make the launcher's engine the one the stages really run under.

``accelerate launch`` with an FSDP config tells each process so through the environment
(``ACCELERATE_USE_FSDP``, ``FSDP_*``). On a machine without GPUs accelerate 1.x ignores it and the
processes form a plain gloo group (``MULTI_CPU``: DDP). Yet PyTorch's FSDP2 (``fully_shard``) runs
on CPU over gloo, and testing the sharded path on CPU catches the bugs that would otherwise first
show on a GPU cluster (weights left on the meta device, sharded state dicts saved as they are). So
:func:`prepare_processes`, run by the CLI in each process before any stage, makes every accelerate
state built afterwards in the process (PPO's ``Accelerator``, each TRL trainer's) take FSDP on CPU
when the launcher asked for FSDP: configs/accelerate/fsdp_cpu.yaml is such a launch.

DeepSpeed needs nothing here: with DeepSpeed installed, accelerate runs it on CPU through
DeepSpeed's own CPU accelerator. A single process, or any GPU machine, is left alone.
docs/distributed.md says what is tested with which engine.
"""

from __future__ import annotations

import os

from alignkit.errors import AlignkitError



def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def prepare_processes() -> None:
    """On CPU, under a launcher that asked for FSDP: let accelerate run FSDP2 (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if torch.cuda.is_available():
        return  # accelerate handles every engine on GPUs itself
    if _flag("ACCELERATE_USE_FSDP"):
        _let_fsdp_run_on_cpu()


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

