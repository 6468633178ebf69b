"""Models bigger than memory: oneshot of a checkpoint directory with one decoder layer's
weights in memory at a time. The model is a skeleton on the meta device; a layer's weights
are read from the safetensors shards when its turn comes, it is calibrated and quantized by
the same code as in memory, its checkpoint tensors go to a spill file on disk, and it is
freed. The checkpoint is then assembled from the spill: the same shards, bytes and index as
the in-memory save of the same model."""

from __future__ import annotations

import ctypes
import os
import shutil
from typing import Dict, Iterable, Optional

import torch
from safetensors import safe_open
from torch import nn

from ..formats import checkpoint
from ..formats.checkpoint import (TensorSpill, check_against_skeleton, check_layer_count, stored_tensors,
                                  temp_directory)
from .activations import MEMORY_FRACTION, available_memory

# Headroom on the output estimate: scales, zero points and format metadata beside the codes.
OUTPUT_SIZE_MARGIN = 1.25


def should_stream(stream_weights, model, output_dir, save_format, float_bytes) -> bool:
    """oneshot's stream_weights argument resolved: True / False as given (True needs a local
    checkpoint directory and an output_dir), "auto" streams a checkpoint directory saved to a
    Hugging Face checkpoint whose float weights (float_bytes()) would take over MEMORY_FRACTION
    of the memory available."""
    if stream_weights not in (True, False, "auto"):
        raise ValueError(f"stream_weights must be True, False or 'auto', got {stream_weights!r}")
    from_directory = isinstance(model, (str, os.PathLike))
    if stream_weights is True:
        if not from_directory:
            raise ValueError("stream_weights=True reads the model's weights one decoder layer at a time from its "
                             "checkpoint directory: pass the directory's path as model, not a loaded model")
        if output_dir is None:
            raise ValueError("stream_weights=True writes each quantized layer to the checkpoint as it goes: pass "
                             "output_dir=")
        if save_format not in (None, "safetensors"):
            raise ValueError(f"stream_weights=True writes a safetensors checkpoint; save_format={save_format!r} needs "
                             "the whole model in memory (stream_weights=False)")
        return True
    if stream_weights is False or not from_directory or output_dir is None or save_format not in (None, "safetensors"):
        return False
    return float_bytes() > MEMORY_FRACTION * available_memory()


def _real_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers computed at construction and never stored (rotary inv_freq) are meta in a
    skeleton: allocate them on the CPU and fill them with the model's own _init_weights, as
    transformers does after its meta-device load."""
    for _, module in model.named_modules():
        names = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if names:
            for name in names:
                module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
            model._init_weights(module)


class StreamedCheckpoint:
    """The model of checkpoint directory `path` as a meta-device skeleton whose tensors are read
    from the safetensors files when load() asks for them and dropped by release()."""

    def __init__(self, path: str, config, dtype: torch.dtype):
        stored, self._files = stored_tensors(path)  # checks the index against the shards
        check_layer_count(config, stored)
        self.path = path
        self.model = checkpoint.skeleton(config, dtype)
        _real_non_persistent_buffers(self.model)
        self.model.tie_weights()
        check_against_skeleton(self.model, stored, path, unquantized=True)
        _generation_config(self.model, path)

    def load(self, prefixes: Iterable[str], exclude: Iterable[str] = ()) -> None:
        """Read every stored tensor under one of `prefixes` ("" for the whole model) but those
        under `exclude`, in the skeleton's dtype, then re-tie tied weights. Each file is opened
        for this read only: a shard's mapping does not outlive the tensors read from it."""
        prefixes, exclude = list(prefixes), [e + "." for e in exclude]
        handles = {}
        for key, current in self.model.state_dict(keep_vars=True).items():
            if key not in self._files or not any(key.startswith(p + "." if p else "") for p in prefixes) \
                    or any(key.startswith(e) for e in exclude):
                continue
            file = self._files[key]
            try:
                if file not in handles:
                    handles[file] = safe_open(file, framework="pt")
                value = handles[file].get_tensor(key).to(current.dtype)
            except Exception as e:  # data shorter than the header says, for one
                raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
            owner, _, leaf = key.rpartition(".")
            module = self.model.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)
            else:
                module._buffers[leaf] = value
        handles.clear()
        self.model.tie_weights()

    @staticmethod
    def release(*modules: nn.Module) -> None:
        """Drop the modules' tensors (back to meta) and hand the freed memory back to the system."""
        for module in modules:
            module.to("meta")
        _trim_heap()


def _trim_heap() -> None:
    """glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so without
    this a streamed run's resident memory grows with every layer (measured on bench_scale's 1B
    model, RTN: +45 MB per layer; flat with it). A no-op where malloc_trim does not exist."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _generation_config(model: nn.Module, path: str) -> None:
    """The generation config from_pretrained gives the model: generation_config.json, else one
    made from config.json."""
    from transformers import GenerationConfig

    if not model.can_generate():
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        model.generation_config = GenerationConfig.from_pretrained(path, config_file_name="config.json",
                                                                   _from_model_config=True)


def estimated_output_bytes(model: nn.Module, plan, compressed: bool = True) -> int:
    """An upper estimate of the checkpoint's size: each planned Linear's weight at its scheme's
    bits (compressed) or its dtype's (a decompressed checkpoint), everything else as stored in
    the model's dtypes, times OUTPUT_SIZE_MARGIN."""
    planned = {id(module.weight): _weight_bits(scheme) for module, scheme in plan.values()} if compressed else {}
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        bits = planned.get(id(t), t.element_size() * 8)
        total += t.numel() * bits // 8
    return int(total * OUTPUT_SIZE_MARGIN)


def _weight_bits(scheme) -> int:
    weights = getattr(scheme, "weights", None)
    if weights is not None and getattr(weights, "num_bits", None):
        return weights.num_bits
    return 8 if hasattr(scheme, "threshold") else 4  # LLM.int8(): int8 codes; NF4 / FP4: 4-bit codes


def check_free_space(output_dir, need: int, what: str) -> str:
    """The directory output_dir will be written in (created), with `need` bytes free there, or a
    ValueError naming the estimate."""
    parent = os.path.dirname(os.path.realpath(output_dir))
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ValueError(f"{what} needs about {need / 2**30:.2f} GiB free beside output_dir, but {parent!r} has "
                         f"{free / 2**30:.2f} GiB: free space there or choose an output_dir on a larger disk")
    return parent


class LayerSpill:
    """Where a streamed oneshot puts each quantized layer's checkpoint tensors until the
    checkpoint is written: a spill file in a temporary directory beside output_dir (on its disk,
    so the final copy is a kernel copy; a killed run's directory is removed by the next save
    there). Free space for the spill and the checkpoint is checked up front."""

    def __init__(self, output_dir: str, estimate: int):
        parent = check_free_space(output_dir, 2 * estimate, f"a streamed oneshot ({estimate / 2**30:.2f} GiB of "
                                  "quantized layers spilled as they are done, as much for the checkpoint assembled "
                                  "from them)")
        self.directory = temp_directory(parent)
        self.tensors = TensorSpill(self.directory)

    def put(self, prefix: str, state: Dict[str, torch.Tensor]) -> None:
        for key, tensor in state.items():
            self.tensors.put(f"{prefix}.{key}" if prefix else key, tensor)

    def close(self) -> None:
        self.tensors.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def module_state(model: nn.Module, module: nn.Module, compressed: bool, skip: Optional[str] = None):
    """The checkpoint tensors of `module` (part of `model`), named relative to it, as the
    in-memory save writes them (compressed or dequantized in the model's dtype)."""
    if compressed:
        return checkpoint.compressed_state_dict(module, skip)
    return checkpoint.decompressed_state_dict(module, checkpoint.saved_dtype(model), skip)
