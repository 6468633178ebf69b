"""oneshot(): llmcompressor's call, run layer by layer on the CPU."""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.checkpoint import check_output_dir, model_directories
from ..formats.compressed_tensors import quantization_config, save_compressed
from ..formats import bitsandbytes
from ..modifiers import BnB4bitScheme, LLMInt8Scheme, Modifier
from ..modifiers.base import in_features
from ..nn.convert import replace_module
from ..recipe import Recipe, parse_recipe, recipe_to_yaml
from ..schemes import QuantizationScheme
from .data import DEFAULT_MAX_SEQ_LENGTH, check_calibration_args, check_token_ids, prepare_calibration
from .layers import capture_first_layer_inputs, decoder_layers, layer_output

logger = logging.getLogger("lowbit")
if not logger.handlers:
    # Like llmcompressor, report each layer by default; users tune or silence this through
    # logging.getLogger("lowbit").
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s lowbit: %(message)s", "%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

Plan = Dict[str, Tuple[nn.Module, QuantizationScheme]]

# When no modifier needs calibration (RTN), data only serves the per-layer error log: a few
# short samples measure it well and keep oneshot about as fast as a data-free run. With AWQ
# (float outputs feed the next layer) the quantized pass also runs on ERROR_LOG_SAMPLES only.
ERROR_LOG_SAMPLES = 4
ERROR_LOG_TOKENS = 128


def _load(model, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise ValueError(f"model path {path!r} is not a directory (lowbit loads local models only)")
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                tokenizer = None
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_output_embeddings") \
            or model.get_output_embeddings() is None:
        raise ValueError(f"oneshot needs a causal language model (a PreTrainedModel with an LM head), "
                         f"got {type(model).__name__}")
    return model.eval(), tokenizer


def _plan(model: nn.Module, modifiers) -> Tuple[Plan, Dict[str, Modifier]]:
    """(module name -> (module, scheme), module name -> the modifier that quantizes it)."""
    plan: Plan = {}
    owners: Dict[str, Modifier] = {}
    for modifier in modifiers:
        for name, entry in modifier.plan(model).items():
            if name in plan:
                raise ValueError(f"module {name!r} is targeted by two modifiers; give it to one of them")
            plan[name], owners[name] = entry, modifier
    if not plan:
        asked = "; ".join(f"{type(m).__name__}(targets={m.targets}, ignore={m.ignore})" for m in modifiers)
        raise ValueError(f"the recipe quantizes no layer of {type(model).__name__}: {asked} leave nothing to "
                         "quantize (every target is ignored or already quantized); fix targets / ignore")
    bad = [f"{name} ({in_features(module)} columns, group_size {scheme.weights.group_size})"
           for name, (module, scheme) in plan.items()
           if isinstance(scheme, QuantizationScheme) and scheme.weights.strategy == "group"
           and in_features(module) % scheme.weights.group_size]
    if bad:
        raise ValueError(f"the group size does not divide the input columns of {', '.join(bad[:4])}"
                         f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}; choose a group size that divides "
                         "them (config_groups with weights.group_size) or strategy 'channel'")
    return plan, owners


def _quantize(model: nn.Module, plan: Plan, owners: Dict[str, Modifier], names) -> None:
    for name in names:
        module, scheme = plan[name]
        replace_module(model, name, owners[name].quantize_module(name, module, scheme))


def oneshot(model, recipe: Recipe = None, dataset=None, *, num_calibration_samples: int = 512,
            max_seq_length: Optional[int] = None, output_dir: Optional[str] = None, text_column: str = "text",
            shuffle: bool = True, seed: int = 0, tokenizer=None, overwrite: bool = False):
    """Quantize `model` (a PreTrainedModel or a local path) in place with `recipe` and return it.

    recipe: a preset name ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "NF4", "INT8_OUTLIER", ...), a
    modifier, a list of modifiers, or llmcompressor YAML (string or file). dataset: calibration
    data for modifiers that need it (list of strings, datasets.Dataset, .txt/.jsonl/.json path,
    DataLoader or token ids); with RTN, NF4 or LLM.int8() it is optional and, given, each
    layer's output error is logged (measured on the first ERROR_LOG_SAMPLES samples,
    ERROR_LOG_TOKENS tokens each; LLM.int8() uses all of it to report its outlier dimensions).
    output_dir: save there in compressed-tensors format (bitsandbytes' for NF4 / FP4 and
    LLM.int8()), written to a temporary directory, then renamed; an existing non-empty
    directory is refused unless overwrite=True.
    """
    check_calibration_args(num_calibration_samples, max_seq_length)
    modifiers = parse_recipe(recipe)
    if output_dir is not None:  # refused before any work; checked again when the checkpoint is written
        check_output_dir(output_dir, overwrite, [model] if isinstance(model, (str, os.PathLike))
                         else model_directories(model))
    model, tokenizer = _load(model, tokenizer)
    plan, owners = _plan(model, modifiers)
    needs_data = [type(m).__name__ for m in modifiers if m.requires_calibration]
    if needs_data and dataset is None:
        raise ValueError(f"{', '.join(needs_data)} needs calibration data: pass dataset=")
    samples = None
    if dataset is not None:
        samples = prepare_calibration(dataset, tokenizer, num_calibration_samples=num_calibration_samples,
                                      max_seq_length=max_seq_length or DEFAULT_MAX_SEQ_LENGTH,
                                      text_column=text_column, shuffle=shuffle, seed=seed)
        check_token_ids(samples, model.get_input_embeddings().num_embeddings)
        if not needs_data and not any(m.collects_statistics for m in modifiers):
            samples = [{k: v[:, :ERROR_LOG_TOKENS] for k, v in s.items()} for s in samples[:ERROR_LOG_SAMPLES]]

    output_embeddings = model.get_output_embeddings()
    layers_name, layers = decoder_layers(model)
    per_layer = [[n for n in plan if n.startswith(f"{layers_name}.{i}.")] for i in range(len(layers))]
    outside = [n for n in plan if not any(n in names for names in per_layer)]
    start = time.perf_counter()
    if samples is None:
        for i, names in enumerate(tqdm(per_layer, desc="lowbit: quantizing layers", unit="layer")):
            t0 = time.perf_counter()
            _quantize(model, plan, owners, names)
            logger.info("layer %d: %d modules in %.2f s (no calibration data: output error not measured)",
                        i, len(names), time.perf_counter() - t0)
    else:
        _run_layer_sequential(model, layers_name, layers, per_layer, plan, owners, modifiers, samples)
    _quantize(model, plan, owners, outside)
    logger.info("oneshot: %d modules quantized in %.1f s", len(plan), time.perf_counter() - start)

    _finish_config(model, plan, output_embeddings)
    if output_dir is not None:
        save_compressed(model, output_dir, tokenizer=tokenizer, recipe_yaml=recipe_to_yaml(modifiers),
                        overwrite=overwrite)
    return model


def _finish_config(model, plan: Plan, output_embeddings: nn.Module) -> None:
    """Record the quantization in model.config, as compressed-tensors (or, for NF4 / FP4 and
    LLM.int8(), transformers' bitsandbytes integration) describes it."""
    if any(module is output_embeddings for module, _ in plan.values()):
        # lm_head now holds its own quantized weight; the embedding stays float.
        model.config.tie_word_embeddings = False
    if any(isinstance(scheme, (BnB4bitScheme, LLMInt8Scheme)) for _, scheme in plan.values()):
        config = bitsandbytes.quantization_config(model, plan)
    else:
        config = quantization_config(model, plan)
    if config is not None:
        model.config.quantization_config = config
    if any(not isinstance(module, nn.Linear) for module, _ in plan.values()):
        logger.warning("Conv1D layers (GPT-2 style) were quantized, but compressed-tensors has no layout for them: "
                       "they are saved as float weights that lie on the integer grid")


def _run_layer_sequential(model, layers_name, layers, per_layer, plan: Plan, owners, modifiers, samples) -> None:
    """Calibrate and quantize one decoder layer at a time: a float pass feeds the modifiers'
    statistics, transforming modifiers (AWQ) change the layer, quantizing ones replace its
    Linears, and the relative output error of each layer (quantized vs float outputs on the
    same inputs) is logged. The next layer's inputs are the quantized outputs (so GPTQ
    corrects earlier layers' errors) unless a modifier asks for the float ones (AWQ)."""
    names = [f"{layers_name}.{i}" for i in range(len(layers))]
    for modifier in modifiers:
        modifier.prepare(model, names, plan)
    float_inputs = any(m.propagates_float_outputs for m in modifiers)
    inputs = capture_first_layer_inputs(model, layers, samples)
    bar = tqdm(range(len(layers)), desc="lowbit: calibrating layers", unit="layer")
    for i in bar:
        layer, t0 = layers[i], time.perf_counter()
        hooks = [h for name in per_layer[i] if (h := owners[name].calibration_hook(name, plan[name][0]))]
        hooks += [h for m in modifiers for h in m.layer_hooks(names[i], layer, plan)]
        with torch.inference_mode():
            try:  # the float pass gives the reference outputs and feeds the modifiers' statistics
                reference = [layer_output(layer(*args, **kwargs)) for args, kwargs in inputs]
            finally:
                for h in hooks:
                    h.remove()
            for modifier in modifiers:
                modifier.transform_layer(names[i], layer, plan)
            _quantize(model, plan, owners, per_layer[i])
            # With float propagation the quantized pass only measures the error: a few samples do.
            measured = inputs[:ERROR_LOG_SAMPLES] if float_inputs else inputs
            outputs = [layer_output(layer(*args, **kwargs)) for args, kwargs in measured]
        err = (sum((o - r).float().pow(2).sum() for o, r in zip(outputs, reference))
               / sum(r.float().pow(2).sum() for r in reference[:len(outputs)]).clamp_min(1e-30)).sqrt().item()
        if not torch.isfinite(torch.tensor(err)):
            raise ValueError(f"layer {i} produced NaN or Inf outputs on the calibration data")
        logger.info("layer %d: %d modules in %.2f s, relative output error %.4f", i, len(per_layer[i]),
                    time.perf_counter() - t0, err)
        bar.set_postfix(err=f"{err:.4f}")
        inputs = [_with_hidden_states(args, kwargs, out)
                  for out, (args, kwargs) in zip(reference if float_inputs else outputs, inputs)]
        del reference


def _with_hidden_states(args, kwargs, hidden):
    """The next layer's inputs: the same keyword arguments, new hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
