"""What AWQ and SmoothQuant share: the (smooth layer -> balance layers) pairs they scale, and
folding per-channel scales into them so the float model computes the same function."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..targets import matches


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def architecture_mappings(model: nn.Module, table: Dict[str, list]) -> Optional[list]:
    """The default mappings `table` holds for the model's architecture (config.architectures or
    its class name), None when it has none."""
    archs = list(getattr(model.config, "architectures", None) or []) + [type(model).__name__]
    return next((table[a] for a in archs if a in table), None)


def nearest_balance_layers(patterns: Sequence[str], smooth_name: str, modules: Dict[str, nn.Module]) -> List[str]:
    """For each pattern, the matching modules nearest smooth_name (longest common name prefix)."""
    names = []
    for pattern in patterns:
        found = [n for n, m in modules.items() if n != smooth_name and matches(pattern, n, m)]
        if found:
            best = max(_common_prefix(n, smooth_name) for n in found)
            names += [n for n in found if _common_prefix(n, smooth_name) == best]
    return names


def output_width(module: nn.Module) -> Optional[int]:
    """Output channels of a Linear or of a norm with a per-channel weight; None otherwise."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return None


@torch.no_grad()
def fold_scales(smooth: nn.Module, balance: Sequence[nn.Linear], scales: torch.Tensor) -> None:
    """smooth's output channels / s, the balance layers' input columns * s (in fp32)."""
    s = scales.float()
    if isinstance(smooth, nn.Linear):
        smooth.weight.copy_(smooth.weight.float() / s[:, None])
    else:
        smooth.weight.copy_(smooth.weight.float() / s)
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.copy_(smooth.bias.float() / s)
    for b in balance:
        b.weight.copy_(b.weight.float() * s[None, :])
