"""lowbit: post-training quantization for Hugging Face language models, with a C++ core."""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C  # noqa: F401  (registers torch.ops.lowbit.*)
from . import eval, functional, nn, ops
from .cpu import cpu_info, set_isa, supported_isas, use_isa
from .formats import load, save_compressed
from .formats.gguf import load_imatrix, save_gguf, save_imatrix
from .ggml import IMatrix
from .hf_quantizer import LowbitConfig, register as _register_quantizer
from .modifiers import (Allocation, AWQMapping, AWQModifier, BnB4bitModifier, Budget, GPTQModifier, IMatrixGatherer,
                        LLMInt8Modifier, MixedPrecision, Modifier, QuantizationModifier, SensitivityReport,
                        SmoothQuantMapping, SmoothQuantModifier, allocate)
from .pipeline import dispatch_for_generation, imatrix, oneshot, sensitivity
from .recipe import parse_recipe
from .schemes import PRESET_SCHEMES, GGUFScheme, QuantizationArgs, QuantizationScheme, resolve_scheme

__version__ = "0.1.0"

_register_quantizer()  # from_pretrained(..., quantization_config=lowbit.LowbitConfig(...))

__all__ = [
    "Allocation",
    "AWQMapping",
    "AWQModifier",
    "BnB4bitModifier",
    "Budget",
    "GGUFScheme",
    "GPTQModifier",
    "IMatrix",
    "IMatrixGatherer",
    "LLMInt8Modifier",
    "LowbitConfig",
    "MixedPrecision",
    "PRESET_SCHEMES",
    "Modifier",
    "QuantizationArgs",
    "QuantizationModifier",
    "QuantizationScheme",
    "SensitivityReport",
    "SmoothQuantMapping",
    "SmoothQuantModifier",
    "allocate",
    "cpu_info",
    "dispatch_for_generation",
    "eval",
    "functional",
    "imatrix",
    "load",
    "load_imatrix",
    "nn",
    "oneshot",
    "ops",
    "parse_recipe",
    "resolve_scheme",
    "save_compressed",
    "save_gguf",
    "save_imatrix",
    "sensitivity",
    "set_isa",
    "supported_isas",
    "use_isa",
]
