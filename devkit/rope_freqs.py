"""RoPE frequencies in NextDiT's layout for the q/k/v kernel's tests and bench (pipeline/qkv_rope.py)."""
from __future__ import annotations

import torch


def rotations(angle: torch.Tensor) -> torch.Tensor:
    """Each pair's rotation by `angle` ([..., D/2]) as NextDiT's frequencies hold it: [..., D/2, 2, 2], the rows
    (cos, -sin) and (sin, cos)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
