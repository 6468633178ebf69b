"""transformers integration: `from_pretrained(path, quantization_config=lowbit.LowbitConfig(...))`
quantizes on load with lowbit's data-free recipes (RTN WnA16, W8A8, NF4 / FP4, LLM.int8()), as
`BitsAndBytesConfig` does, through transformers' registered-quantizer hooks."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "lowbit"


class LowbitConfig(QuantizationConfigMixin):
    """What from_pretrained should quantize, in oneshot's terms: a preset `scheme` ("W4A16",
    "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "NF4", "FP4", "INT8_OUTLIER", ...) or a dict / compressed-tensors
    QuantizationScheme, on `targets`, except `ignore`. The model is quantized right after its
    float weights are loaded (round-to-nearest: no calibration data); save_pretrained then
    writes the checkpoint oneshot would (compressed-tensors or bitsandbytes format)."""

    def __init__(self, scheme="W4A16", targets: Union[str, Sequence[str]] = "Linear",
                 ignore: Optional[Sequence[str]] = ("lm_head",), **kwargs):
        self.quant_method = QUANT_METHOD
        self.scheme, self.targets = scheme, targets
        self.ignore = list(ignore) if ignore is not None else []
        self.recipe()  # a bad scheme / targets fails here, before any weight is read
        for key, value in kwargs.items():  # from_dict: what to_dict wrote
            setattr(self, key, value)

    def recipe(self):
        """The oneshot recipe this config stands for."""
        from .modifiers import BNB_PRESETS, BnB4bitModifier, LLMInt8Modifier, QuantizationModifier
        from .recipe import INT8_OUTLIER_PRESET

        name = self.scheme.upper() if isinstance(self.scheme, str) else None
        if name in BNB_PRESETS:
            s = BNB_PRESETS[name]
            return BnB4bitModifier(s.quant_type, s.blocksize, s.double_quant, targets=self.targets, ignore=self.ignore)
        if name == INT8_OUTLIER_PRESET:
            return LLMInt8Modifier(threshold=6.0, targets=self.targets, ignore=self.ignore)
        modifier = QuantizationModifier(scheme=self.scheme, targets=self.targets, ignore=self.ignore)
        if modifier.requires_calibration:
            raise ValueError(f"scheme {self.scheme!r} calibrates static activation scales on data, which from_pretrained "
                             "does not have: use a dynamic scheme (W8A8, FP8_DYNAMIC) here, or lowbit.oneshot(model, "
                             "recipe, dataset=...)")
        return modifier


class LowbitHfQuantizer(HfQuantizer):
    """Loads the float weights as transformers does, then quantizes the model in place with
    lowbit.oneshot (data-free), so its Linears run lowbit's CPU kernels."""

    requires_calibration = False

    def validate_environment(self, *args, device_map=None, **kwargs):
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if {getattr(d, "type", d) for d in devices} - {None, "cpu", "auto"}:
            raise ValueError(f"LowbitConfig quantizes for lowbit's CPU kernels; got device_map={device_map!r}. Load on "
                             "the CPU (no device_map, or device_map='cpu')")

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .pipeline import oneshot

        return oneshot(model, self.quantization_config.recipe())

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:  # adapters (PEFT) train on top of the frozen quantized layers
        return True


def register() -> None:
    """Make quant_method "lowbit" known to transformers (once per process)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)
