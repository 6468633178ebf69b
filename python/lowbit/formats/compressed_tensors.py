"""compressed-tensors checkpoints (what llmcompressor writes and transformers / vLLM read):
pack-quantized for WnA16, int-quantized for W8A8 and WnA8, float-quantized for FP8. The
config, the tensors of PackedLinear / Int8DynamicLinear / Fp8Linear, and their loader."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .. import functional as F
from ..nn import kv_cache
from ..nn.convert import replace_module
from ..nn.fp8_linear import Fp8Linear
from ..nn.int8_dynamic import Int8DynamicLinear
from ..nn.packed_linear import PackedLinear
from ..schemes import QuantizationArgs, QuantizationScheme, args_from_dict
from ..targets import matches

QUANT_METHOD = "compressed-tensors"
MODULE_TYPES = (PackedLinear, Int8DynamicLinear, Fp8Linear)


def _args_dict(args: QuantizationArgs) -> dict:
    return {
        "num_bits": args.num_bits, "type": args.type, "symmetric": args.symmetric, "strategy": args.strategy,
        "group_size": args.group_size, "dynamic": args.dynamic, "actorder": args.actorder,
        "block_structure": list(args.block_structure) if args.block_structure else None,
        "observer": None if args.dynamic else args.observer, "observer_kwargs": {},
    }


def _format(scheme: QuantizationScheme) -> str:
    """compressed-tensors' choice: FP8 weights with quantized activations float-quantized, FP8
    weights alone naive-quantized (the same tensors), WnA8 int-quantized, WnA16 pack-quantized."""
    if scheme.weights.type == "float":
        return "float-quantized" if scheme.input_activations is not None else "naive-quantized"
    return "int-quantized" if scheme.input_activations is not None else "pack-quantized"


def quantization_config(model: nn.Module, plan: Dict[str, Tuple[nn.Module, QuantizationScheme]]):
    """config.json's quantization_config for the nn.Linear modules in `plan` (name ->
    (module, scheme)), or None when there are none (compressed-tensors has no layout for
    transformers' Conv1D, so those layers are saved as dequantized floats).

    One config group per distinct scheme. With a single group, targets are ["Linear"] and
    `ignore` lists every other Linear; with several, each group names its modules exactly.
    """
    by_scheme: Dict[QuantizationScheme, list] = {}
    for name, (module, scheme) in plan.items():
        if isinstance(module, nn.Linear):
            by_scheme.setdefault(scheme, []).append(name)
    if not by_scheme:
        return None
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        targets = ["Linear"] if len(by_scheme) == 1 else sorted(names)
        groups[f"group_{i}"] = {
            "targets": targets, "weights": _args_dict(scheme.weights),
            "input_activations": _args_dict(scheme.input_activations) if scheme.input_activations else None,
            "output_activations": None, "format": _format(scheme),
        }
    quantized = {n for names in by_scheme.values() for n in names}
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
    }


def module_tensors(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The checkpoint tensors of a PackedLinear, named relative to it, or None for every other
    module (the own state dicts of Int8DynamicLinear and Fp8Linear already are the int- and
    float-quantized layouts)."""
    if not isinstance(module, PackedLinear):
        return None
    if module.input_args is not None:  # WnA8: int-quantized, the codes unpacked in an int8 "weight"
        out = {"weight": F.unpack(module.weight_packed, module.args.num_bits,
                                  (module.out_features, module.in_features)), "weight_scale": module.weight_scale}
        if module.weight_zero_point is not None:
            out["weight_zero_point"] = module.weight_zero_point
    else:
        out = {"weight_packed": module.weight_packed, "weight_scale": module.weight_scale,
               "weight_shape": module.weight_shape}
        if module.weight_zero_point is not None:
            out["weight_zero_point"] = F.pack(module.weight_zero_point, module.args.num_bits, packed_dim=0)
    if module.weight_g_idx is not None:
        out["weight_g_idx"] = module.weight_g_idx
    return out


# ---------------------------------------------------------------- loading

def _string_list(value, where: str) -> list:
    value = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"quantization_config.{where} must be a list of module names / class names / 're:' "
                         f"patterns, got {value!r}")
    return value


def _group_scheme(group_name: str, group) -> QuantizationScheme:
    where = f"quantization_config.config_groups.{group_name}"
    if not isinstance(group, dict):
        raise ValueError(f"{where} must be an object with 'targets' and 'weights', got {type(group).__name__}")
    if group.get("output_activations"):
        raise ValueError(f"{where} quantizes output activations, which lowbit does not run")
    weights, acts = group.get("weights"), group.get("input_activations")
    for what, args in (("weights", weights), ("input_activations", acts)):
        if (what == "weights" or args is not None) and not isinstance(args, dict):
            raise ValueError(f"{where}.{what} must be an object of quantization args, got {args!r}")
    try:
        return QuantizationScheme(args_from_dict(weights), args_from_dict(acts) if acts else None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _plan_from_config(model: nn.Module, qc: dict) -> Dict[str, Tuple[nn.Module, QuantizationScheme]]:
    ignore = _string_list(qc.get("ignore"), "ignore")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"quantization_config.config_groups must be a non-empty object of config groups, got {groups!r}")
    plan = {}
    for group_name, group in groups.items():
        scheme = _group_scheme(group_name, group)
        targets = _string_list(group.get("targets"), f"config_groups.{group_name}.targets")
        for name, module in model.named_modules():
            if (isinstance(module, nn.Linear) and name not in plan
                    and any(matches(t, name, module) for t in targets)
                    and not any(matches(p, name, module) for p in ignore)):
                plan[name] = (module, scheme)
    return plan


def _empty_quantized(module: nn.Linear, scheme: QuantizationScheme, dtype: torch.dtype) -> nn.Module:
    """A quantized module of the right shapes, to be filled from the checkpoint."""
    bias = module.bias is not None
    if scheme.weights.type == "float":
        return Fp8Linear(module.in_features, module.out_features, bias, scheme, dtype=dtype)
    if Int8DynamicLinear.runs(scheme):
        static = not scheme.input_activations.dynamic
        return Int8DynamicLinear(module.in_features, module.out_features, bias, dtype=dtype, static_input=static)
    return PackedLinear(module.in_features, module.out_features, bias, scheme, dtype=dtype)


def _to_module_layout(model: nn.Module, plan, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors -> lowbit modules' state: zero points unpacked along dim 0, the
    stored weight_shape checked against the module's; WnA8 (int-quantized) codes packed."""
    for name, (_, scheme) in plan.items():
        module, args = model.get_submodule(name), scheme.weights
        if isinstance(module, (Int8DynamicLinear, Fp8Linear)):
            continue
        if module.input_args is not None:
            codes = state.pop(f"{name}.weight", None)
            if codes is not None:
                try:
                    state[f"{name}.weight_packed"] = F.pack(codes, args.num_bits)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{name}.weight: {e}") from None
                state[f"{name}.weight_shape"] = module.weight_shape.new_tensor([module.out_features,
                                                                                module.in_features], device="cpu")
            continue
        shape = state.get(f"{name}.weight_shape")
        if shape is not None and (shape.dtype.is_floating_point or shape.tolist() != [module.out_features,
                                                                                        module.in_features]):
            raise ValueError(f"{name}.weight_shape is {shape.tolist()} ({shape.dtype}), but the model's Linear is "
                             f"[{module.out_features}, {module.in_features}]")
        zero = state.get(f"{name}.weight_zero_point")
        if zero is not None:
            groups = module.weight_scale.shape[1]
            try:
                state[f"{name}.weight_zero_point"] = F.unpack(zero, args.num_bits, (module.out_features, groups),
                                                              packed_dim=0)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{name}.weight_zero_point: {e}") from None
    return state


def load_into(model: nn.Module, qc: dict, state: Dict[str, torch.Tensor], dtype, device) -> None:
    """Replace every Linear the config groups quantize by an empty lowbit module made on
    `device` ("meta" for a skeleton) and rewrite `state` (the checkpoint's tensors) into the
    modules' buffer layouts; a kv_cache_scheme adds the attention modules' k / v scales."""
    if qc.get("quantization_status", "compressed") != "compressed" or qc.get("format") not in (
            "pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "mixed-precision"):
        raise ValueError(f"unsupported compressed-tensors format {qc.get('format')!r} "
                         f"(status {qc.get('quantization_status')!r}); lowbit reads pack-quantized, int-quantized, "
                         "float-quantized and naive-quantized")
    plan = _plan_from_config(model, qc)
    if not plan:
        raise ValueError("the quantization_config's config_groups match no module of the model")
    for name, (module, scheme) in plan.items():
        with torch.device(device):
            replace_module(model, name, _empty_quantized(module, scheme, dtype))
    _to_module_layout(model, plan, state)
    if qc.get("kv_cache_scheme"):
        _quantized_kv_cache(model, qc["kv_cache_scheme"], dtype, hook=device != "meta")


def _quantized_kv_cache(model: nn.Module, args: dict, dtype, hook: bool) -> None:
    """kv_cache_scheme: k_scale / v_scale buffers (filled from the checkpoint) on every
    attention module, and (hook) the quantized cache in place."""
    try:
        scheme = kv_cache.KVCacheScheme.parse(args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"quantization_config.kv_cache_scheme: {e}") from None
    modules = kv_cache.attention_modules(model)
    if not modules:
        raise ValueError(f"quantization_config has a kv_cache_scheme, but lowbit finds no attention module of "
                         f"{type(model).__name__} to hook")
    for module in modules.values():
        kv_cache.register_scales(module, scheme, dtype)
        if hook:
            kv_cache.quantize_cache(module, scheme)
