"""What lowbit's quantized Linears share: input checks, gradients through a frozen quantized
weight (QLoRA-style training: the forward runs the module's fused kernel, the backward
multiplies by the dequantized weight), and scales that model casts must not round."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _FrozenWeightMatmul(torch.autograd.Function):
    """y = x @ W^T with W held quantized by `module`; dL/dx = dL/dy @ W. The weight itself is
    frozen, so it is dequantized only in the backward pass and gets no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module) -> Tensor:
        ctx.module = module
        return module.quantized_matmul(x, None)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.module.dequantized_weight(grad.dtype)
        return grad @ weight, None


def check_input(x: Tensor, in_features: int) -> None:
    """The checks a quantized Linear's forward needs on x (its buffers were shaped at
    construction: cheap attribute tests, not the functional API's full validation)."""
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}, but lowbit's kernels run on the CPU: pass x.cpu()")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")


def frozen_linear(module: nn.Module, x: Tensor) -> Tensor:
    """module's x @ W^T + bias: the fused kernel (bias inside) when no gradient is wanted, else
    through _FrozenWeightMatmul so gradients reach x (and a bias that requires them)."""
    bias = module.bias
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _FrozenWeightMatmul.apply(x, module)
        return y if bias is None else y + bias.to(y.dtype)
    return module.quantized_matmul(x, bias)


class KeepsScalesFp32:
    """Mixin for a quantized Linear whose SCALE_BUFFERS stay fp32 (as bitsandbytes keeps its
    absmax / SCB): casting the model (model.to(torch.bfloat16), .half()) moves them to the new
    device but never rounds them."""

    SCALE_BUFFERS: tuple = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers[n] for n in self.SCALE_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self
