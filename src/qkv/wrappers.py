"""The model inside the wrappers training puts around it: DistributedDataParallel keeps it in
`.module`, torch.compile's OptimizedModule in `._orig_mod`. Checkpoints, exports and training
state all read and write the inner model, so its parameter names carry no wrapper prefix."""

from __future__ import annotations

import torch.nn as nn


def unwrap(model: nn.Module) -> nn.Module:
    """`model` without its DDP and torch.compile wrappers, nested in either order."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
