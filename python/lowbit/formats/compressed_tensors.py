"""compressed-tensors checkpoints (what llmcompressor writes and transformers / vLLM read):
pack-quantized for WnA16, int-quantized for W8A8 and WnA8, float-quantized for FP8. Save from
and load into lowbit modules."""

from __future__ import annotations

import copy
import json
import os
import types
from typing import Dict, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from .. import functional as F
from . import bitsandbytes
from .checkpoint import (check_against_skeleton, check_layer_count, check_loading_info, check_quantized_values,
                         model_directories, read_config, read_headers, read_safetensors, resolve_dtype,
                         write_directory)
from ..modifiers.base import matches
from ..nn import kv_cache
from ..nn.convert import replace_module
from ..nn.fp8_linear import Fp8Linear
from ..nn.int8_dynamic import Int8DynamicLinear
from ..nn.int8_outlier import Int8OutlierLinear
from ..nn.nf4_linear import NF4Linear
from ..nn.packed_linear import PackedLinear
from ..schemes import QuantizationArgs, QuantizationScheme, args_from_dict

# Shard size of the safetensors files (transformers' default).
MAX_SHARD_SIZE = "5GB"


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
        "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
    }


def _quantized_tensors(module: nn.Module):
    """The checkpoint tensors of a PackedLinear (compressed-tensors), NF4Linear or
    Int8OutlierLinear (bitsandbytes), or None for every other module (Int8DynamicLinear's own state dict
    already is the int-quantized layout)."""
    if isinstance(module, NF4Linear):
        return bitsandbytes.nf4_tensors(module)
    if isinstance(module, Int8OutlierLinear):
        return bitsandbytes.int8_tensors(module)
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


def _state_with(model: nn.Module, replaced: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """model.state_dict() with the tensors of each module in `replaced` (but its bias) swapped
    for replaced[module] (local names), sorted by name; tied duplicates (an lm_head sharing
    the embedding) are dropped, transformers re-ties them."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in replaced and leaf != "bias":
            continue
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor
    for owner, tensors in replaced.items():
        state.update({f"{owner}.{k}": v for k, v in tensors.items()})
    return {k: state[k].detach().contiguous() for k in sorted(state)}


def compressed_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's tensors in the checkpoint's names and layouts, sorted by name."""
    return _state_with(model, {name: t for name, m in model.named_modules()
                               if (t := _quantized_tensors(m)) is not None})


def decompressed_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The quantized model as a plain float checkpoint (llmcompressor's save_compressed=False):
    every lowbit layer's weight dequantized in the model's dtype, its quantized buffers
    dropped, so any loader reads it as an ordinary model whose weights lie on the grid."""
    from ..nn import QUANTIZED_LINEAR_TYPES

    dtype = getattr(model.config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return _state_with(model, {name: {"weight": m.dequantized_weight(dtype)} for name, m in model.named_modules()
                               if isinstance(m, QUANTIZED_LINEAR_TYPES)})


def _write_safetensors(state: Dict[str, torch.Tensor], directory: str, max_shard_size=MAX_SHARD_SIZE) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, os.path.join(directory, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def save_compressed(model: nn.Module, output_dir, tokenizer=None, recipe_yaml: str = None,
                    overwrite: bool = False, compressed: bool = True, max_shard_size=MAX_SHARD_SIZE) -> None:
    """Write config.json (with quantization_config), safetensors, the tokenizer and
    recipe.yaml to a temporary directory beside `output_dir`, then swap it into place, so
    that `output_dir` holds the old or the complete new checkpoint at every instant (see
    checkpoint.write_directory for the paths it refuses). compressed=False writes the
    decompressed model instead (decompressed_state_dict; config.json without
    quantization_config)."""

    def write(tmp: str) -> None:
        if compressed:
            _write_safetensors(compressed_state_dict(model), tmp, max_shard_size)
            model.config.save_pretrained(tmp)
        else:
            _write_safetensors(decompressed_state_dict(model), tmp, max_shard_size)
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_yaml:
            with open(os.path.join(tmp, "recipe.yaml"), "w", encoding="utf-8") as f:
                f.write(recipe_yaml)

    write_directory(output_dir, write, overwrite, protected=model_directories(model))


# transformers' save_pretrained arguments that a lowbit checkpoint has no use for: accepted, ignored.
_SAVE_PRETRAINED_IGNORED = {"state_dict", "save_function", "variant", "token", "save_peft_format", "save_original_format",
                            "commit_message", "private", "create_pr", "safe_serialization"}


def attach_save_pretrained(model: nn.Module, recipe_yaml: str = None) -> None:
    """Make `model.save_pretrained(dir, save_compressed=True)` write lowbit's checkpoint, as
    llmcompressor's oneshot does to the models it returns: transformers' own method would
    write the layers' in-memory buffers (zero points unpacked, bitsandbytes' state missing),
    which no loader reads. save_compressed=False writes the decompressed float model."""

    def save_pretrained(self, save_directory, save_compressed: bool = True, max_shard_size=MAX_SHARD_SIZE,
                        is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True): lowbit works offline; save to a directory and upload "
                             "it with huggingface_hub's upload_folder")
        if kwargs.get("safe_serialization") is False:
            raise ValueError("save_pretrained(safe_serialization=False): lowbit writes safetensors only (never pickle)")
        unknown = sorted(set(kwargs) - _SAVE_PRETRAINED_IGNORED)
        if unknown:
            raise TypeError(f"save_pretrained() got unexpected keyword arguments {unknown}")
        if not isinstance(save_compressed, bool):
            raise TypeError(f"save_compressed must be True or False, got {save_compressed!r}")
        if is_main_process:
            save_compressed_checkpoint(self, save_directory, recipe_yaml=recipe_yaml, overwrite=True,
                                       compressed=save_compressed, max_shard_size=max_shard_size)

    model.save_pretrained = types.MethodType(save_pretrained, model)


# The writer under a second name: llmcompressor's save_compressed argument (of save_pretrained and
# oneshot) shadows the first.
save_compressed_checkpoint = save_compressed


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


def _load_compressed_tensors(model: nn.Module, qc: dict, state: Dict[str, torch.Tensor], dtype, device) -> None:
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


def _load_bitsandbytes(model: nn.Module, qc: dict, state: Dict[str, torch.Tensor], dtype, device) -> None:
    if bool(qc.get("load_in_8bit")) == bool(qc.get("load_in_4bit")):
        raise ValueError("a bitsandbytes quantization_config needs exactly one of load_in_4bit / load_in_8bit, got "
                         f"load_in_4bit={qc.get('load_in_4bit')!r}, load_in_8bit={qc.get('load_in_8bit')!r}")
    if not bitsandbytes.load_into(model, state, qc, device):
        raise ValueError("the bitsandbytes checkpoint holds no quantized weight (no *.weight.quant_state.bitsandbytes__* "
                         "or *.SCB entry)")


LOADERS = {"compressed-tensors": _load_compressed_tensors, "bitsandbytes": _load_bitsandbytes}


def load(path, dtype: torch.dtype = None) -> nn.Module:
    """Load a checkpoint directory into lowbit modules: compressed-tensors checkpoints (from
    lowbit or llmcompressor) get PackedLinear / Int8DynamicLinear / Fp8Linear layers, bitsandbytes
    checkpoints (from lowbit or transformers) NF4Linear (4-bit) or Int8OutlierLinear (8-bit)
    layers, all running lowbit's kernels; an unquantized directory loads as transformers
    would load it. Nothing is allocated before the files are checked against config.json on
    a meta-device skeleton: a tensor the model does not expect, one it lacks, or one of the
    wrong shape, dtype or value range is a ValueError naming it, never random weights."""
    from transformers import AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a checkpoint directory")
    dtype = resolve_dtype(dtype, "dtype")
    config, qc = read_config(path)
    stored = read_headers(path)
    check_layer_count(config, stored)
    if qc is None:
        check_against_skeleton(_skeleton(config, dtype), stored, path, unquantized=True)
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                           output_loading_info=True)
        check_loading_info(info, path)
        return model.eval()
    if qc.get("quant_method") not in LOADERS:
        raise ValueError(f"lowbit.load reads compressed-tensors and bitsandbytes checkpoints, not "
                         f"quant_method={qc.get('quant_method')!r}")
    dtype = dtype or config.dtype or torch.float32
    state = read_safetensors(path)
    skeleton = _skeleton(config, dtype)
    meta_state = dict(state)
    LOADERS[qc["quant_method"]](skeleton, qc, meta_state, dtype, "meta")
    check_against_skeleton(skeleton, meta_state, path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    LOADERS[qc["quant_method"]](model, qc, state, dtype, "cpu")
    model.load_state_dict(state, strict=False)
    check_quantized_values(model, path)
    for name, module in model.named_modules():  # a quantized KV cache divides by its scales
        if getattr(module, "_lowbit_kv_scheme", None) is not None:
            for scale in ("k_scale", "v_scale"):
                t = getattr(module, scale)
                if not (torch.isfinite(t).all() and (t > 0).all()):
                    raise ValueError(f"{path}: {name}.{scale} must be finite and > 0 (the KV cache's scale), "
                                     f"got {t.flatten()[:4].tolist()}")
    model.tie_weights()
    model.config.quantization_config = qc
    attach_save_pretrained(model)
    return model.eval()


def _skeleton(config, dtype) -> nn.Module:
    """The model config.json describes, on the meta device: its shapes cost no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype or torch.float32)
