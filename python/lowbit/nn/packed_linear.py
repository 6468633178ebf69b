"""PackedLinear: an nn.Linear whose weight is stored packed in compressed-tensors' layout."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import ops
from ..schemes import QuantizationArgs, QuantizationScheme, resolve_scheme
from .frozen import (FLOATS, StateError, check_bias, check_buffer, check_features, check_positive_finite,
                     check_range, frozen_linear)


class PackedLinear(nn.Linear):
    """Integer-quantized drop-in nn.Linear; forward runs lowbit's fused unpack + matmul kernel,
    and passes gradients to its input (the weight is frozen: LoRA adapters train on top).

    Buffers use compressed-tensors' names and shapes, so the state dict is what the
    pack-quantized format stores: ``weight_packed`` int32 [out, ceil(in*b/32)],
    ``weight_scale`` [out, groups] (or [out, 1] per channel), ``weight_shape`` int64 [2],
    ``weight_zero_point`` int8 [out, groups] when asymmetric (packed along dim 0 only on
    disk), and ``weight_g_idx`` int32 [in] (each column's group) with GPTQ's actorder "group".
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scheme: Union[str, QuantizationScheme, QuantizationArgs, dict] = "W4A16",
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        check_features(in_features, out_features, bias, dtype)
        resolved = resolve_scheme(scheme)
        self.input_args = check_activations(resolved.input_activations)
        self.args = resolved.weights
        if self.args.type != "int":
            raise ValueError("PackedLinear holds integer weights; FP8 (type 'float') weights go in Fp8Linear")
        if self.args.strategy == "tensor":
            raise ValueError("PackedLinear stores per-group or per-channel scales; use strategy 'group' or 'channel'")
        self.in_features, self.out_features = in_features, out_features
        bits = self.args.num_bits
        groups = in_features // self.args.group_size if self.args.strategy == "group" else 1
        if self.args.strategy == "group" and in_features % self.args.group_size:
            raise ValueError(f"group_size {self.args.group_size} does not divide in_features {in_features}")
        self.register_buffer("weight_packed", torch.zeros(out_features, (in_features * bits + 31) // 32, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        if self.args.symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8))
        if self.args.actorder == "group":
            self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32))
        else:
            self.weight_g_idx = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Union[str, QuantizationScheme, QuantizationArgs, dict] = "W4A16",
                    importance: Optional[Tensor] = None) -> "PackedLinear":
        """Quantize an nn.Linear (round-to-nearest with the scheme's observer; importance: E[x^2]
        per input column for imatrix_mse) and pack it."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, PackedLinear):
            raise TypeError(f"from_linear expects a float nn.Linear, got {type(linear).__name__}")
        a = resolve_scheme(scheme).weights
        codes, scale, zero = F.quantize(linear.weight.detach(), a.num_bits, a.symmetric, a.strategy, a.group_size,
                                        a.weight_observer, importance=importance)
        return cls.from_codes(linear, scheme, codes, scale, zero)

    @classmethod
    def from_codes(cls, linear: nn.Linear, scheme: Union[str, QuantizationScheme, QuantizationArgs, dict],
                   codes: Tensor, scale: Tensor, zero_point: Tensor, g_idx: Optional[Tensor] = None) -> "PackedLinear":
        """Pack codes computed elsewhere (e.g. by GPTQ) for `linear`'s shape and bias."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, PackedLinear):
            raise TypeError(f"from_codes expects a float nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, dtype=w.dtype)
        F._check_tensor(codes, "codes")
        if tuple(codes.shape) != (module.out_features, module.in_features):
            raise ValueError(f"codes must have the Linear's shape {(module.out_features, module.in_features)}, "
                             f"got {tuple(codes.shape)}")
        module.weight_packed.copy_(F.pack(codes, module.args.num_bits))
        F._check_tensor(scale, "scale")
        if scale.numel() == 1 and module.weight_scale.numel() == 1:
            scale = scale.reshape(module.weight_scale.shape)
        module.weight_scale.copy_(_exact(scale, module.weight_scale, "scale"))
        if module.weight_zero_point is not None:
            if zero_point is None:
                raise ValueError("an asymmetric scheme needs zero_point")
            F._check_tensor(zero_point, "zero_point")
            module.weight_zero_point.copy_(_exact(zero_point.reshape(scale.shape) if zero_point.numel() == 1
                                                  else zero_point, module.weight_zero_point, "zero_point"))
        if module.weight_g_idx is not None:
            if g_idx is None:
                raise ValueError("actorder 'group' needs g_idx (each input column's group)")
            F._check_tensor(g_idx, "g_idx")
            module.weight_g_idx.copy_(_exact(g_idx, module.weight_g_idx, "g_idx"))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        module.check_state()
        return module.to(w.device)

    @property
    def weight(self) -> Tensor:
        """The packed codes, as bitsandbytes' Linear4bit.weight is: tools that read a Linear's
        weight (PEFT) find its device, and an integer dtype that marks it quantized."""
        return self.weight_packed

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        codes = F.unpack(self.weight_packed, self.args.num_bits, (self.out_features, self.in_features))
        if self.weight_g_idx is None:
            return F.dequantize(codes, self.weight_scale, self.weight_zero_point, dtype=dtype)
        # Groups scattered over the columns: gather each column's parameters.
        g = self.weight_g_idx.long()
        zero = self.weight_zero_point[:, g].float() if self.weight_zero_point is not None else 0.0
        return ((codes.float() - zero) * self.weight_scale[:, g].float()).to(dtype or self.weight_scale.dtype)

    def check_state(self, name: Optional[str] = None) -> None:
        """Validate the buffers (after load_state_dict): dtypes, exact shapes, CPU, and values:
        weight_scale finite and > 0, weight_zero_point on the bits' grid, weight_shape equal
        to [out, in], weight_g_idx in [0, groups). Raises ValueError naming the buffer."""
        err = StateError(self, name)
        out, inp, bits = self.out_features, self.in_features, self.args.num_bits
        groups = inp // self.args.group_size if self.args.strategy == "group" else 1
        check_buffer(err, "weight_packed", self.weight_packed, (torch.int32,), (out, (inp * bits + 31) // 32))
        scale = check_buffer(err, "weight_scale", self.weight_scale, FLOATS, (out, groups))
        check_positive_finite(err, "weight_scale", scale)
        shape = check_buffer(err, "weight_shape", self._buffers.get("weight_shape"),
                             (torch.int64, torch.int32), (2,))
        if shape.tolist() != [out, inp]:
            raise err("weight_shape", f"is {shape.tolist()}, but the layer is [{out}, {inp}] (out, in)")
        if self.weight_zero_point is not None:
            zero = check_buffer(err, "weight_zero_point", self.weight_zero_point, (torch.int8,), (out, groups))
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            check_range(err, "weight_zero_point", zero, lo, hi, f"the {bits}-bit grid")
        if self.weight_g_idx is not None:
            g_idx = check_buffer(err, "weight_g_idx", self.weight_g_idx, (torch.int32, torch.int64), (inp,))
            check_range(err, "weight_g_idx", g_idx, 0, groups - 1, f"group indices of {groups} groups")
        check_bias(err, self)

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(self, x)

    def quantized_matmul(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        """x @ W^T (+ bias) in x's dtype (x quantized per token first with WnA8)."""
        if self.input_args is not None:
            x2d = x.reshape(-1, self.in_features)
            x_scale, _ = ops.quant_params(x2d, 8, True, self.in_features)
            x = ops.fake_quantize(x2d, x_scale, None, 8, self.in_features).reshape(x.shape)
        buffers = self._buffers  # read directly: Module.__getattr__ costs about 0.5 us a buffer, every call
        if buffers.get("weight_g_idx") is not None:  # scattered groups: no fused kernel, a dense matmul
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype))
        scale = buffers["weight_scale"]
        return ops.packed_linear(x, buffers["weight_packed"], scale, buffers.get("weight_zero_point"),
                                 self.args.num_bits, self.in_features // scale.shape[1], bias)

    def extra_repr(self) -> str:
        s = self.args
        layout = f"group_size={s.group_size}" if s.strategy == "group" else s.strategy
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={s.num_bits}, symmetric={s.symmetric}, {layout}"
                f"{', int8 activations per token' if self.input_args is not None else ''}")


def check_activations(args: Optional[QuantizationArgs]) -> Optional[QuantizationArgs]:
    """The input-activation args PackedLinear runs: none (WnA16) or dynamic symmetric int8 per
    token (WnA8, compressed-tensors' W4A8: x is quantized per token, then meets the packed
    weights in the fused kernel)."""
    if args is not None and not (args.type == "int" and args.num_bits == 8 and args.symmetric and args.dynamic
                                 and args.strategy == "token"):
        raise ValueError("with packed integer weights lowbit quantizes activations dynamically per token to symmetric "
                         f"int8 (W4A8); got input_activations {args}")
    return args


def _exact(t: Tensor, buffer: Tensor, name: str) -> Tensor:
    if tuple(t.shape) != tuple(buffer.shape):
        raise ValueError(f"{name} must have shape {tuple(buffer.shape)} for this layer, got {tuple(t.shape)}")
    if t.dtype.is_complex or t.dtype == torch.bool or t.dtype.is_floating_point != buffer.dtype.is_floating_point:
        raise TypeError(f"{name} must be {buffer.dtype}, got {t.dtype}")
    return t
