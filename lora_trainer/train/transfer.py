"""Host-to-device copies that do not stall the host.

``tensor.to("cuda")`` from ordinary (pageable) memory waits for the copy to finish, which waits for every kernel
queued before it: a host sync per call. The step's small CPU-made tensors (noise drawn from a CPU generator for
reproducibility, timesteps, the noise schedule) go through pinned memory with ``non_blocking=True`` instead, so the
host keeps queueing work. On the CPU this is the plain ``.to`` (the same tensor).
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
