"""Pure-PyTorch versions of every C++ kernel: slow, obvious, and the tests' oracle."""

from .quant import dequantize, fake_quantize, pack, packed_linear, quant_params, quantize, unpack

__all__ = ["quant_params", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "packed_linear"]
