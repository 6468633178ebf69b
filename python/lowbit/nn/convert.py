"""Swap the nn.Linear modules of a model for quantized lowbit modules."""

from __future__ import annotations

from typing import Iterable, Union

from torch import nn

from ..schemes import QuantizationArgs, QuantizationScheme
from .packed_linear import PackedLinear


def quantize_linears_(model: nn.Module, scheme: Union[str, QuantizationScheme, QuantizationArgs, dict] = "W4A16",
                      ignore: Iterable[str] = ("lm_head",)) -> int:
    """Replace, in place, every nn.Linear whose name is not in `ignore` with a PackedLinear
    (round-to-nearest). Returns how many were replaced."""
    ignore = set(ignore)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name not in ignore]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear.from_linear(linear, scheme))
    return len(targets)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
