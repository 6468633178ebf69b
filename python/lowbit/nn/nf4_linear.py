"""NF4Linear: an nn.Linear whose weight is stored as bitsandbytes' NF4 / FP4 codes (QLoRA)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import ops
from .frozen import (KeepsScalesFp32, StateError, check_bias, check_buffer, check_features,
                     check_positive_finite, frozen_linear)

DType = Union[None, str, torch.dtype]


def as_dtype(dtype: DType, name: str) -> Optional[torch.dtype]:
    """None, a torch float dtype, or its name ("bfloat16", "torch.float16")."""
    if dtype is None or isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if dtype is not None and resolved not in F.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {dtype!r}")
    return resolved


class NF4Linear(KeepsScalesFp32, nn.Linear):
    """Drop-in nn.Linear with a 4-bit weight, as bitsandbytes' Linear4bit holds it: the weight
    flattened row-major into blocks of `blocksize`, each scaled by its absmax and mapped to the
    nearest NF4 (or FP4) code, two codes per byte (``weight`` uint8 [(out*in + 1) // 2, 1]).

    Buffers: ``absmax`` fp32 [blocks]; with double quantization ``absmax`` holds 8-bit codes
    and ``nested_absmax`` / ``offset`` decode them. The block scales stay fp32 when the model
    is cast (model.to(torch.bfloat16) moves, never rounds them). forward runs lowbit's fused
    C++ kernel (in_features a multiple of blocksize, as in every transformers model; otherwise
    dequantize + F.linear); x is cast to `compute_dtype` first, the output back to x's dtype,
    as bitsandbytes does. Gradients flow to x (the weight is frozen), so LoRA adapters train
    on top of it.
    """

    SCALE_BUFFERS = ("absmax", "nested_absmax", "offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False, compute_dtype: DType = None,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        F._check_quant_type(quant_type)
        F._check_blocksize(blocksize)
        F._check_bool(double_quant, "double_quant")
        check_features(in_features, out_features, bias, as_dtype(dtype, "dtype") or dtype)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize = quant_type, blocksize
        self.compute_dtype = as_dtype(compute_dtype, "compute_dtype")
        self.weight_dtype = as_dtype(dtype, "dtype")  # the original weight's (bitsandbytes' quant_state.dtype)
        numel = in_features * out_features
        blocks = -(-numel // blocksize)
        self.register_buffer("weight", torch.zeros((numel + 1) // 2, 1, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8))
            self.register_buffer("nested_absmax", torch.zeros(-(-blocks // F.NESTED_BLOCKSIZE)))
            self.register_buffer("offset", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(blocks))
            self.nested_absmax = self.offset = None
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=self.weight_dtype), requires_grad=False) if bias
                     else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: DType = None) -> "NF4Linear":
        """Quantize an nn.Linear's weight bit for bit as bitsandbytes' quantize_4bit does."""
        if not isinstance(linear, nn.Linear) or isinstance(linear, NF4Linear):
            raise TypeError(f"from_linear expects a float nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, blocksize,
                     double_quant, compute_dtype, dtype=w.dtype)
        module.load_quant_state(*F.nf4_quantize(w, blocksize, quant_type, double_quant))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(w.device)

    def load_quant_state(self, packed: Tensor, state: F.NF4QuantState) -> None:
        """Fill the buffers from nf4_quantize's (packed, state) for this module's shape."""
        if tuple(state.shape) != (self.out_features, self.in_features) or state.quant_type != self.quant_type \
                or state.blocksize != self.blocksize or state.double_quant != (self.nested_absmax is not None):
            raise ValueError(f"quant state ({state.quant_type}, blocksize {state.blocksize}, shape "
                             f"{tuple(state.shape)}, double_quant {state.double_quant}) does not fit {self}")
        F.check_nf4_state(packed, state)
        self.weight.copy_(packed.reshape(self.weight.shape))
        self.absmax.copy_(state.absmax)
        if state.double_quant:
            self.nested_absmax.copy_(state.nested_absmax)
            self.offset.copy_(state.offset)

    def check_state(self, name: Optional[str] = None) -> None:
        """Validate the buffers (after load_state_dict): ``weight`` uint8 [(out*in + 1) // 2, 1];
        ``absmax`` fp32 [blocks], finite and >= 0 (uint8 codes when double-quantized, then
        ``nested_absmax`` fp32 [ceil(blocks / 256)] finite and >= 0 and ``offset`` a finite fp32
        scalar); bias float [out]; all on the CPU. Raises ValueError naming the buffer."""
        err = StateError(self, name)
        numel = self.in_features * self.out_features
        blocks = -(-numel // self.blocksize)
        check_buffer(err, "weight", self.weight, (torch.uint8,), ((numel + 1) // 2, 1))
        if self.double_quant:
            check_buffer(err, "absmax", self.absmax, (torch.uint8,), (blocks,))
            nested = check_buffer(err, "nested_absmax", self.nested_absmax, (torch.float32,),
                                  (-(-blocks // F.NESTED_BLOCKSIZE),))
            check_positive_finite(err, "nested_absmax", nested, allow_zero=True)
            offset = check_buffer(err, "offset", self.offset, (torch.float32,), ())
            if not torch.isfinite(offset):
                raise err("offset", f"must be finite, got {offset.item()}")
        else:
            absmax = check_buffer(err, "absmax", self.absmax, (torch.float32,), (blocks,))
            check_positive_finite(err, "absmax", absmax, allow_zero=True)
        check_bias(err, self)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> F.NF4QuantState:
        return F.NF4QuantState(self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                               self.blocksize, self.quant_type, self.nested_absmax, self.offset)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return F.nf4_dequantize(self.weight, self.quant_state).to(dtype or self.weight_dtype)

    def quantized_matmul(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        """x @ W^T (+ bias) in x's dtype (callers have cast x to the compute dtype)."""
        if self.in_features % self.blocksize:  # blocks span rows: no fused kernel
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype))
        # the buffers were checked at construction / by check_state(): straight to the kernel, read
        # from _buffers (Module.__getattr__ costs about 0.5 us a buffer, every call)
        buffers = self._buffers
        if not self.double_quant:
            return ops.nf4_linear(x, buffers["weight"], buffers["absmax"], self.blocksize, self.quant_type,
                                  self.out_features, bias)
        return ops.nf4_linear(x, buffers["weight"], buffers["absmax"], self.blocksize, self.quant_type,
                              self.out_features, bias, buffers["nested_absmax"], F.DYNAMIC_MAP, buffers["offset"])

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(self, x, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")
