"""oneshot's keyword set is llmcompressor's (0.14): what each argument means on the CPU.

Arguments with a meaning here are oneshot's own parameters. The ones below change nothing in a
layer-sequential CPU run: they are accepted, and a value other than llmcompressor's default
draws one warning saying why it has no effect."""

from __future__ import annotations

import warnings

# llmcompressor's default, and why the argument has no effect in lowbit.
NO_EFFECT = {
    "clear_sparse_session": (False, "lowbit keeps no session between oneshot calls"),
    "overwrite_cache": (False, "lowbit caches no preprocessed dataset"),
    "streaming": (False, "calibration data is read locally"),
    "dataloader_num_workers": (0, "samples are tokenized in the calling process, only as many as are used"),
    "preprocessing_num_workers": (None, "samples are tokenized in the calling process, only as many as are used"),
    "batch_size": (1, "samples run one at a time; the calibration statistics are sums over tokens, the same for "
                      "any batch size"),
    "data_collator": ("truncation", "samples are not batched, so nothing is collated (each is truncated to "
                                    "max_seq_length)"),
    "min_tokens_per_module": (None, "it concerns mixture-of-experts routing"),
    "moe_calibrate_all_experts": (True, "it concerns mixture-of-experts routing"),
    "tracing_ignore": (None, "lowbit does not trace the model (it hooks the decoder layers)"),
    "sequential_offload_device": ("cpu", "activations between layers already stay in main memory"),
    "quantization_aware_calibration": (True, "llmcompressor deprecated it; it has no effect there either"),
    "sequential_prefetch": (False, "there is no device to prefetch to"),
    "dataset_config_name": (None, "it selects a configuration of a Hub dataset, and lowbit reads local data only"),
}

# The calibration pipelines llmcompressor names, as lowbit runs them.
PIPELINES = {
    None: "sequential",
    "sequential": "sequential",   # layer by layer, each layer fed the previous quantized layers' outputs
    "layer_sequential": "sequential",
    "independent": "sequential",  # llmcompressor's default: each modifier's own pipeline, here the same pass
    "basic": "basic",             # every layer calibrated on the float model's activations
    "datafree": "datafree",       # no calibration data
}


def warn_no_effect(kwargs: dict) -> None:
    """One warning naming every argument given a non-default value that has no effect here;
    a TypeError for a name llmcompressor's oneshot does not have either."""
    unknown = sorted(k for k in kwargs if k not in NO_EFFECT)
    if unknown:
        raise TypeError(f"oneshot() got unexpected keyword arguments {unknown} (lowbit takes llmcompressor's oneshot "
                        "arguments; see help(lowbit.oneshot))")
    moot = [f"{k}={v!r} ({NO_EFFECT[k][1]})" for k, v in kwargs.items()
            if k != "tracing_ignore" and v != NO_EFFECT[k][0]]
    if moot:
        warnings.warn("oneshot: these arguments have no effect in lowbit: " + "; ".join(moot), stacklevel=3)


def pipeline_mode(pipeline) -> str:
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r}: lowbit runs 'sequential' (also for 'independent' and "
                         "'layer_sequential'), 'basic' (every layer calibrated on float activations) and 'datafree'")
    return PIPELINES[pipeline]


def parse_recipe_args(recipe_args) -> dict:
    """llmcompressor's recipe_args: ["key=value", ...] or a dict, kept as the recipe's `args`."""
    if recipe_args is None:
        return {}
    if isinstance(recipe_args, dict):
        return dict(recipe_args)
    if isinstance(recipe_args, str) or not all(isinstance(a, str) and a.count("=") == 1 for a in recipe_args):
        raise ValueError(f"recipe_args must be a list of 'key=value' strings or a dict, got {recipe_args!r}")
    return dict(a.split("=") for a in recipe_args)
