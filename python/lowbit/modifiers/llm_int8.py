"""LLMInt8Modifier: LLM.int8() (bitsandbytes' load_in_8bit), no calibration data needed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import torch
from torch import nn

from .. import functional as F
from ..nn.int8_outlier import Int8OutlierLinear
from .base import Modifier, in_layer

logger = logging.getLogger("lowbit")


@dataclass(frozen=True)
class LLMInt8Scheme:
    """How one Linear is stored in bitsandbytes' 8-bit format."""

    threshold: float = 6.0


class LLMInt8Modifier(Modifier):
    """Replace the targeted nn.Linear layers by Int8OutlierLinear: int8 weights with per-row
    scales (bitsandbytes' CB / SCB, bit for bit), activations quantized per token at run time,
    input columns holding any |x| >= threshold kept in floating point (threshold 0: pure int8).
    The checkpoint is transformers' load_in_8bit layout. Given calibration data, oneshot logs
    each layer's fraction of outlier input dimensions (kept in `outlier_fractions`)."""

    def __init__(self, threshold: float = 6.0, targets: Union[str, Sequence[str]] = "Linear",
                 ignore: Union[None, str, Sequence[str]] = None):
        super().__init__(targets, ignore)
        self.scheme = LLMInt8Scheme(F._check_threshold(threshold))
        self.collects_statistics = self.scheme.threshold > 0
        self.outlier_fractions: Dict[str, float] = {}
        self._seen: Dict[str, torch.Tensor] = {}

    def plan(self, model: nn.Module, calibrated: bool = False) -> Dict[str, Tuple[nn.Module, LLMInt8Scheme]]:
        return {n: (m, self.scheme) for n, m in self.select_linear(model).items()}

    def calibration_hook(self, name: str, module: nn.Module):
        if self.scheme.threshold == 0:
            return None

        def record(mod, args):
            x = args[0].detach()
            hit = (x.reshape(-1, x.shape[-1]).abs() >= self.scheme.threshold).any(0)
            self._seen[name] = hit if name not in self._seen else self._seen[name] | hit

        return module.register_forward_pre_hook(record)

    def reduce_statistics(self, group, prefix: str) -> None:
        """The outlier dimensions seen on any rank."""
        for name in in_layer(self._seen, prefix):
            self._seen[name] = group.max_(self._seen[name].to(torch.uint8), f"{name} outliers").bool()

    def quantize_module(self, name: str, module: nn.Module, scheme: LLMInt8Scheme) -> nn.Module:
        if name in self._seen:
            seen = self._seen.pop(name)
            self.outlier_fractions[name] = seen.float().mean().item()
            logger.info("%s: %d of %d input dimensions held outliers (|x| >= %g) on the calibration data (%.2f%%)",
                        name, int(seen.sum()), seen.numel(), scheme.threshold, 100 * self.outlier_fractions[name])
        return Int8OutlierLinear.from_linear(module, scheme.threshold)

    def recipe_args(self) -> dict:
        return {"threshold": self.scheme.threshold, "targets": self.targets, "ignore": self.ignore}
