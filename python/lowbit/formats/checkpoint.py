"""The one entry to lowbit's checkpoint formats: save a quantized model in the format whose
modules it holds, load a checkpoint directory by its quant_method. Each format is a peer
module that owns its config, its tensors and its loader (QUANT_METHOD, MODULE_TYPES,
quantization_config, module_tensors, load_into); what they share is in files.py."""

from __future__ import annotations

import copy
import os
import types
from typing import Dict, Optional

import torch
from torch import nn

from . import bitsandbytes, compressed_tensors, gguf
from . import files
# model_directories is also this entry's: oneshot checks output_dir before any work.
# The pipeline's streamed oneshot reaches these through this entry as well.
from .files import (MAX_SHARD_SIZE, TensorSpill, check_against_skeleton, check_layer_count,  # noqa: F401
                    check_loading_info, check_quantized_values, model_directories, read_config, read_headers,
                    read_safetensors, resolve_dtype, state_with, stored_tensors, temp_directory, write_directory,
                    write_safetensors)

# The Hugging Face checkpoint directory formats: quant_method -> the module that writes and reads it.
DIRECTORY_FORMATS = {f.QUANT_METHOD: f for f in (compressed_tensors, bitsandbytes)}
# save_format -> the module that writes that format's file into the output directory
# (write_into(model, directory, tokenizer=, **options)), for the formats that are not a Hugging Face
# checkpoint directory.
FILE_FORMATS = {"gguf": gguf}


def _lowbit_output(directory: str) -> bool:
    return any(fmt.wrote(directory) for fmt in FILE_FORMATS.values())


def check_output_dir(output_dir, overwrite: bool = False, protected=()) -> str:
    """files.check_output_dir, knowing the output directories of every format lowbit writes."""
    return files.check_output_dir(output_dir, overwrite, protected, _lowbit_output)


def check_save_options(model: nn.Module, plan, tokenizer, output_dir, save_format: Optional[str] = None,
                       **format_options) -> dict:
    """save()'s format arguments for `model` once the modules of `plan` (name -> (module, scheme))
    are quantized, checked before any work: a format lowbit writes, its options (a file format
    fills in what the recipe implies and vets the model and tokenizer), and a directory to put
    it in."""
    if save_format in (None, "safetensors"):
        if format_options:
            raise ValueError(f"{', '.join(sorted(format_options))} are options of save_format='gguf'")
        return {} if save_format is None else {"save_format": save_format}
    if save_format not in FILE_FORMATS:
        raise ValueError(f"save_format={save_format!r} is not a format lowbit writes; use one of "
                         f"{', '.join(repr(f) for f in ['safetensors', *FILE_FORMATS])}")
    if output_dir is None:
        raise ValueError(f"save_format={save_format!r} writes into output_dir: pass output_dir= (or call lowbit.save_gguf "
                         "on the returned model)")
    return {"save_format": save_format, **FILE_FORMATS[save_format].check(model, plan, tokenizer, **format_options)}


def _quantized_by(model: nn.Module, names) -> Dict[str, list]:
    """quant_method -> the modules among `names` stored in that format."""
    found: Dict[str, list] = {}
    for name in names:
        module = model.get_submodule(name)
        for method, fmt in DIRECTORY_FORMATS.items():
            if isinstance(module, fmt.MODULE_TYPES):
                found.setdefault(method, []).append(name)
    return found


def quantization_config(model: nn.Module, plan) -> Optional[dict]:
    """config.json's quantization_config for the modules of `plan` (name -> (module, scheme)),
    once quantized, written by the format whose modules they are; None when none of them is
    stored quantized (transformers' Conv1D layers are saved as floats)."""
    found = _quantized_by(model, plan)
    if len(found) > 1:
        kinds = "; ".join(f"{method}: {names[0]} ({type(model.get_submodule(names[0])).__name__})"
                          f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}"
                          for method, names in found.items())
        raise ValueError(f"the quantized layers belong to {len(found)} checkpoint formats ({kinds}), and one "
                         "checkpoint cannot hold both: pick one scheme family for the recipe (compressed-tensors: "
                         "W4A16, W8A8, FP8, ...; bitsandbytes: NF4, FP4, LLM.int8()), or quantize the two kinds "
                         "in separate runs")
    if not found:
        return None
    return DIRECTORY_FORMATS[found.popitem()[0]].quantization_config(model, plan)


def _module_tensors(module: nn.Module):
    for fmt in DIRECTORY_FORMATS.values():
        tensors = fmt.module_tensors(module)
        if tensors is not None:
            return tensors
    return None


def compressed_state_dict(model: nn.Module, skip: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model's tensors in the checkpoint's names and layouts, sorted by name (skip: a
    module left out, see state_with)."""
    from ..nn import QUANTIZED_LINEAR_TYPES

    replaced = {}
    for name, module in model.named_modules():
        if skip is not None and (name + ".").startswith(skip + "."):
            continue
        tensors = _module_tensors(module)
        if tensors is not None:
            replaced[name] = tensors
        elif isinstance(module, QUANTIZED_LINEAR_TYPES) and not any(isinstance(module, f.MODULE_TYPES)
                                                                    for f in DIRECTORY_FORMATS.values()):
            raise ValueError(f"{name} is a {type(module).__name__}, which no Hugging Face checkpoint format holds; "
                             "save it with save_format='gguf' (or lowbit.save_gguf)")
    return state_with(model, replaced, skip)


def saved_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a decompressed checkpoint's weights: the model's."""
    dtype = getattr(model.config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def decompressed_state_dict(model: nn.Module, dtype: Optional[torch.dtype] = None,
                            skip: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The quantized model as a plain float checkpoint (llmcompressor's save_compressed=False):
    every lowbit layer's weight dequantized in `dtype` (default the model's, saved_dtype), its
    quantized buffers dropped, so any loader reads it as an ordinary model whose weights lie on
    the grid. skip: see state_with."""
    from ..nn import QUANTIZED_LINEAR_TYPES

    dtype = dtype or saved_dtype(model)
    return state_with(model, {name: {"weight": m.dequantized_weight(dtype)} for name, m in model.named_modules()
                              if isinstance(m, QUANTIZED_LINEAR_TYPES)
                              and not (skip is not None and name.startswith(skip + "."))}, skip)


def write_metadata(model: nn.Module, directory: str, tokenizer=None, recipe_yaml: str = None,
                   compressed: bool = True) -> None:
    """Everything of a checkpoint directory but its tensors: config.json (without
    quantization_config when decompressed), generation_config.json, the tokenizer and
    recipe.yaml."""
    if compressed:
        model.config.save_pretrained(directory)
    else:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if recipe_yaml:
        with open(os.path.join(directory, "recipe.yaml"), "w", encoding="utf-8") as f:
            f.write(recipe_yaml)


def save(model: nn.Module, output_dir, tokenizer=None, recipe_yaml: str = None, overwrite: bool = False,
         compressed: bool = True, max_shard_size=MAX_SHARD_SIZE, save_format: str = None, **format_options) -> None:
    """Write config.json (with quantization_config), safetensors, the tokenizer and
    recipe.yaml to a temporary directory beside `output_dir`, then swap it into place, so
    that `output_dir` holds the old or the complete new checkpoint at every instant (see
    files.write_directory for the paths it refuses). compressed=False writes the
    decompressed model instead (decompressed_state_dict; config.json without
    quantization_config). save_format: None or "safetensors" for this directory, or a format of
    FILE_FORMATS ("gguf": the model's GGUF file and recipe.yaml, the format's options such as
    gguf_type passed on)."""
    if save_format not in (None, "safetensors", *FILE_FORMATS):
        raise ValueError(f"save_format={save_format!r} is not a format lowbit writes; use one of "
                         f"{', '.join(repr(f) for f in ['safetensors', *FILE_FORMATS])}")
    if format_options and save_format not in FILE_FORMATS:
        raise TypeError(f"{sorted(format_options)} are options of save_format='gguf', not of a safetensors checkpoint")

    def write(tmp: str) -> None:
        if save_format in FILE_FORMATS:
            FILE_FORMATS[save_format].write_into(model, tmp, tokenizer=tokenizer, **format_options)
            if recipe_yaml:
                with open(os.path.join(tmp, "recipe.yaml"), "w", encoding="utf-8") as f:
                    f.write(recipe_yaml)
            return
        state = compressed_state_dict(model) if compressed else decompressed_state_dict(model)
        write_safetensors(state, tmp, max_shard_size)
        write_metadata(model, tmp, tokenizer, recipe_yaml, compressed)

    write_directory(output_dir, write, overwrite, protected=model_directories(model), lowbit_output=_lowbit_output)


# The public name (lowbit.save_compressed), as llmcompressor calls it.
save_compressed = save

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
            save(self, save_directory, recipe_yaml=recipe_yaml, overwrite=True, compressed=save_compressed,
                 max_shard_size=max_shard_size)

    model.save_pretrained = types.MethodType(save_pretrained, model)


# ---------------------------------------------------------------- loading

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
        check_against_skeleton(skeleton(config, dtype), stored, path, unquantized=True)
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                           output_loading_info=True)
        check_loading_info(info, path)
        return model.eval()
    fmt = DIRECTORY_FORMATS.get(qc.get("quant_method"))
    if fmt is None:
        raise ValueError(f"lowbit.load reads checkpoints of quant_method {', '.join(map(repr, DIRECTORY_FORMATS))}, "
                         f"not {qc.get('quant_method')!r}")
    dtype = dtype or config.dtype or torch.float32
    state = read_safetensors(path)
    meta_model = skeleton(config, dtype)
    meta_state = dict(state)
    fmt.load_into(meta_model, qc, meta_state, dtype, "meta")
    check_against_skeleton(meta_model, meta_state, path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fmt.load_into(model, qc, state, dtype, "cpu")
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


def skeleton(config, dtype) -> nn.Module:
    """The model config.json describes, on the meta device: its shapes cost no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype or torch.float32)
