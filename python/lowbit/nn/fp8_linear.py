"""Fp8Linear: FP8 (E4M3) weights in compressed-tensors' float-quantized layout, run by lowbit's
fused decode + matmul kernel; activations FP8-quantized per token, per token group, with a
calibrated static scale, or not at all (weights only)."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..schemes import QuantizationArgs, QuantizationScheme, resolve_scheme
from .frozen import (FLOATS, KeepsScalesFp32, StateError, check_bias, check_buffer, check_features,
                     check_positive_finite, frozen_linear)


def weight_blocks(args: QuantizationArgs, out_features: int, in_features: int) -> Tuple[int, int]:
    """(rows, cols) of the weight tile that shares one scale."""
    if args.strategy == "tensor":
        return out_features, in_features
    if args.strategy == "channel":
        return 1, in_features
    if args.strategy == "block":
        return args.block_structure
    raise ValueError(f"FP8 weights are quantized per tensor, per channel or in blocks, not {args.strategy!r}")


def check_fp8_scheme(scheme: QuantizationScheme, out_features: int, in_features: int) -> None:
    """ValueError unless Fp8Linear runs `scheme` on an [out, in] weight."""
    w, a = scheme.weights, scheme.input_activations
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"FP8 schemes need torch's float8 dtypes (torch >= 2.1); this torch {torch.__version__} "
                         "has none: upgrade torch or choose an integer scheme (W8A8, W8A16)")
    if w.type != "float":
        raise ValueError(f"Fp8Linear runs FP8 weights (type 'float'), got type {w.type!r}")
    weight_blocks(w, out_features, in_features)
    if w.strategy == "block" and in_features % w.block_structure[1]:
        raise ValueError(f"block_structure {list(w.block_structure)}: {w.block_structure[1]} does not divide the "
                         f"{in_features} input columns; use a block width that divides them, or strategy 'channel'")
    if a is None:
        return
    if a.type != "float":
        raise ValueError("Fp8Linear quantizes activations to FP8 (type 'float'); integer activations go with "
                         "integer weights (W8A8)")
    if (a.strategy, a.dynamic) not in (("token", True), ("group", True), ("tensor", False)):
        raise ValueError(f"FP8 activations are dynamic per token / per token group or static per tensor, got "
                         f"strategy {a.strategy!r} with dynamic={a.dynamic}")
    if a.strategy == "group" and in_features % a.group_size:
        raise ValueError(f"activation group_size {a.group_size} does not divide the {in_features} input columns")


class Fp8Linear(KeepsScalesFp32, nn.Module):
    """compressed-tensors' float-quantized layout: ``weight`` float8_e4m3fn [out, in],
    ``weight_scale`` in the model's dtype, [1] per tensor, [out, 1] per channel or
    [ceil(out / rows), in / cols] per block; ``input_scale`` [1] for static activations.
    weight = float(code) * scale of its tile (E4M3 stays E4M3 through model.to(dtype))."""

    SCALE_BUFFERS = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scheme: Union[str, QuantizationScheme, dict] = "FP8_DYNAMIC", dtype: torch.dtype = torch.float32):
        super().__init__()
        check_features(in_features, out_features, bias, dtype)
        scheme = resolve_scheme(scheme)
        check_fp8_scheme(scheme, out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.args, self.input_args = scheme.weights, scheme.input_activations
        self.block = weight_blocks(self.args, out_features, in_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(self._scale_shape(), dtype=dtype))
        static = self.input_args is not None and not self.input_args.dynamic
        if static:
            self.register_buffer("input_scale", torch.ones(1, dtype=dtype))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def _scale_shape(self) -> Tuple[int, ...]:
        if self.args.strategy == "tensor":
            return (1,)
        return (math.ceil(self.out_features / self.block[0]), self.in_features // self.block[1])

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Union[str, QuantizationScheme, dict] = "FP8_DYNAMIC",
                    input_scale: Optional[Tensor] = None) -> "Fp8Linear":
        """E4M3 weights of a float nn.Linear (scale = absmax / 448 per tile, round to nearest even,
        as compressed-tensors quantizes); static activations need their calibrated input_scale."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, Fp8Linear):
            raise TypeError(f"from_linear expects a float nn.Linear, got {type(linear).__name__}")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                     dtype=linear.weight.dtype)
        w = linear.weight.detach()
        scale = ops.fp8_scales(w, *module.block)
        return module._fill(linear, ops.fp8_quantize(w, scale, *module.block), scale, input_scale)

    @classmethod
    def from_codes(cls, linear: nn.Linear, scheme, codes: Tensor, scale: Tensor,
                   input_scale: Optional[Tensor] = None) -> "Fp8Linear":
        """The layer holding E4M3 codes computed elsewhere (GPTQ) with their tile scales."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                     dtype=linear.weight.dtype)
        return module._fill(linear, codes, scale, input_scale)

    def _fill(self, linear: nn.Linear, codes: Tensor, scale: Tensor, input_scale: Optional[Tensor]) -> "Fp8Linear":
        self.weight.copy_(codes)
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        if self.input_scale is not None:
            if input_scale is None:
                raise ValueError("a static activation scale (input_activations dynamic: false) is calibrated on "
                                 "data: pass input_scale, or run the scheme through oneshot with a dataset")
            self.input_scale.copy_(input_scale.reshape(1))
        elif input_scale is not None:
            raise ValueError("input_scale given, but the scheme's activations are dynamic or not quantized")
        if linear.bias is not None:
            self.bias.data.copy_(linear.bias.detach())
        self.check_state()
        return self.to(linear.weight.device)

    def _scale_2d(self) -> Tensor:
        return self.weight_scale.reshape(1, 1) if self.args.strategy == "tensor" else self.weight_scale

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return ops.fp8_dequantize(self.weight, self._scale_2d(), *self.block, dtype or self.weight_scale.dtype)

    def check_state(self, name: Optional[str] = None) -> None:
        """Validate the buffers (after load_state_dict): dtypes, exact shapes, CPU, finite
        E4M3 codes, scales finite and > 0. Raises ValueError naming the buffer."""
        err = StateError(self, name)
        w = check_buffer(err, "weight", self.weight, (torch.float8_e4m3fn,), (self.out_features, self.in_features))
        if w.numel() and not torch.isfinite(w.float()).all():
            raise err("weight", "holds NaN codes (E4M3 0x7F / 0xFF)")
        scale = check_buffer(err, "weight_scale", self.weight_scale, FLOATS, self._scale_shape())
        check_positive_finite(err, "weight_scale", scale)
        if self.input_scale is not None:
            check_positive_finite(err, "input_scale", check_buffer(err, "input_scale", self.input_scale, FLOATS, (1,)))
        check_bias(err, self)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(self, x)

    def quantize_input(self, x: Tensor) -> Tensor:
        """x as compressed-tensors' forward sees it: FP8-quantized and dequantized per token, per
        token group or with the static scale; unchanged without activation quantization."""
        a = self.input_args
        if a is None or x.numel() == 0:
            return x
        x2d = x.reshape(-1, self.in_features)
        if a.dynamic:
            cols = self.in_features if a.strategy == "token" else a.group_size
            return ops.fp8_fake_quantize(x2d, ops.fp8_scales(x2d, 1, cols), 1, cols).reshape(x.shape)
        scale = self.input_scale.to(x.dtype).reshape(1, 1)
        return ops.fp8_fake_quantize(x2d, scale, x2d.shape[0], self.in_features).reshape(x.shape)

    def quantized_matmul(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        x = self.quantize_input(x)
        shape = x.shape
        y = ops.fp8_linear(x.reshape(-1, self.in_features), self.weight, self._scale_2d(), *self.block, bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = {"tensor": "per tensor", "channel": "per channel"}.get(self.args.strategy,
                                                                          f"blocks {list(self.block)}")
        a = self.input_args
        acts = ("weights only" if a is None else "static activation scale" if not a.dynamic
                else f"dynamic activations per {'token' if a.strategy == 'token' else f'{a.group_size} columns'}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"FP8 E4M3 {layout}, {acts}")
