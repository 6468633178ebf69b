"""QuantizationModifier: round-to-nearest quantization, llmcompressor's arguments."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn import kv_cache as kv
from ..nn.convert import check_scheme, quantize_module
from .. import ggml
from ..schemes import GGUFScheme, QuantizationScheme, args_from_dict, gguf_tensor_scheme, plain, resolve_scheme
from ..targets import as_list
from .base import Modifier, in_layer
from .observers import ActivationRange, add_squares, reduce_sum_pair


class QuantizationModifier(Modifier):
    """Quantize the targeted Linear layers with a preset `scheme` (e.g. "W4A16", "FP8_DYNAMIC"),
    a dict {preset: targets}, or compressed-tensors `config_groups`
    ({name: {targets, weights, input_activations}}, or compressed-tensors' QuantizationScheme
    objects). Dynamic activation schemes (W8A8, FP8_DYNAMIC) need no calibration data; static
    ones (FP8, or input_activations with dynamic: false) calibrate one input scale per Linear
    on it with the activations' observer. Given data, the runner logs each layer's output
    error, and a scheme with the imatrix_mse observer weighs its range search by E[x^2] of
    each input column on it. A GGUF type as scheme ("Q4_K_M", "Q4_0", ...: llama-quantize's
    names) puts each Linear on the ggml blocks llama.cpp's rules give it, exactly as ggml
    quantizes, weighted by E[x^2] (llama.cpp's importance matrix) when data is given."""

    def __init__(self, scheme: Union[None, str, dict, QuantizationScheme] = None,
                 config_groups: Optional[dict] = None, targets: Union[str, Sequence[str]] = "Linear",
                 ignore: Union[None, str, Sequence[str]] = None, bypass_divisibility_checks: bool = False,
                 requires_calibration_data: bool = False, kv_cache_scheme=None):
        super().__init__(targets, ignore)
        # llmcompressor's kv_cache_scheme: calibrated k/v scales; the data pass is then required
        self.kv_cache_scheme = None if kv_cache_scheme is None else kv.KVCacheScheme.parse(kv_cache_scheme)
        self.requires_calibration = self.requires_calibration or self.kv_cache_scheme is not None
        self._kv_ranges: Dict[str, list] = {}  # attention module name -> [|k| max, |v| max]
        if (scheme is None) == (config_groups is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of scheme= (e.g. 'W4A16') or config_groups=")
        if bypass_divisibility_checks:
            raise ValueError("bypass_divisibility_checks=True is not supported: lowbit only writes checkpoints "
                             "whose group size divides every quantized layer's input columns")
        self.scheme = scheme
        self.config_groups = {k: plain(v) for k, v in config_groups.items()} \
            if isinstance(config_groups, dict) else config_groups
        self.groups: List[Tuple[List[str], QuantizationScheme]] = self._groups()
        # E[x^2] per input column for imatrix_mse: name -> (sum of x^2 [in], token count)
        self._importance: Dict[str, Tuple[torch.Tensor, int]] = {}
        self._input_ranges: Dict[str, ActivationRange] = {}  # static activation scales being calibrated
        self._planned: Dict[str, QuantizationScheme] = {}  # module name -> scheme, set by plan()
        self.collects_statistics = any(uses_importance(s) for _, s in self.groups)
        self.requires_calibration = self.requires_calibration or any(static_input(s) for _, s in self.groups)
        for _, scheme in self.groups:
            check_scheme(scheme)

    def _groups(self) -> List[Tuple[List[str], QuantizationScheme]]:
        if self.config_groups is not None:
            if not isinstance(self.config_groups, dict):
                raise TypeError("config_groups must be a dict of {group name: {targets, weights, input_activations}}, "
                                f"got {type(self.config_groups).__name__}")
            if not self.config_groups:
                raise ValueError("config_groups is empty: give at least one group, e.g. {'group_0': {'targets': "
                                 "['Linear'], 'weights': {'num_bits': 4, 'strategy': 'group', 'group_size': 128}}}")
            groups = []
            for name, group in self.config_groups.items():
                if isinstance(group, dict) and "gguf" in group:  # lowbit's: one ggml block type for the group
                    groups.append((as_list(group.get("targets", self.targets), f"config_groups[{name!r}]['targets']"),
                                   gguf_tensor_scheme(group["gguf"])))
                    continue
                if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
                    raise ValueError(f"config_groups[{name!r}] needs 'targets' and a 'weights' dict of quantization "
                                     f"args, got {group!r}")
                acts = group.get("input_activations")
                if acts is not None and not isinstance(acts, dict):
                    raise ValueError(f"config_groups[{name!r}]['input_activations'] must be a dict or null, got {acts!r}")
                scheme = QuantizationScheme(args_from_dict(group["weights"]), args_from_dict(acts) if acts else None)
                groups.append((as_list(group.get("targets", self.targets), f"config_groups[{name!r}]['targets']"),
                               scheme))
            return groups
        if isinstance(self.scheme, dict) and "weights" not in self.scheme:  # {preset: targets}
            if not self.scheme:
                raise ValueError("scheme is an empty dict: give a preset name such as 'W4A16', or {preset: targets}")
            return [(as_list(targets, f"scheme[{preset!r}]"), resolve_scheme(preset))
                    for preset, targets in self.scheme.items()]
        return [(self.targets, resolve_scheme(self.scheme))]

    def plan(self, model: nn.Module, calibrated: bool = False) -> Dict[str, Tuple[nn.Module, QuantizationScheme]]:
        """Module name -> (module, scheme) for every module this modifier quantizes; the
        first config group that matches a module wins. A GGUF scheme gives each module the tensor
        type of llama.cpp's rules (those of llama-quantize --imatrix when `calibrated`: the
        layers are quantized with the calibration data's importance); a module those rules keep
        float (a row length no block type divides) stays float and is left out."""
        out: Dict[str, Tuple[nn.Module, QuantizationScheme]] = {}
        for targets, scheme in self.groups:
            types = ggml.module_tensor_types(model, scheme.file_type, has_imatrix=calibrated) \
                if isinstance(scheme, GGUFScheme) else None
            for name, module in self.select(model, targets).items():
                if types is None:
                    out.setdefault(name, (module, scheme))
                elif scheme.tensor_type is not None:  # a fixed block type
                    if name not in types or module.in_features % ggml.BLOCK[scheme.tensor_type]:
                        raise ValueError(f"{name} ({module.in_features} columns) cannot take {scheme.tensor_type} "
                                         f"blocks of {ggml.BLOCK[scheme.tensor_type]} values in a GGUF file; give it "
                                         "another type or add it to ignore")
                    out.setdefault(name, (module, scheme))
                elif name not in types:
                    raise ValueError(f"{name} has no place in a GGUF file of {type(model).__name__} (lowbit writes "
                                     "the tensors llama.cpp's converter writes); add it to ignore")
                elif types[name] not in ggml.FLOAT_TYPES:
                    out.setdefault(name, (module, GGUFScheme(scheme.file_type, types[name])))
        self._planned = {name: scheme for name, (_, scheme) in out.items()}
        return out

    def prepare(self, model: nn.Module, layer_names, plan) -> None:
        if self.kv_cache_scheme is None:
            return
        for prefix in layer_names:
            if len(kv.attention_modules(model.get_submodule(prefix))) != 1:
                raise ValueError(f"kv_cache_scheme: lowbit cannot hook the attention of {type(model).__name__} "
                                 f"({prefix} has no single attention module taking past_key_values); quantize its "
                                 "weights without kv_cache_scheme")

    def layer_hooks(self, prefix: str, layer: nn.Module, plan) -> list:
        """kv_cache_scheme: the range of the keys and values each attention module stores."""
        if self.kv_cache_scheme is None:
            return []
        handles = []
        for name, attention in kv.attention_modules(layer, prefix).items():
            self._kv_ranges[name] = [None, None]
            handles.append(kv.observe(attention, self.kv_cache_scheme, self._kv_ranges[name]))
        return handles

    def transform_layer(self, prefix: str, layer: nn.Module, plan) -> None:
        """kv_cache_scheme: k_scale / v_scale from the observed ranges; the layer's cache is
        quantized from now on (also in the pass that feeds the next layer)."""
        if self.kv_cache_scheme is None:
            return
        dtype = next(p.dtype for p in layer.parameters() if p.is_floating_point())
        for name, attention in kv.attention_modules(layer, prefix).items():
            kv.register_scales(attention, self.kv_cache_scheme, dtype, self._kv_ranges.pop(name))
            kv.quantize_cache(attention, self.kv_cache_scheme)

    def reduce_statistics(self, group, prefix: str) -> None:
        """E[x^2] sums and counts added up, activation ranges' per-sample records gathered in
        sample order, KV-cache maxima maxed: what the single process would hold."""
        for name in in_layer(self._importance, prefix):
            self._importance[name] = reduce_sum_pair(group, self._importance[name], f"{name} E[x^2]")
        for name in in_layer(self._input_ranges, prefix):
            self._input_ranges[name].reduce(group)
        for name in in_layer(self._kv_ranges, prefix):
            self._kv_ranges[name] = [group.max_(r.clone(), f"{name} KV-cache range") for r in self._kv_ranges[name]]

    def observes_input(self, name: str) -> bool:
        """True when module `name` needs statistics of its input (imatrix_mse, static activations)."""
        scheme = self._planned.get(name)
        return scheme is not None and (uses_importance(scheme) or static_input(scheme))

    def observe_input(self, name: str, x: torch.Tensor) -> None:
        """Gather what module `name`'s scheme needs from one calibration input x: the sum of x^2
        per input column (float64) and the token count for imatrix_mse, the range for a static
        activation scale."""
        scheme = self._planned[name]
        if uses_importance(scheme):
            add_squares(self._importance, name, x)
        if static_input(scheme):
            self.observe_range(name, x)

    def observe_range(self, name: str, x: torch.Tensor) -> None:
        """One calibration input of module `name` into its static activation range."""
        self._input_ranges.setdefault(name, ActivationRange(self._planned[name].input_activations, name)).update(x)

    def calibration_hook(self, name: str, module: nn.Module):
        if not self.observes_input(name):
            return None
        return module.register_forward_pre_hook(lambda mod, args: self.observe_input(name, args[0]))

    def importance(self, name: str) -> Optional[torch.Tensor]:
        """E[x^2] per input column of module `name` on the calibration data (imatrix_mse), or None."""
        total, n = self._importance.pop(name, (None, 0))
        if total is None:
            return None
        if isinstance(self._planned.get(name), GGUFScheme):  # llama.cpp's imatrix: float32 sums / count
            return total.float() / float(n)
        return (total / max(n, 1)).float()

    def input_scale(self, name: str, scheme: QuantizationScheme, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The calibrated static activation scale of module `name` ([1] in dtype), None if dynamic."""
        if not static_input(scheme):
            return None
        observed = self._input_ranges.pop(name, None)
        if observed is None:
            raise ValueError(f"{name} saw no calibration data: its static activation scale (input_activations "
                             "dynamic: false) is calibrated on the dataset; pass dataset= to oneshot")
        return observed.scale(dtype)

    def quantize_module(self, name: str, module: nn.Module, scheme) -> nn.Module:
        if isinstance(scheme, GGUFScheme):
            return quantize_module(module, scheme, importance=self.importance(name))
        return quantize_module(module, scheme, importance=self.importance(name),
                               input_scale=self.input_scale(name, scheme, module.weight.dtype))

    def recipe_args(self) -> dict:
        args = {"targets": self.targets, "ignore": self.ignore}
        if self.config_groups is not None:
            args["config_groups"] = self.config_groups
        else:
            scheme = plain(self.scheme)
            args["scheme"] = scheme.to_dict() if isinstance(scheme, QuantizationScheme) \
                else scheme.file_type if isinstance(scheme, GGUFScheme) else scheme
        if self.kv_cache_scheme is not None:
            args["kv_cache_scheme"] = self.kv_cache_scheme.to_dict()
        return args


def static_input(scheme: QuantizationScheme) -> bool:
    return (not isinstance(scheme, GGUFScheme) and scheme.input_activations is not None
            and not scheme.input_activations.dynamic)


def uses_importance(scheme) -> bool:
    """True when the scheme's quantizer weighs its search by E[x^2] per input column."""
    return isinstance(scheme, GGUFScheme) or scheme.weights.observer == "imatrix_mse"
