"""oneshot(): llmcompressor's call, run layer by layer on the CPU."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import checkpoint
from ..formats.checkpoint import MAX_SHARD_SIZE, read_headers, write_directory
from ..modifiers import Modifier
from ..nn.convert import replace_module
from ..recipe import Recipe, parse_recipe, recipe_to_yaml
from ..schemes import QuantizationScheme
from ..targets import in_features
from .activations import ActivationStore, check_activations, resolve_mode
from .arguments import parse_recipe_args, pipeline_mode, warn_no_effect
from . import distributed as dist_calibration
from .data import DEFAULT_MAX_SEQ_LENGTH, check_calibration_args, check_token_ids, prepare_calibration
from .layers import capture_first_layer_inputs, decoder_layers, layer_output
from .streaming import (LayerSpill, StreamedCheckpoint, check_free_space, estimated_output_bytes,
                        module_state, should_stream)

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


def _load(model, tokenizer, *, config_name=None, precision="auto", trust_remote_code=False,
          model_revision="main", tie_word_embeddings=True):
    from transformers import AutoModelForCausalLM

    _check_revision(model_revision)
    dtype = _precision(precision)
    if isinstance(model, (str, os.PathLike)):
        path, config = _local_config(model, config_name, model_revision, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code,
                                                     **({"dtype": dtype} if dtype is not None else {}))
    elif dtype is not None:
        model = model.to(dtype)
    model, tokenizer = _checked(model, _tokenizer(tokenizer, checkpoint.model_directories(model)))
    if not tie_word_embeddings:
        _untie_word_embeddings(model)
    return model.eval(), tokenizer


def _check_revision(model_revision) -> None:
    if model_revision != "main":
        raise ValueError(f"model_revision={model_revision!r}: lowbit loads local directories only; check out that "
                         "revision into a directory and pass its path")


def _local_config(model, config_name, model_revision, trust_remote_code):
    """(the model directory's path, its transformers config, or config_name's)."""
    from transformers import AutoConfig

    _check_revision(model_revision)
    path = os.fspath(model)
    if not os.path.isdir(path):
        raise ValueError(f"model {path!r} is not a local directory: lowbit works offline and loads local models "
                         "only (download it once, e.g. with huggingface-cli download, and pass the directory)")
    return path, AutoConfig.from_pretrained(os.fspath(config_name) if config_name else path,
                                            trust_remote_code=trust_remote_code)


def _tokenizer(tokenizer, directories):
    """The tokenizer given (or its path), else, as llmcompressor, the one saved beside the model."""
    from transformers import AutoTokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if tokenizer is None:
        for directory in directories:
            try:
                return AutoTokenizer.from_pretrained(directory)
            except (OSError, ValueError, TypeError):
                continue
    return tokenizer


def _checked(model, tokenizer):
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or not hasattr(model, "get_output_embeddings") \
            or model.get_output_embeddings() is None:
        raise ValueError(f"oneshot needs a causal language model (a PreTrainedModel with an LM head), "
                         f"got {type(model).__name__}")
    return model, tokenizer


def _open_streamed(model, tokenizer, *, config_name=None, precision="auto", trust_remote_code=False,
                   model_revision="main", tie_word_embeddings=True):
    """_load for a streamed oneshot: the checkpoint directory's model as a skeleton whose weights
    stay in the files (StreamedCheckpoint), in the dtype from_pretrained would give it."""
    path, config = _local_config(model, config_name, model_revision, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{path!r} is already quantized (config.json has a quantization_config); oneshot quantizes a "
                         "float checkpoint")
    if not tie_word_embeddings:
        raise ValueError("tie_word_embeddings=False copies the embedding into the LM head in memory; a streamed "
                         "oneshot reads each weight from the checkpoint: pass stream_weights=False")
    dtype = _precision(precision) or _stored_dtype(config)
    source = StreamedCheckpoint(path, config, dtype)
    model, tokenizer = _checked(source.model, _tokenizer(tokenizer, [path]))
    return model.eval(), tokenizer, source


def _stored_dtype(config) -> torch.dtype:
    """The dtype from_pretrained gives a model by default: config.json's."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _float_bytes(model, config_name, precision, model_revision, trust_remote_code) -> int:
    """Bytes the checkpoint directory's model takes in memory, from its files' headers."""
    path, config = _local_config(model, config_name, model_revision, trust_remote_code)
    dtype = _precision(precision) or _stored_dtype(config)
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in read_headers(path).values())


def _precision(precision):
    """llmcompressor's precision: "auto" (as stored) or a dtype name / torch.dtype."""
    if precision in ("auto", None):
        return None
    if isinstance(precision, torch.dtype):
        return precision
    dtype = getattr(torch, str(precision).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"precision={precision!r}: use 'auto' or a float dtype such as 'float32' or 'bfloat16'")
    return dtype


def _untie_word_embeddings(model) -> None:
    """tie_word_embeddings=False: the LM head gets its own copy of the embedding matrix."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False


def _tokenizer_of(processor):
    """The text tokenizer of a processor (multimodal processors hold one), or the tokenizer itself."""
    return getattr(processor, "tokenizer", processor)


def _check_sequential_targets(sequential_targets, layers) -> None:
    if sequential_targets is None:
        return
    targets = [sequential_targets] if isinstance(sequential_targets, str) else list(sequential_targets)
    found = type(layers[0]).__name__
    if targets != [found]:
        raise ValueError(f"sequential_targets={targets!r}: lowbit calibrates one decoder layer at a time, and this "
                         f"model's decoder layers are {found}; pass [{found!r}] or leave sequential_targets unset")


def _plan(model: nn.Module, modifiers, calibrated: bool) -> Tuple[Plan, Dict[str, Modifier]]:
    """(module name -> (module, scheme), module name -> the modifier that quantizes it);
    calibrated: there is calibration data."""
    plan: Plan = {}
    owners: Dict[str, Modifier] = {}
    for modifier in modifiers:
        for name, entry in modifier.plan(model, calibrated=calibrated).items():
            if name in plan:
                raise ValueError(f"module {name!r} is targeted by two modifiers; give it to one of them")
            plan[name], owners[name] = entry, modifier
    if not plan and not any(m.measures_only for m in modifiers):
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


def _by_layer(plan: Plan, layers_name: str, n_layers: int):
    """(the planned module names of each decoder layer, those outside every decoder layer)."""
    per_layer = [[n for n in plan if n.startswith(f"{layers_name}.{i}.")] for i in range(n_layers)]
    return per_layer, [n for n in plan if not any(n in names for names in per_layer)]


def _quantize(model: nn.Module, plan: Plan, owners: Dict[str, Modifier], names) -> None:
    for name in names:
        module, scheme = plan[name]
        replace_module(model, name, owners[name].quantize_module(name, module, scheme))


def oneshot(model=None, recipe: Recipe = None, dataset=None, *, num_calibration_samples: int = 512,
            max_seq_length: Optional[int] = None, output_dir: Optional[str] = None, text_column: str = "text",
            shuffle_calibration_samples: bool = True, seed: int = 0, tokenizer=None, processor=None,
            overwrite: bool = False, save_compressed: bool = True, splits=None, dataset_path=None,
            concatenate_data: bool = False, pad_to_max_length: bool = False, pipeline: Optional[str] = None,
            stage: Optional[str] = None, recipe_args=None, precision="auto", config_name=None,
            tie_word_embeddings: bool = True, trust_remote_code_model: bool = False, model_revision: str = "main",
            sequential_targets=None, log_dir: Optional[str] = None, shuffle: Optional[bool] = None,
            save_format: Optional[str] = None, gguf_type: Optional[str] = None, activations: str = "auto",
            spill_dir: Optional[str] = None, stream_weights="auto", distributed="auto", **kwargs):
    """Quantize `model` (a PreTrainedModel or a local path) in place with `recipe` and return it.

    recipe: a preset name ("W4A16", "W4A16_ASYM", "W8A16", "W8A8", "NF4", "INT8_OUTLIER", ...), a
    modifier, a list of modifiers, or llmcompressor YAML (string or file; `stage` picks one
    stage of a multi-stage recipe). dataset: calibration data for modifiers that need it (list of
    strings, datasets.Dataset or DatasetDict with `splits`, .txt/.jsonl/.json/.csv path or
    dataset_path=, DataLoader or token ids); with RTN, NF4 or LLM.int8() it is optional and,
    given, each layer's output error is logged (measured on the first ERROR_LOG_SAMPLES samples,
    ERROR_LOG_TOKENS tokens each; LLM.int8() uses all of it to report its outlier dimensions).
    Text is tokenized with `tokenizer` (or `processor`), else the tokenizer saved in the model's
    directory. output_dir: save there in compressed-tensors format (bitsandbytes' for NF4 / FP4 and
    LLM.int8(); save_compressed=False: the decompressed float model), written to a temporary
    directory, then renamed; an existing non-empty directory is refused unless overwrite=True.
    The returned model's save_pretrained(dir, save_compressed=True) writes the same checkpoint.
    A MixedPrecision item first runs its sensitivity pass and allocation, then quantizes with the
    chosen per-Linear schemes (recipe.yaml records the resulting modifier).
    save_format="gguf" writes output_dir/model-<gguf_type>.gguf (and recipe.yaml) for llama.cpp
    instead; gguf_type defaults to the recipe's GGUF scheme (GPTQModifier(scheme="Q4_K_M"), ...),
    and the tensors the recipe left float take llama.cpp's rules for that type.
    activations: where the calibration hidden states between decoder layers live: "memory",
    "bf16" (half of fp32's memory, results within bf16 rounding of the layers' inputs), "disk"
    (a file in spill_dir, default the temporary directory, read back a sample at a time; same
    results as memory, free space checked up front) or "auto" (disk when they would take over
    half the available memory).
    stream_weights: quantize a checkpoint directory with one decoder layer's weights in memory at a
    time (models bigger than memory): the skeleton is built on the meta device, each layer is
    read from the safetensors shards (in the dtype from_pretrained would give it), calibrated,
    quantized, spilled to disk beside output_dir and freed; the checkpoint written is byte for
    byte the in-memory one. True needs a model directory and output_dir (a safetensors
    checkpoint); "auto" streams when the float model would take over half the available memory.
    A streamed oneshot returns the model's skeleton (its weights are on the meta device, not
    in memory): load the result with lowbit.load(output_dir) or transformers.
    distributed: data-parallel calibration over torch.distributed ("auto": when a process
    group is initialised, or torchrun started several processes; True: required). Each rank
    calibrates on every N-th sample, the modifiers' statistics are reduced across the ranks
    after each pass over a decoder layer (so every rank holds the same quantized weights, equal
    to a single process's up to float summation order), and rank 0 writes output_dir.

    Every other argument of llmcompressor 0.14's oneshot is accepted: pipeline ("sequential" =
    "independent", "basic": every layer calibrated on float activations, "datafree"),
    shuffle_calibration_samples, concatenate_data, pad_to_max_length, precision,
    tie_word_embeddings, config_name, trust_remote_code_model, sequential_targets (checked
    against the model's decoder layer class), recipe_args (written to recipe.yaml), log_dir (a
    copy of the log there); those that change nothing on the CPU (batch_size, streaming, ...)
    warn once when set; a Hub model or dataset name is refused (lowbit works offline).
    """
    warn_no_effect(kwargs)
    if model is None:
        raise TypeError("oneshot() needs a model: a PreTrainedModel or a local model directory")
    if shuffle is not None:  # lowbit's earlier name of shuffle_calibration_samples
        shuffle_calibration_samples = shuffle
    mode = pipeline_mode(pipeline)
    group = dist_calibration.resolve(distributed)
    check_activations(activations, spill_dir)
    check_calibration_args(num_calibration_samples, max_seq_length)
    modifiers = parse_recipe(recipe, stage=stage)
    if group is not None:  # refused before the model is loaded
        _check_whole_model_modifiers(modifiers, "one process holds", "distributed=False")
        for m in modifiers:
            m.check_distributed()
    args = parse_recipe_args(recipe_args)
    if dataset_path is not None:
        if dataset is not None:
            raise ValueError("pass the calibration data as dataset= or dataset_path=, not both")
        dataset = dataset_path
    protected = [model] if isinstance(model, (str, os.PathLike)) else checkpoint.model_directories(model)
    if output_dir is not None:  # refused before any work; checked again when the checkpoint is written
        checkpoint.check_output_dir(output_dir, overwrite, protected)
    load_options = dict(config_name=config_name, precision=precision, trust_remote_code=trust_remote_code_model,
                        model_revision=model_revision, tie_word_embeddings=tie_word_embeddings)
    tokenizer = _tokenizer_of(tokenizer if tokenizer is not None else processor)
    source = None
    float_bytes = functools.cache(functools.partial(_float_bytes, model, config_name, precision, model_revision,
                                                    trust_remote_code_model))
    if should_stream(stream_weights, model, output_dir, save_format, float_bytes):
        model, tokenizer, source = _open_streamed(model, tokenizer, **load_options)
        _check_whole_model_modifiers(modifiers, "a streamed oneshot never holds in memory", "stream_weights=False")
        logger.info("streaming %s one decoder layer at a time (the float model would take %.2f GiB)",
                    source.path, float_bytes() / 2**30)
    else:
        model, tokenizer = _load(model, tokenizer, **load_options)
    needs_data = [type(m).__name__ for m in modifiers if m.requires_calibration]
    if mode == "datafree":
        if needs_data:
            raise ValueError(f"pipeline='datafree', but {', '.join(needs_data)} needs calibration data")
        dataset = None
    if needs_data and dataset is None:
        raise ValueError(f"{', '.join(needs_data)} needs calibration data: pass dataset=")
    plan, owners = _plan(model, modifiers, calibrated=dataset is not None)
    save_options = checkpoint.check_save_options(model, plan, tokenizer, output_dir, save_format,
                                                 **({} if gguf_type is None else {"gguf_type": gguf_type}))
    samples = None
    if dataset is not None:
        samples = prepare_calibration(dataset, tokenizer, num_calibration_samples=num_calibration_samples,
                                      max_seq_length=max_seq_length or DEFAULT_MAX_SEQ_LENGTH,
                                      text_column=text_column, shuffle=shuffle_calibration_samples, seed=seed,
                                      splits=splits, concatenate=concatenate_data, pad=pad_to_max_length)
        check_token_ids(samples, model.get_input_embeddings().num_embeddings)
        if not needs_data and not any(m.collects_statistics for m in modifiers):
            samples = [{k: v[:, :ERROR_LOG_TOKENS] for k, v in s.items()} for s in samples[:ERROR_LOG_SAMPLES]]
        if group is not None:
            samples = group.shard(samples)

    output_embeddings = model.get_output_embeddings()
    layers_name, layers = decoder_layers(model)
    _check_sequential_targets(sequential_targets, layers)
    per_layer, outside = _by_layer(plan, layers_name, len(layers))
    writer = group is None or group.rank == 0  # the process that writes output_dir
    if output_dir is not None and writer and source is None:  # before the work, not after it
        check_free_space(output_dir, estimated_output_bytes(model, plan, save_compressed), "the checkpoint")
    stream = None if source is None else _LayerStream(source, output_dir, layers_name, layers, plan, save_compressed,
                                                      writer)
    try:
        modifiers, plan = _calibrate_and_quantize(model, modifiers, plan, owners, samples, layers_name, layers,
                                                  per_layer, outside, stream, group, mode=mode,
                                                  activations=activations, spill_dir=spill_dir, log_dir=log_dir)
        kv_schemes = [m.kv_cache_scheme for m in modifiers if getattr(m, "kv_cache_scheme", None) is not None]
        _finish_config(model, plan, output_embeddings, kv_schemes[0] if kv_schemes else None)
        recipe_yaml = recipe_to_yaml(modifiers, args)
        if stream is not None:
            stream.write(model, output_dir, tokenizer, recipe_yaml, overwrite, protected)
            if writer:
                logger.info("oneshot: the quantized checkpoint is in %s; load it with lowbit.load(%r)", output_dir,
                            os.fspath(output_dir))
    finally:
        if stream is not None:
            stream.close()
    if stream is None:
        checkpoint.attach_save_pretrained(model, recipe_yaml)
        if output_dir is not None and writer:
            checkpoint.save(model, output_dir, tokenizer=tokenizer, recipe_yaml=recipe_yaml, overwrite=overwrite,
                            compressed=save_compressed, **save_options)
    if group is not None:
        logger.info("distributed calibration: rank %d of %d, %d samples, %.1f MiB of statistics all-reduced",
                    group.rank, group.size, len(samples or []), group.reduced_bytes / 2**20)
        if output_dir is not None:
            group.barrier(f"waiting for rank 0 to write {os.fspath(output_dir)}")
    return model


def _check_whole_model_modifiers(modifiers, where: str, fix: str) -> None:
    whole_model = [type(m).__name__ for m in modifiers
                   if hasattr(m, "choose") or type(m).prepare_model is not Modifier.prepare_model]
    if whole_model:
        raise ValueError(f"{', '.join(whole_model)} measures the whole float model at once, which only {where}: "
                         f"pass {fix}")


class _LayerStream:
    """A streamed oneshot's weights: the embedding and everything outside the decoder layers
    but an untied LM head read at the start, each decoder layer read before its turn and
    spilled (its checkpoint tensors) and freed after it, the LM head read last."""

    def __init__(self, source: StreamedCheckpoint, output_dir, layers_name: str, layers, plan: Plan,
                 compressed: bool, writer: bool = True):
        self.source, self.layers_name, self.layers, self.plan, self.compressed = (source, layers_name, layers, plan,
                                                                                   compressed)
        model = source.model
        self.head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        # writer: this process writes the checkpoint (rank 0 of a distributed run)
        self.spill = LayerSpill(output_dir, estimated_output_bytes(model, plan, compressed)) if writer else None
        source.load([""], exclude=[layers_name, self.head])

    def begin(self, i: int) -> None:
        self.source.load([f"{self.layers_name}.{i}"])

    def end(self, i: int, names) -> None:
        """Spill decoder layer i's checkpoint tensors (its modules `names` quantized) and free it."""
        model = self.source.model
        if self.spill is not None:
            self.spill.put(f"{self.layers_name}.{i}", module_state(model, self.layers[i], self.compressed))
        self.source.release(self.layers[i], *(self.plan[n][0] for n in names))

    def begin_outside(self) -> None:
        self.source.load([self.head])

    def write(self, model, output_dir, tokenizer, recipe_yaml, overwrite, protected) -> None:
        """The checkpoint: what is outside the decoder layers spilled, then the shards assembled
        from the spill and the metadata written, as checkpoint.save writes them (by the writer
        only)."""
        if self.spill is not None:
            self.spill.put("", module_state(model, model, self.compressed, skip=self.layers_name))

            def write(tmp: str) -> None:
                self.spill.tensors.write_safetensors(tmp, MAX_SHARD_SIZE)
                checkpoint.write_metadata(model, tmp, tokenizer, recipe_yaml, self.compressed)

            write_directory(output_dir, write, overwrite, protected=protected)
        self.source.release(model)

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()


def _calibrate_and_quantize(model, modifiers, plan, owners, samples, layers_name, layers, per_layer, outside, stream,
                            group, *, mode, activations, spill_dir, log_dir):
    """oneshot's work between the plan and the save: every decoder layer, then the modules
    outside them (the LM head). -> (the modifiers, the plan), a mixed-precision recipe's as
    chosen."""
    start = time.perf_counter()
    with _log_to(log_dir):
        if any(hasattr(m, "choose") for m in modifiers):  # mixed precision: measure, allocate, then plan again
            gatherers = {m: m.gatherer() for m in modifiers if hasattr(m, "choose")}
            logger.info("mixed precision: sensitivity pass over %d layers", len(layers))
            _run_layer_sequential(model, layers_name, layers, [[] for _ in layers], {}, {}, list(gatherers.values()),
                                  samples, activations=activations, spill_dir=spill_dir)
            modifiers = [m.choose(gatherers[m].report, model) if m in gatherers else m for m in modifiers]
            plan, owners = _plan(model, modifiers, calibrated=True)
            per_layer, outside = _by_layer(plan, layers_name, len(layers))
        if samples is None:
            for i, names in enumerate(tqdm(per_layer, desc="lowbit: quantizing layers", unit="layer")):
                t0 = time.perf_counter()
                with _layer_weights(stream, i, names):
                    _quantize(model, plan, owners, names)
                logger.info("layer %d: %d modules in %.2f s (no calibration data: output error not measured)",
                            i, len(names), time.perf_counter() - t0)
        else:
            _run_layer_sequential(model, layers_name, layers, per_layer, plan, owners, modifiers, samples,
                                  float_inputs=mode == "basic", activations=activations, spill_dir=spill_dir,
                                  stream=stream, group=group)
        if stream is not None:
            stream.begin_outside()
        _quantize(model, plan, owners, outside)
        logger.info("oneshot: %d modules quantized in %.1f s", len(plan), time.perf_counter() - start)
    return modifiers, plan


@contextlib.contextmanager
def _layer_weights(stream, i: int, names):
    """Decoder layer i's weights in memory for the block: a streamed oneshot reads them from the
    checkpoint first and writes the quantized modules `names` out after (_LayerStream); a model
    already in memory has nothing to do."""
    if stream is not None:
        stream.begin(i)
    yield
    if stream is not None:
        stream.end(i, names)


def dispatch_for_generation(model):
    """llmcompressor's dispatch_for_generation (it spreads the model over the GPUs for
    generate()): lowbit's models run on the CPU where they are, so this returns the model."""
    return model


@contextlib.contextmanager
def _log_to(log_dir):
    """llmcompressor's log_dir: a copy of oneshot's log in <log_dir>/oneshot.log."""
    if log_dir is None:
        yield
        return
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(log_dir, "oneshot.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s lowbit: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _finish_config(model, plan: Plan, output_embeddings: nn.Module, kv_cache_scheme=None) -> None:
    """Record the quantization in model.config, as the checkpoint format of the quantized
    modules describes it."""
    if any(module is output_embeddings for module, _ in plan.values()):
        # lm_head now holds its own quantized weight; the embedding stays float.
        model.config.tie_word_embeddings = False
    config = checkpoint.quantization_config(model, plan)
    if config is not None:
        if kv_cache_scheme is not None:
            config["kv_cache_scheme"] = kv_cache_scheme.to_dict()
        model.config.quantization_config = config
    if any(not isinstance(module, nn.Linear) for module, _ in plan.values()):
        logger.warning("Conv1D layers (GPT-2 style) were quantized, but compressed-tensors has no layout for them: "
                       "they are saved as float weights that lie on the integer grid")


def _run_layer_sequential(model, layers_name, layers, per_layer, plan: Plan, owners, modifiers, samples,
                          float_inputs: bool = False, activations: str = "memory", spill_dir=None,
                          stream=None, group=None) -> None:
    """Calibrate and quantize one decoder layer at a time: a float pass feeds the modifiers'
    statistics, transforming modifiers (AWQ, SmoothQuant) change the layer (a second float pass
    then feeds the quantizers' statistics), quantizing ones replace its Linears, and the
    relative output error of each layer (quantized vs float outputs on the same inputs) is
    logged. The next layer's inputs are the quantized outputs (so GPTQ corrects earlier layers'
    errors) unless a modifier asks for the float ones (AWQ) or the caller does (float_inputs:
    llmcompressor's "basic" pipeline). The hidden states between layers live where
    `activations` says (see ActivationStore). stream: a streamed oneshot's weights, read
    before each layer and spilled after it (_LayerStream). group: the ranks of a distributed
    calibration (each runs its own samples; the statistics are reduced after each pass)."""
    names = [f"{layers_name}.{i}" for i in range(len(layers))]
    for modifier in modifiers:
        modifier.prepare_model(model, samples)
        modifier.prepare(model, names, plan)
    float_inputs = float_inputs or any(m.propagates_float_outputs for m in modifiers)
    contexts, nbytes, first = [], [], []
    for args, kwargs in capture_first_layer_inputs(model, layers, samples):
        first.append(args[0] if args else kwargs["hidden_states"])
        contexts.append(_with_hidden_states(args, kwargs, None))  # the rest of a layer's inputs stays in memory
        nbytes.append(first[-1].numel() * first[-1].element_size())
    mode = resolve_mode(activations, nbytes, spill_dir)
    if mode != "memory":
        logger.info("calibration activations: %s (%.2f GiB per set)", mode, sum(nbytes) / 2**30)
    hidden = ActivationStore(mode, nbytes, spill_dir)
    try:
        for s, h in enumerate(first):
            hidden.put(s, h)
        del first
        bar = tqdm(range(len(layers)), desc="lowbit: calibrating layers", unit="layer")
        for i in bar:
            with _layer_weights(stream, i, per_layer[i]):
                hidden, err = _calibrate_layer(i, names[i], layers[i], hidden, contexts, per_layer[i], plan, owners,
                                               modifiers, model, float_inputs, group)
            bar.set_postfix(err=f"{err:.4f}")
    finally:
        hidden.close()


def _calibrate_layer(i, name, layer, inputs: ActivationStore, contexts, names, plan: Plan, owners, modifiers, model,
                     float_inputs: bool, group=None):
    """Decoder layer i of _run_layer_sequential, on `inputs` (closed once used). -> (the next
    layer's inputs, the layer's relative output error)"""
    t0 = time.perf_counter()
    transforming = any(m.transforms_layers for m in modifiers)
    measuring_only = all(m.measures_only for m in modifiers)  # the layers stay float: no second pass

    def run(s):
        args, kwargs = _with_hidden_states(*contexts[s], inputs.get(s))
        return layer_output(layer(*args, **kwargs))

    def calibration_hooks():
        return [h for n in names if (h := owners[n].calibration_hook(n, plan[n][0]))]

    samples = range(len(inputs))
    reference = inputs.like()
    outputs = reference
    try:
        # A transforming modifier (SmoothQuant, AWQ) changes the layer after the float pass, so the
        # quantizers' statistics (Hessians, activation ranges) then come from a second pass over it.
        hooks = [h for m in modifiers for h in m.layer_hooks(name, layer, plan)]
        hooks += [] if transforming else calibration_hooks()
        with torch.inference_mode():
            try:  # the float pass gives the reference outputs and feeds the modifiers' statistics
                for s in samples:
                    reference.put(s, run(s))
            finally:
                for h in hooks:
                    h.remove()
            _reduce_statistics(group, modifiers, name)
            for modifier in modifiers:
                modifier.transform_layer(name, layer, plan)
            hooks = calibration_hooks() if transforming else []
            try:
                for s in samples if hooks else []:
                    run(s)
            finally:
                for h in hooks:
                    h.remove()
            if hooks:
                _reduce_statistics(group, modifiers, name)
            _quantize(model, plan, owners, names)
            # With float propagation the quantized pass only measures the error: a few samples do.
            measured = samples[:ERROR_LOG_SAMPLES] if float_inputs else samples
            if not measuring_only:
                outputs = inputs.like()
                for s in measured:
                    outputs.put(s, run(s))
            diff = norm = 0.0
            for s in measured:  # each reference read once (on disk, a read of the spill file)
                r = reference.get(s).float()
                diff, norm = diff + (outputs.get(s).float() - r).pow(2).sum().item(), norm + r.pow(2).sum().item()
            if group is not None:  # every rank logs (and checks) the error over all the samples
                diff, norm = group.sum_(torch.tensor([diff, norm], dtype=torch.float64), f"{name} output error")
                diff, norm = diff.item(), norm.item()
        err = math.sqrt(diff / max(norm, 1e-30))
        if not math.isfinite(err):
            raise ValueError(f"layer {i} produced NaN or Inf outputs on the calibration data")
        logger.info("layer %d: %d modules in %.2f s, relative output error %.4f", i, len(names),
                    time.perf_counter() - t0, err)
    except BaseException:
        reference.close()
        outputs.close()
        raise
    inputs.close()
    following, dropped = (reference, outputs) if float_inputs else (outputs, reference)
    if dropped is not following:
        dropped.close()
    return following, err


def _reduce_statistics(group, modifiers, name: str) -> None:
    if group is not None:
        for modifier in modifiers:
            modifier.reduce_statistics(group, name)


def _with_hidden_states(args, kwargs, hidden):
    """The next layer's inputs: the same keyword arguments, new hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
