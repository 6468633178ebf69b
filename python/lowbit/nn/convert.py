"""Quantize one Linear-like module into the lowbit module that holds it."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .. import functional as F
from ..schemes import GGUFScheme, QuantizationArgs, QuantizationScheme, resolve_scheme
from .fp8_linear import Fp8Linear, check_fp8_scheme
from .gguf_linear import GGUFLinear
from .int8_dynamic import Int8DynamicLinear
from .packed_linear import PackedLinear, check_activations

try:  # transformers' GPT-2 family stores Linear layers as Conv1D ([in, out] weights)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def quantize_module(module: nn.Module, scheme: Union[str, QuantizationScheme, QuantizationArgs, dict],
                    importance: Optional[Tensor] = None, input_scale: Optional[Tensor] = None) -> nn.Module:
    """The quantized replacement of an nn.Linear / transformers Conv1D (importance: E[x^2] per
    input column, for the imatrix_mse observer; input_scale: a calibrated static activation scale).

    nn.Linear with a GGUF scheme -> GGUFLinear (ggml's blocks); with FP8 weights -> Fp8Linear; with W8A8 (dynamic or static activations) ->
    Int8DynamicLinear (an int8 GEMM); any other scheme -> PackedLinear (with int8 activations
    per token for W4A8 and the like).
    A Conv1D (GPT-2's [in, out] layers) keeps its class and gets the dequantized weight,
    quantized along its input rows as a Linear would be: compressed-tensors has no layout for
    Conv1D, so these layers are saved as float values that lie on the integer grid.
    """
    scheme = resolve_scheme(scheme)
    if isinstance(scheme, GGUFScheme):
        if not isinstance(module, nn.Linear) or scheme.tensor_type is None:
            raise ValueError(f"GGUF schemes quantize nn.Linear layers of the architectures lowbit writes as GGUF, each "
                             f"to the tensor type its modifier's plan chose; got a {type(module).__name__} with "
                             f"{scheme}")
        return GGUFLinear.from_linear(module, scheme.tensor_type, importance)
    args = scheme.weights
    if isinstance(module, nn.Linear) and args.type == "float":
        return Fp8Linear.from_linear(module, scheme, input_scale=input_scale)
    if isinstance(module, nn.Linear) and Int8DynamicLinear.runs(scheme):
        return Int8DynamicLinear.from_linear(module, scheme, importance=importance, input_scale=input_scale)
    if isinstance(module, nn.Linear):
        return PackedLinear.from_linear(module, scheme, importance=importance)
    if isinstance(module, Conv1D):
        if args.type == "float":
            raise ValueError("FP8 quantization of Conv1D layers (GPT-2 style) is not supported: compressed-tensors "
                             "has no layout for them; add them to ignore")
        if scheme.input_activations is not None:
            raise ValueError("activation quantization of Conv1D layers is not supported; quantize weights only")
        w = module.weight.detach().t()  # [out, in]
        module.weight.data = F.fake_quantize(w, args.num_bits, args.symmetric, args.strategy, args.group_size,
                                             args.weight_observer, importance=importance).t().contiguous()
        module.quantization_args = args
        return module
    raise TypeError(f"cannot quantize a {type(module).__name__}: lowbit quantizes nn.Linear and Conv1D layers")


def check_scheme(scheme: QuantizationScheme) -> None:
    """ValueError, before any work, for a scheme no lowbit layer runs."""
    if isinstance(scheme, GGUFScheme):
        return
    if scheme.weights.type == "float":
        w = scheme.weights
        rows, cols = w.block_structure if w.strategy == "block" else (1, 1)
        check_fp8_scheme(scheme, rows, cols)  # shapes are checked per layer
    elif not Int8DynamicLinear.runs(scheme):
        check_activations(scheme.input_activations)
        if scheme.weights.strategy not in ("group", "channel"):
            raise ValueError(f"integer weights are quantized per group or per channel, not {scheme.weights.strategy!r}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
