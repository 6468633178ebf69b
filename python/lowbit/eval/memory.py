"""How much memory a model needs once quantized with a scheme, before quantizing it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..schemes import QuantizationArgs, QuantizationScheme, resolve_scheme

RESERVE_PERCENT = 10  # of weights + KV cache, for activations and allocator overhead


@dataclass(frozen=True)
class MemoryEstimate:
    """Byte counts of a quantized model. weights_bytes covers everything stored: packed
    weights, scales, zero points, weight shapes and the unquantized parameters."""

    weights_bytes: int
    quantized_params: int
    unquantized_params: int
    scale_bytes: int
    zero_point_bytes: int
    kv_cache_bytes: int
    activation_reserve_bytes: int
    total_bytes: int

    def __str__(self) -> str:
        rows = [("weights", self.weights_bytes),
                ("  scales", self.scale_bytes),
                ("  zero points", self.zero_point_bytes),
                ("KV cache", self.kv_cache_bytes),
                (f"reserve ({RESERVE_PERCENT}%)", self.activation_reserve_bytes),
                ("total", self.total_bytes)]
        lines = [f"{name:<16}{b / 2**20:>12.2f} MiB" for name, b in rows]
        lines.append(f"params: {self.quantized_params:,} quantized, {self.unquantized_params:,} unquantized")
        return "\n".join(lines)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


def _config_dtype(config: PretrainedConfig) -> Optional[torch.dtype]:
    # transformers 5 renamed torch_dtype to dtype (and warns when the old name is read).
    dtype = config.dtype if "dtype" in vars(config) else getattr(config, "torch_dtype", None)
    return _as_dtype(dtype) if dtype is not None else None


def _kv_cache_bytes(config, context_length: int, batch_size: int, itemsize: int) -> int:
    """K and V of every layer for context_length tokens; 0 when the config does not say."""
    if not isinstance(config, PretrainedConfig):
        return 0
    config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return 0
    return 2 * layers * kv_heads * head_dim * context_length * batch_size * itemsize


@dataclass(frozen=True)
class LinearBytes:
    """The stored bytes of one quantized Linear's weight, by part."""

    packed: int
    scales: int
    zero_points: int
    shapes: int

    @property
    def total(self) -> int:
        return self.packed + self.scales + self.zero_points + self.shapes


def linear_bytes(out_features: int, in_features: int, args: QuantizationArgs, itemsize: int,
                 static_input: bool = False) -> LinearBytes:
    """Bytes of an [out_features, in_features] weight quantized with `args` as the checkpoint
    stores it: packed codes (int32 words of codes along a row; FP8 one byte each), scales in
    `itemsize` bytes (one per group, channel, tile or tensor; + the static input scale),
    asymmetric zero points int32-packed along the output dimension, and weight_shape."""
    out, inp = out_features, in_features
    if args.type == "float":  # FP8: one byte per weight, a scale per tile, no weight_shape
        if args.strategy == "block":
            rows, cols = args.block_structure
            tiles = -(-out // rows) * -(-inp // cols)
        else:
            tiles = 1 if args.strategy == "tensor" else out
        return LinearBytes(out * inp, (tiles + static_input) * itemsize, 0, 0)
    groups = inp // args.group_size if args.strategy == "group" else 1
    scale_rows = 1 if args.strategy == "tensor" else out
    zeros = 0 if args.symmetric else -(-scale_rows * args.num_bits // 32) * groups * 4
    return LinearBytes(out * -(-inp * args.num_bits // 32) * 4, (scale_rows * groups + static_input) * itemsize,
                       zeros, 2 * 8)


def memory_estimate(model_or_config: Union[nn.Module, PretrainedConfig],
                    scheme: Union[str, QuantizationScheme, QuantizationArgs, dict] = "W4A16", *,
                    ignore: Iterable[str] = ("lm_head",), dtype: Optional[Union[torch.dtype, str]] = None,
                    context_length: int = 2048, batch_size: int = 1, kv_cache_scheme=None) -> MemoryEstimate:
    """Memory of the model quantized with `scheme` in lowbit's packed layout.

    model_or_config: the unquantized model, or its config (the model is then built on the
    meta device, so nothing is allocated). Every nn.Linear whose name is not in `ignore` is
    quantized, as oneshot saves it (GPT-2's Conv1D layers are saved as floats); all other parameters (embeddings,
    norms, biases, ignored Linears) stay in `dtype`, tied ones counted once. dtype defaults
    to the model's parameter dtype, or the config's dtype, else float32.

    The KV cache is for `batch_size` sequences of `context_length` tokens in `dtype`, or in one
    byte per element with a `kv_cache_scheme` (FP8 / int8, as oneshot's kv_cache_scheme). On
    top, a stated reserve of 10% of (weights + KV cache) stands for activations and
    allocator overhead: a rule of thumb, not a measurement.
    """
    resolved = resolve_scheme(scheme)
    args, acts = resolved.weights, resolved.input_activations
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 0:
        raise ValueError(f"context_length must be a non-negative integer, got {context_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(model_or_config, PretrainedConfig):
        config = model_or_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        default_dtype = _config_dtype(config)
    elif isinstance(model_or_config, nn.Module):
        model, config = model_or_config, getattr(model_or_config, "config", None)
        default_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    else:
        raise TypeError(f"model_or_config must be an nn.Module or a transformers PretrainedConfig, "
                        f"got {type(model_or_config).__name__}")
    itemsize = _as_dtype(dtype if dtype is not None else default_dtype or torch.float32).itemsize
    ignore = {ignore} if isinstance(ignore, str) else set(ignore)

    quantized, qparams, packed, scales, zeros, shapes = set(), 0, 0, 0, 0, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in ignore:
            continue
        out, inp = module.out_features, module.in_features
        if args.strategy == "group" and inp % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide in_features {inp} of {name!r}: "
                             "choose a group size that divides it, or add the layer to ignore")
        quantized.add(module)
        qparams += out * inp
        parts = linear_bytes(out, inp, args, itemsize, static_input=acts is not None and not acts.dynamic)
        packed, scales, zeros, shapes = (packed + parts.packed, scales + parts.scales, zeros + parts.zero_points,
                                         shapes + parts.shapes)

    # A tied embedding stays unquantized even when its lm_head twin is quantized.
    seen, uparams = set(), 0
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if (module in quantized and pname == "weight") or id(p) in seen:
                continue
            seen.add(id(p))
            uparams += p.numel()

    weights = packed + scales + zeros + shapes + uparams * itemsize
    if kv_cache_scheme is not None:
        from ..nn.kv_cache import KVCacheScheme

        kv_itemsize = KVCacheScheme.parse(kv_cache_scheme).storage_dtype.itemsize
    else:
        kv_itemsize = itemsize
    kv = _kv_cache_bytes(config, context_length, batch_size, kv_itemsize)
    reserve = -(-(weights + kv) * RESERVE_PERCENT // 100)
    return MemoryEstimate(weights_bytes=weights, quantized_params=qparams, unquantized_params=uparams,
                          scale_bytes=scales, zero_point_bytes=zeros, kv_cache_bytes=kv,
                          activation_reserve_bytes=reserve, total_bytes=weights + kv + reserve)
