"""BnB4bitModifier: bitsandbytes' 4-bit NF4 / FP4 quantization (QLoRA), no calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn.nf4_linear import NF4Linear, as_dtype
from .base import Modifier


@dataclass(frozen=True)
class BnB4bitScheme:
    """How one Linear is stored in bitsandbytes' 4-bit format (compute_dtype by name, or None
    for the weight's own dtype)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: Optional[str] = None


# Preset recipe names: "NF4" is QLoRA's setting (NF4 with double quantization); "FP4" is
# transformers' load_in_4bit default.
BNB_PRESETS = {"NF4": BnB4bitScheme("nf4", 64, True), "FP4": BnB4bitScheme("fp4", 64, False)}


class BnB4bitModifier(Modifier):
    """Quantize the targeted nn.Linear layers to NF4Linear, bit for bit as bitsandbytes'
    quantize_4bit (and transformers' BitsAndBytesConfig(load_in_4bit=True)) would: blocks of
    `blocksize` weights along each row, `quant_type` "nf4" or "fp4", optional double
    quantization of the block scales. compute_dtype: the dtype the matmul takes its input in
    (bnb_4bit_compute_dtype; None keeps the input's). The checkpoint is bitsandbytes' layout."""

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 compute_dtype: Union[None, str, torch.dtype] = None, targets: Union[str, Sequence[str]] = "Linear",
                 ignore: Union[None, str, Sequence[str]] = None):
        super().__init__(targets, ignore)
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 32 <= blocksize <= 4096 \
                or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
        if not isinstance(double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
        dtype = as_dtype(compute_dtype, "compute_dtype")
        self.scheme = BnB4bitScheme(quant_type, blocksize, double_quant,
                                    None if dtype is None else str(dtype).replace("torch.", ""))

    def plan(self, model: nn.Module, calibrated: bool = False) -> Dict[str, Tuple[nn.Module, BnB4bitScheme]]:
        return {n: (m, self.scheme) for n, m in self.select_linear(model).items()}

    def quantize_module(self, name: str, module: nn.Module, scheme: BnB4bitScheme) -> nn.Module:
        return NF4Linear.from_linear(module, scheme.quant_type, scheme.blocksize, scheme.double_quant,
                                     scheme.compute_dtype)

    def recipe_args(self) -> dict:
        s = self.scheme
        return {"quant_type": s.quant_type, "blocksize": s.blocksize, "double_quant": s.double_quant,
                "compute_dtype": s.compute_dtype, "targets": self.targets, "ignore": self.ignore}
