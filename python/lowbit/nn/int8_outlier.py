"""Int8OutlierLinear: an nn.Linear holding bitsandbytes' LLM.int8() weight (int8 codes + SCB)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import ops
from .frozen import (KeepsScalesFp32, StateError, check_bias, check_buffer, check_features, check_positive_finite,
                     frozen_linear)

INV_127 = 7.874015718698502e-3  # bitsandbytes' 1 / 127


class Int8OutlierLinear(KeepsScalesFp32, nn.Linear):
    """Drop-in nn.Linear for LLM.int8(), as bitsandbytes' Linear8bitLt holds it: ``weight`` int8
    codes [out, in] (per-row absmax of the float16 weight, round(w * 127 / absmax)) and ``SCB``
    fp32 [out]. forward quantizes each token to int8, keeps the input columns holding any
    |x| >= threshold in floating point (threshold 0: pure int8) and runs lowbit's int8 x int8 ->
    int32 matmul; the result comes back in x's dtype. Gradients flow to x (the weight is frozen).
    """

    SCALE_BUFFERS = ("SCB",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        check_features(in_features, out_features, bias, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.threshold = F._check_threshold(threshold)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("SCB", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Int8OutlierLinear":
        """Quantize an nn.Linear's weight bit for bit as bitsandbytes' Int8Params does."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, Int8OutlierLinear):
            raise TypeError(f"from_linear expects a float nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, dtype=w.dtype)
        codes, scb, _ = F.int8_quantize_rowwise(w)
        module.weight.copy_(codes)
        module.SCB.copy_(scb)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(w.device)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return (self.weight.float() * self.SCB[:, None] * INV_127).to(dtype)

    def quantized_matmul(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        # the buffers were checked at construction / by check_state(): straight to the kernel
        return ops.int8_outlier_matmul(x, self.weight, self.SCB, self.threshold, bias)

    def check_state(self, name: Optional[str] = None) -> None:
        """Validate the buffers (after load_state_dict): ``weight`` int8 [out, in], ``SCB`` fp32
        [out] finite and >= 0, bias float [out], all on the CPU. Raises ValueError naming the
        buffer."""
        err = StateError(self, name)
        check_buffer(err, "weight", self.weight, (torch.int8,), (self.out_features, self.in_features))
        scb = check_buffer(err, "SCB", self.SCB, (torch.float32,), (self.out_features,))
        check_positive_finite(err, "SCB", scb, allow_zero=True)
        check_bias(err, self)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")
