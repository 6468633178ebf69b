"""compressed-tensors checkpoints (what llmcompressor writes and transformers / vLLM read):
pack-quantized for WnA16, int-quantized for W8A8. Save from and load into lowbit modules."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import functional as F
from . import bitsandbytes
from ..modifiers.base import matches
from ..nn.convert import replace_module
from ..nn.int8_dynamic import Int8DynamicLinear
from ..nn.int8_outlier import Int8OutlierLinear
from ..nn.nf4_linear import NF4Linear
from ..nn.packed_linear import PackedLinear
from ..schemes import QuantizationArgs, QuantizationScheme, args_from_dict

# Shard size of the safetensors files (transformers' default).
MAX_SHARD_SIZE = "5GB"


def _args_dict(args: QuantizationArgs) -> dict:
    return {
        "num_bits": args.num_bits, "type": "int", "symmetric": args.symmetric, "strategy": args.strategy,
        "group_size": args.group_size, "dynamic": args.dynamic, "actorder": args.actorder, "block_structure": None,
        "observer": None if args.dynamic else args.observer, "observer_kwargs": {},
    }


def _format(scheme: QuantizationScheme) -> str:
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


def check_output_dir(output_dir, overwrite: bool) -> None:
    path = os.fspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output_dir {path!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"output_dir {path!r} is not empty; pass overwrite=True to replace it, or choose a new directory")


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
    out = {"weight_packed": module.weight_packed, "weight_scale": module.weight_scale,
           "weight_shape": module.weight_shape}
    if module.weight_zero_point is not None:
        out["weight_zero_point"] = F.pack(module.weight_zero_point, module.args.num_bits, packed_dim=0)
    if module.weight_g_idx is not None:
        out["weight_g_idx"] = module.weight_g_idx
    return out


def compressed_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's tensors in the checkpoint's names and layouts, sorted by name; tied
    duplicates (an lm_head sharing the embedding) are dropped, transformers re-ties them."""
    replaced = {name: t for name, m in model.named_modules() if (t := _quantized_tensors(m)) is not None}
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


def _write_safetensors(state: Dict[str, torch.Tensor], directory: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, os.path.join(directory, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def save_compressed(model: nn.Module, output_dir, tokenizer=None, recipe_yaml: str = None,
                    overwrite: bool = False) -> None:
    """Write config.json (with quantization_config), safetensors, the tokenizer and
    recipe.yaml to a temporary directory beside `output_dir`, then rename it into place, so
    a failure never leaves a half-written output directory."""
    check_output_dir(output_dir, overwrite)
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lowbit-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
    try:
        _write_safetensors(compressed_state_dict(model), tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_yaml:
            with open(os.path.join(tmp, "recipe.yaml"), "w", encoding="utf-8") as f:
                f.write(recipe_yaml)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- loading

def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path!r} holds no model.safetensors (lowbit loads safetensors only, never pickles)")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def _plan_from_config(model: nn.Module, qc: dict) -> Dict[str, Tuple[nn.Module, QuantizationScheme]]:
    ignore = qc.get("ignore") or []
    plan = {}
    for group_name, group in (qc.get("config_groups") or {}).items():
        if group.get("output_activations"):
            raise ValueError(f"config group {group_name!r} quantizes output activations, which lowbit does not run")
        acts = group.get("input_activations")
        scheme = QuantizationScheme(args_from_dict(group["weights"]), args_from_dict(acts) if acts else None)
        for name, module in model.named_modules():
            if (isinstance(module, nn.Linear) and name not in plan
                    and any(matches(t, name, module) for t in group.get("targets", []))
                    and not any(matches(p, name, module) for p in ignore)):
                plan[name] = (module, scheme)
    return plan


def _empty_quantized(module: nn.Linear, scheme: QuantizationScheme, dtype: torch.dtype) -> nn.Module:
    """A quantized module of the right shapes, to be filled from the checkpoint."""
    bias = module.bias is not None
    if scheme.input_activations is not None:
        return Int8DynamicLinear(module.in_features, module.out_features, bias, dtype=dtype)
    return PackedLinear(module.in_features, module.out_features, bias, scheme, dtype=dtype)


def _to_module_layout(model: nn.Module, plan, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors -> lowbit modules' state: zero points unpacked along dim 0."""
    for name, (_, scheme) in plan.items():
        module, args = model.get_submodule(name), scheme.weights
        if isinstance(module, Int8DynamicLinear):
            continue
        zero = state.get(f"{name}.weight_zero_point")
        if zero is not None:
            groups = module.weight_scale.shape[1]
            state[f"{name}.weight_zero_point"] = F.unpack(zero, args.num_bits, (module.out_features, groups), packed_dim=0)
    return state


def _load_compressed_tensors(model: nn.Module, qc: dict, state: Dict[str, torch.Tensor], dtype) -> None:
    if qc.get("quantization_status", "compressed") != "compressed" or qc.get("format") not in (
            "pack-quantized", "int-quantized", "mixed-precision"):
        raise ValueError(f"unsupported compressed-tensors format {qc.get('format')!r} "
                         f"(status {qc.get('quantization_status')!r}); lowbit reads pack-quantized and int-quantized")
    plan = _plan_from_config(model, qc)
    if not plan:
        raise ValueError("the quantization_config's config_groups match no module of the model")
    for name, (module, scheme) in plan.items():
        replace_module(model, name, _empty_quantized(module, scheme, dtype))
    _to_module_layout(model, plan, state)


def _load_bitsandbytes(model: nn.Module, qc: dict, state: Dict[str, torch.Tensor], dtype) -> None:
    if bool(qc.get("load_in_8bit")) == bool(qc.get("load_in_4bit")):
        raise ValueError("a bitsandbytes quantization_config needs exactly one of load_in_4bit / load_in_8bit, got "
                         f"load_in_4bit={qc.get('load_in_4bit')!r}, load_in_8bit={qc.get('load_in_8bit')!r}")
    if not bitsandbytes.load_into(model, state, qc):
        raise ValueError("the bitsandbytes checkpoint holds no quantized weight (no *.weight.quant_state.bitsandbytes__* "
                         "or *.SCB entry)")


LOADERS = {"compressed-tensors": _load_compressed_tensors, "bitsandbytes": _load_bitsandbytes}


def load(path, dtype: torch.dtype = None) -> nn.Module:
    """Load a checkpoint directory into lowbit modules: compressed-tensors checkpoints (from
    lowbit or llmcompressor) get PackedLinear / Int8DynamicLinear layers, bitsandbytes
    checkpoints (from lowbit or transformers) NF4Linear (4-bit) or Int8OutlierLinear (8-bit)
    layers, all running lowbit's kernels;
    an unquantized directory loads as transformers would load it. A tensor the model does not
    expect, or one it lacks, is an error."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype).eval()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") not in LOADERS:
        raise ValueError(f"lowbit.load reads compressed-tensors and bitsandbytes checkpoints, not "
                         f"quant_method={qc.get('quant_method')!r}")
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _read_safetensors(path)
    LOADERS[qc["quant_method"]](model, qc, state, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint and model disagree: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.config.quantization_config = qc
    return model.eval()
