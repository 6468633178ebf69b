"""KV-cache quantization as compressed-tensors defines it (`kv_cache_scheme`): static scales for
the post-RoPE keys and values of each attention module (`k_scale`, `v_scale`), FP8 E4M3 or int8,
one per tensor or one per KV head. The hook point is compressed-tensors' own: a forward pre-hook
on the attention module hands it, in place of its `past_key_values`, a wrapper whose `update()`
sees the keys and values the layer stores. While calibrating, the wrapper records their range;
afterwards it quantizes them, stores the codes (FP8 or int8: 1 byte per element) in the real
cache, and returns them dequantized to the attention. Stock transformers + compressed-tensors
quantize-dequantize at the same point with the same scales, so both compute the same values."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..schemes import plain

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# compressed-tensors' symmetric int8 scale: absmax / ((qmax - qmin) / 2)
INT8_HALF_RANGE = 127.5


@dataclass(frozen=True)
class KVCacheScheme:
    """compressed-tensors' kv_cache_scheme args that lowbit runs: 8 bits, type "float" (FP8
    E4M3) or "int", strategy "tensor" (one scale per attention module for keys, one for values)
    or "attn_head" (one per KV head), symmetric, static (calibrated)."""

    type: str = "float"
    strategy: str = "tensor"

    @classmethod
    def parse(cls, args) -> "KVCacheScheme":
        d = plain(args)
        if not isinstance(d, dict):
            raise TypeError(f"kv_cache_scheme must be a dict of quantization args such as {{'num_bits': 8, "
                            f"'type': 'float', 'strategy': 'tensor'}}, got {type(args).__name__}")
        unsupported = {k: v for k, v in d.items() if k not in ("num_bits", "type", "strategy", "symmetric",
                                                                "dynamic", "observer", "group_size")
                       and v not in (None, {}, False)}
        if unsupported:
            raise ValueError(f"kv_cache_scheme: unsupported args {unsupported}")
        if d.get("num_bits", 8) != 8 or d.get("symmetric", True) is not True or d.get("dynamic", False) \
                or d.get("group_size") is not None:
            raise ValueError(f"kv_cache_scheme: lowbit quantizes the KV cache to 8 bits, symmetric, with calibrated "
                             f"(static) scales per tensor or per KV head; got {d}")
        scheme = cls(type=d.get("type", "float"), strategy=d.get("strategy", "tensor"))
        if scheme.type not in ("float", "int") or scheme.strategy not in ("tensor", "attn_head"):
            raise ValueError(f"kv_cache_scheme: type must be 'float' (FP8 E4M3) or 'int' and strategy 'tensor' or "
                             f"'attn_head', got type={scheme.type!r}, strategy={scheme.strategy!r}")
        return scheme

    def to_dict(self) -> dict:
        return {"num_bits": 8, "type": self.type, "symmetric": True, "group_size": None, "strategy": self.strategy,
                "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                "observer_kwargs": {}}

    @property
    def storage_dtype(self) -> torch.dtype:
        return FP8 if self.type == "float" else torch.int8

    def scale_of(self, amax: Tensor) -> Tensor:
        return amax / (FP8_MAX if self.type == "float" else INT8_HALF_RANGE)

    def quantize(self, x: Tensor, scale: Tensor) -> Tensor:
        """Codes of x ([batch, kv heads, tokens, head dim]) in the storage dtype, as
        compressed-tensors rounds: x / scale, clamped, cast (FP8) or rounded (int8)."""
        scaled = x / scale.to(x.dtype)
        if self.type == "float":
            return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
        return scaled.round().clamp(-128, 127).to(torch.int8)

    def dequantize(self, codes: Tensor, scale: Tensor) -> Tensor:
        return codes.to(scale.dtype) * scale


def _past_key_values_name(module: nn.Module) -> Optional[str]:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in ("past_key_values", "past_key_value") if n in params), None)


def attention_modules(layer: nn.Module, prefix: str = "") -> Dict[str, nn.Module]:
    """The attention modules of a decoder layer whose forward takes the KV cache (the modules
    compressed-tensors hooks: an "Attention" class with a past_key_values argument)."""
    return {f"{prefix}.{n}" if prefix else n: m for n, m in layer.named_modules()
            if "attention" in type(m).__name__.lower() and _past_key_values_name(m) is not None}


def _scale_shape(scheme: KVCacheScheme, module: nn.Module) -> Tuple[int, ...]:
    if scheme.strategy == "tensor":
        return (1,)
    heads = getattr(getattr(module, "config", None), "num_key_value_heads", None)
    if not heads:
        raise ValueError(f"kv_cache_scheme strategy 'attn_head' needs the number of KV heads, which "
                         f"{type(module).__name__} does not expose (module.config.num_key_value_heads)")
    return (heads, 1, 1)


def _amax(x: Tensor, strategy: str) -> Tensor:
    """|x| max per tensor ([1]) or per KV head ([heads, 1, 1]) of [batch, heads, tokens, dim]."""
    a = x.detach().abs().float()
    return a.amax().reshape(1) if strategy == "tensor" else a.amax(dim=(0, 2, 3)).reshape(-1, 1, 1)


class _Wrapper:
    """What the attention module sees as its past_key_values for one call."""

    def __init__(self, real, on_update):
        self._real, self._on_update = real, on_update

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        return self._on_update(self._real, key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):  # everything else (sequence length, masks, ...) is the real cache's
        if self._real is None:
            raise AttributeError(name)
        return getattr(self._real, name)


def _swap_cache_hook(on_update):
    def hook(module, args, kwargs):
        name = _past_key_values_name(module)
        kwargs[name] = _Wrapper(kwargs.get(name), on_update)
        return args, kwargs

    return hook


def observe(module: nn.Module, scheme: KVCacheScheme, ranges: List[Optional[Tensor]]):
    """Calibration: record the running |k| and |v| maxima in ranges[0], ranges[1]; the values
    pass through unchanged. Returns the hook handle."""

    def on_update(real, k, v, *args, **kwargs):
        for i, x in enumerate((k, v)):
            a = _amax(x, scheme.strategy)
            ranges[i] = a if ranges[i] is None else torch.maximum(ranges[i], a)
        return real.update(k, v, *args, **kwargs) if real is not None else (k, v)

    return module.register_forward_pre_hook(_swap_cache_hook(on_update), with_kwargs=True)


def register_scales(module: nn.Module, scheme: KVCacheScheme, dtype: torch.dtype,
                    ranges: Optional[List[Tensor]] = None) -> None:
    """k_scale / v_scale buffers on `module` (compressed-tensors' names and shapes), from the
    observed ranges or, to be loaded, ones."""
    shape = _scale_shape(scheme, module)
    for name, amax in zip(("k_scale", "v_scale"), ranges or (None, None)):
        if amax is None:
            scale = torch.ones(shape, dtype=dtype)
        else:  # a range of 0 (a head never used) keeps a usable scale
            scale = scheme.scale_of(amax.reshape(shape)).clamp_min(torch.finfo(torch.float32).tiny).to(dtype)
        module.register_buffer(name, scale)


def quantize_cache(module: nn.Module, scheme: KVCacheScheme):
    """From now on `module` stores its keys and values quantized (FP8 / int8 codes in the real
    cache) and attends over them dequantized. Returns the hook handle."""

    def on_update(real, k, v, *args, **kwargs):
        qk, qv = scheme.quantize(k, module.k_scale), scheme.quantize(v, module.v_scale)
        if real is not None:
            qk, qv = real.update(qk, qv, *args, **kwargs)
        return (scheme.dequantize(qk, module.k_scale).to(k.dtype), scheme.dequantize(qv, module.v_scale).to(v.dtype))

    module._lowbit_kv_scheme = scheme
    return module.register_forward_pre_hook(_swap_cache_hook(on_update), with_kwargs=True)
