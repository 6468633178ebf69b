"""What lowbit's quantized Linears share: input checks, gradients through a frozen quantized
weight (QLoRA-style training: the forward runs the module's fused kernel, the backward
multiplies by the dequantized weight), and scales that model casts must not round."""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

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


def check_input(x: Tensor, in_features: int, module: Optional[nn.Module] = None) -> None:
    """What a quantized Linear's forward needs of x, and of where `module`'s tensors live (its
    buffers were shaped at construction; check_state() validates loaded values): a TypeError or
    ValueError that says what is wrong and how to fix it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}, but lowbit's kernels run on the CPU: pass x.cpu()")
    if module is not None:
        check_devices(module)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")


def plausible_input(x, in_features: int) -> bool:
    """What the kernels cannot check, in a few attribute tests: x a float tensor on the CPU (a
    meta x would pass their fake implementations, a float64 one the dense fallbacks) with
    in_features in its last dimension (a reshape to [-1, in_features] would hide a mismatch).
    x.is_cpu, not x.device.type: building the device object costs 0.3 us a call."""
    return (isinstance(x, Tensor) and x.is_cpu and x.dtype in FLOATS and x.dim() > 0
            and x.shape[-1] == in_features)


def checked_call(module: nn.Module, x: Tensor, fn, *args):
    """fn(*args) for module's forward on x, with no checks before it: a forward runs for every
    token of every layer, and the kernels check their own arguments. Only what they cannot see is
    tested first (plausible_input); when a kernel refuses, check_input() names the problem in the
    module's terms (or, if it finds none, the kernel's own error stands)."""
    if not plausible_input(x, module.in_features):
        check_input(x, module.in_features, module)
    try:
        return fn(*args)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        check_input(x, module.in_features, module)
        raise


def frozen_linear(module: nn.Module, x: Tensor, compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """module's x @ W^T + bias: the fused kernel (bias inside) when no gradient is wanted, else
    through _FrozenWeightMatmul so gradients reach x (and a bias that requires them). With a
    compute_dtype, x is cast to it for the kernel and the result back to x's dtype. Written as
    checked_call inlined, the bias read from _parameters: a decode step calls this for every
    Linear, and each Python frame or Module.__getattr__ costs about as much as a small layer's
    kernel launch."""
    if not plausible_input(x, module.in_features):
        check_input(x, module.in_features, module)
    try:
        xc = x if compute_dtype is None else x.to(compute_dtype)
        bias = module._parameters.get("bias")
        if torch.is_grad_enabled() and (xc.requires_grad or (bias is not None and bias.requires_grad)):
            y = _FrozenWeightMatmul.apply(xc, module)
            y = y if bias is None else y + bias.to(y.dtype)
        else:
            y = module.quantized_matmul(xc, bias)
        return y if compute_dtype is None else y.to(x.dtype)
    except (TypeError, ValueError, RuntimeError, AttributeError):
        check_input(x, module.in_features, module)
        raise


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


def check_devices(module: nn.Module) -> None:
    """Every parameter and buffer of a quantized Linear on the CPU (lowbit's kernels run
    there): ValueError naming the tensor and the fix otherwise. A meta module (built under
    torch.device("meta") or moved there) holds no data."""
    for name, t in _own_tensors(module):
        if t.device.type == "cpu":
            continue
        if t.device.type == "meta":
            raise ValueError(f"{type(module).__name__} weights are on meta ({name} holds no data): load real weights "
                             "first (module.to_empty(device='cpu') + load_state_dict, or lowbit.load)")
        raise ValueError(f"{type(module).__name__} weights are on {t.device} ({name}), but lowbit's kernels run on "
                         "the CPU: move the module with .cpu()")


def _own_tensors(module: nn.Module) -> Iterable[Tuple[str, Tensor]]:
    for name, t in module._buffers.items():
        if t is not None:
            yield name, t
    for name, t in module._parameters.items():
        if t is not None:
            yield name, t


class StateError:
    """Builds check_state()'s ValueError messages for one module."""

    def __init__(self, module: nn.Module, name: Optional[str]):
        where = f"{name} " if name else ""
        self.prefix = f"{where}({type(module).__name__} {module.in_features}->{module.out_features})"

    def __call__(self, buffer: str, problem: str) -> ValueError:
        return ValueError(f"{self.prefix}: {buffer} {problem}")


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_buffer(err: StateError, name: str, t: Optional[Tensor], dtypes, shape) -> Tensor:
    """t exists, is a dense CPU tensor with one of `dtypes` and exactly `shape`."""
    if not isinstance(t, Tensor):
        raise err(name, f"is missing (got {type(t).__name__})")
    if t.device.type != "cpu":
        raise err(name, f"is on {t.device}: load real values on the CPU"
                        + (" (to_empty(device='cpu') + load_state_dict)" if t.device.type == "meta" else ""))
    if t.layout != torch.strided:
        raise err(name, f"must be a dense tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        raise err(name, f"must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise err(name, f"must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def check_positive_finite(err: StateError, name: str, t: Tensor, allow_zero: bool = False) -> None:
    ok = torch.isfinite(t) & ((t >= 0) if allow_zero else (t > 0))
    if t.numel() and not ok.all():
        bound = ">= 0" if allow_zero else "> 0"
        raise err(name, f"must be finite and {bound}, got values such as {t[~ok][:3].tolist()}")


def check_range(err: StateError, name: str, t: Tensor, lo: int, hi: int, what: str) -> None:
    if t.numel() and (t.min() < lo or t.max() > hi):
        raise err(name, f"must lie in [{lo}, {hi}] ({what}), got values in [{int(t.min())}, {int(t.max())}]")


def check_bias(err: StateError, module: nn.Module) -> None:
    if module.bias is not None:
        check_buffer(err, "bias", module.bias, FLOATS, (module.out_features,))


def check_features(in_features, out_features, bias, dtype, dtype_name: str = "dtype") -> None:
    """Constructor arguments every quantized Linear shares."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a positive integer, got {type(v).__name__} {v!r}")
        if v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False, got {type(bias).__name__} {bias!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in FLOATS:
        raise TypeError(f"{dtype_name} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
