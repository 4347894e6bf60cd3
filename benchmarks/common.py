"""What every benchmark shares: the GPU's peak bf16 FLOP/s for model FLOPs utilisation (MFU).

Scripts run as ``python benchmarks/NAME.py`` find this module beside them.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "A10": 125e12,
                   "L4": 121e12, "4090": 165e12}


def peak_flops() -> float | None:
    """Peak bf16 FLOP/s of the current CUDA device, or None (CPU, or a GPU not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
