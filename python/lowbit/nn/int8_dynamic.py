"""Int8DynamicLinear: W8A8 with int8 weights per output channel and int8 activations, quantized
at run time per token (dynamic) or with one calibrated scale (static, ``input_scale``); the
product runs as a real int8 x int8 -> int32 matmul."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import ops
from ..schemes import QuantizationScheme, resolve_scheme
from .frozen import (FLOATS, StateError, check_bias, check_buffer, check_features, check_positive_finite,
                     checked_call)


class Int8DynamicLinear(nn.Module):
    """compressed-tensors' int-quantized layout: ``weight`` int8 [out, in] and
    ``weight_scale`` [out, 1]; dynamic per-token activations carry no stored state, static
    ones (static_input=True) the calibrated ``input_scale`` [1]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 static_input: bool = False):
        super().__init__()
        check_features(in_features, out_features, bias, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=dtype))
        if static_input:
            self.register_buffer("input_scale", torch.ones(1, dtype=dtype))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @staticmethod
    def runs(scheme: Union[str, QuantizationScheme]) -> bool:
        """True for the schemes this layer runs: W8A8, symmetric int8 per-channel weights and
        symmetric int8 activations, dynamic per token or static per tensor."""
        scheme = resolve_scheme(scheme)
        w, a = scheme.weights, scheme.input_activations
        return (w.type == "int" and w.num_bits == 8 and w.strategy == "channel" and w.symmetric
                and a is not None and a.type == "int" and a.num_bits == 8 and a.symmetric
                and (a.strategy, a.dynamic) in (("token", True), ("tensor", False)))

    @classmethod
    def check_scheme(cls, scheme: Union[str, QuantizationScheme]) -> QuantizationScheme:
        """The scheme, if this layer runs it (W8A8), else a ValueError."""
        if not cls.runs(scheme):
            raise ValueError("Int8DynamicLinear implements W8A8: symmetric int8 per-channel weights and symmetric "
                             "int8 activations, dynamic per token or static per tensor, not "
                             f"{resolve_scheme(scheme)}")
        return resolve_scheme(scheme)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Union[str, QuantizationScheme] = "W8A8",
                    importance: Optional[Tensor] = None, input_scale: Optional[Tensor] = None) -> "Int8DynamicLinear":
        """Round-to-nearest int8 weights of a float nn.Linear (range from the scheme's observer;
        importance: E[x^2] per input column for imatrix_mse). Static activations need their
        calibrated input_scale."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, Int8DynamicLinear):
            raise TypeError(f"from_linear expects a float nn.Linear, got {type(linear).__name__}")
        scheme = cls.check_scheme(scheme)
        codes, scale, _ = F.quantize(linear.weight.detach(), 8, True, "channel", None, scheme.weights.weight_observer,
                                     importance=importance)
        return cls.from_codes(linear, codes, scale, input_scale=input_scale)

    @classmethod
    def from_codes(cls, linear: nn.Linear, codes: Tensor, scale: Tensor,
                   input_scale: Optional[Tensor] = None) -> "Int8DynamicLinear":
        """The layer holding given int8 weight codes [out, in] and per-channel scales [out, 1]
        (from GPTQ, for instance) in place of `linear`, whose bias it takes; input_scale: the
        static activation scale (one value), None for dynamic activations."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=weight.dtype,
                     static_input=input_scale is not None)
        module.weight.copy_(codes)
        module.weight_scale.copy_(scale.reshape(-1, 1))
        if input_scale is not None:
            if input_scale.numel() != 1:
                raise ValueError(f"input_scale must hold one value (a per-tensor scale), got shape "
                                 f"{tuple(input_scale.shape)}")
            module.input_scale.copy_(input_scale.reshape(1))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        module.check_state()
        return module.to(weight.device)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        dtype = dtype or self.weight_scale.dtype
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def check_state(self, name: Optional[str] = None) -> None:
        """Validate the buffers (after load_state_dict): ``weight`` int8 [out, in],
        ``weight_scale`` float [out, 1] finite and > 0, bias float [out], all on the CPU.
        Raises ValueError naming the buffer."""
        err = StateError(self, name)
        check_buffer(err, "weight", self.weight, (torch.int8,), (self.out_features, self.in_features))
        scale = check_buffer(err, "weight_scale", self.weight_scale, FLOATS, (self.out_features, 1))
        check_positive_finite(err, "weight_scale", scale)
        if self.input_scale is not None:
            check_positive_finite(err, "input_scale", check_buffer(err, "input_scale", self.input_scale, FLOATS, (1,)))
        check_bias(err, self)

    def forward(self, x: Tensor) -> Tensor:
        return checked_call(self, x, self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        # lowbit's one op: per-token (or static) int8 codes of x, the int8 GEMM, the rescale
        buffers = self._buffers  # read directly: Module.__getattr__ costs about 0.5 us a buffer, every call
        return ops.int8_dynamic_linear(x, buffers["weight"], buffers["weight_scale"], buffers.get("input_scale"),
                                       self._parameters.get("bias"))

    def extra_repr(self) -> str:
        acts = "dynamic per token" if self.input_scale is None else "static per tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"W8A8 ({acts})")
