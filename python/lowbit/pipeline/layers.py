"""Decoder layers of a causal LM and the inputs of the first one, without fx tracing."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .data import Sample


def decoder_layers(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's repeated block list (model.layers, decoder.layers, transformer.h, ...):
    the first ModuleList as long as config.num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise ValueError(f"could not find the decoder layers of {type(model).__name__} "
                     f"(no ModuleList of num_hidden_layers={n} blocks)")


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first decoder layer."""


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: List[Sample]):
    """Run each sample until the first decoder layer and keep its positional inputs and its
    keyword arguments (attention mask, position embeddings, ...)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for sample in samples:
                try:
                    model(**sample, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def layer_output(output):
    """The hidden states a decoder layer returns (a tensor, or the first of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output
